"""Several processes on the CPU: DDP, DeepSpeed ZeRO-1/2/3 and FSDP2 under torchrun with gloo.

Every engine trains the tiny Mistral for 4 steps on 2 processes x 1 accumulation step and
must log the same losses and gradient norms as 1 process x 2 accumulation steps (the same
packs, the same global batch; fp32, rel 1e-4), end with the same weights, exit 0, and leave a
final checkpoint that ``packtune convert pth_to_hf`` turns into a folder transformers loads.
DDP, ZeRO-3 and FSDP2 also resume (``--resume auto``) from the step-2 checkpoint and repeat
steps 3 and 4 exactly; ZeRO-2 with 2 accumulation steps matches 1 process with 4; LoRA on a
downloaded base under ZeRO-3 and FSDP2 saves, resumes and converts only the adapter. A rank that raises (``PACKTUNE_DEBUG_RAISE``, or a real data error on
the main rank) ends the job quickly with that rank's error.

The distributed runs are subprocesses (``python -m torch.distributed.run ...``) with a
timeout; they share one data cache, so the demo data is tokenized once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from helpers import LAUNCH_VARS, assert_ran, has_deepspeed, launch_env, read_metrics, run_command
from packtune.distributed import free_port

CONFIG = "tiny_mistral_full_demo"
OPTIONS = ["max_steps=4", "log_steps=1", "save_steps=2", "batch_size=1", "max_length=128", "evaluation_inputs=[]"]
ENGINES = {
    "ddp": [],
    "zero1": ["--deepspeed", "deepspeed_zero1"],
    "zero2": ["--deepspeed", "deepspeed_zero2"],
    "zero3": ["--deepspeed", "deepspeed_zero3"],
    "fsdp": ["--fsdp"],
}
RESUMED = {"ddp", "zero3", "fsdp"}
FAULT_DEADLINE = 120  # a failing job must end well within this


def _train_cmd(work: str, engine_args: list[str], *, options=OPTIONS, resume: str | None = None, nproc: int | None = 2) -> list[str]:
    launch = [sys.executable, "-m", "packtune"]
    if nproc:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                  f"--master_port={free_port()}", "-m", "packtune"]
    cmd = [*launch, "train", CONFIG, "--work-dir", work, *engine_args]
    if nproc:
        cmd += ["--launcher", "pytorch"]
    if resume:
        cmd += ["--resume", resume]
    return cmd + ["--cfg-options", *options]


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def _assert_same_curve(got: list[dict], want: list[dict], steps, rel: float = 1e-4, norm_rel: float | None = None) -> dict:
    """Loss, gradient norm and lr of ``steps`` agree; returns the largest relative gaps."""
    got = {r["step"]: r for r in got}
    want = {r["step"]: r for r in want}
    gaps = {"loss": 0.0, "grad_norm": 0.0}
    for step in steps:
        for key in ("loss", "grad_norm", "lr"):
            a, b = got[step][key], want[step][key]
            tol = norm_rel if key == "grad_norm" and norm_rel is not None else rel
            assert _close(a, b, tol), f"step {step} {key}: {a} vs {b} (1 process)"
            if key in gaps:
                gaps[key] = max(gaps[key], abs(a - b) / max(abs(b), 1e-12))
        assert got[step]["tokens"] == want[step]["tokens"], f"step {step}: different packs"
    return gaps


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("packtune_cache"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache) -> dict:
    """One process, 2 accumulation steps: the same global batch as 2 processes x 1."""
    work = str(tmp_path_factory.mktemp("single"))
    rc, out, _ = run_command(_train_cmd(work, [], options=[*OPTIONS, "accumulative_counts=2"], nproc=None), launch_env(cache))
    assert_ran(rc, out, "the 1-process run")
    from packtune.convert import read_checkpoint

    return {"work": work, "metrics": read_metrics(work), "state": read_checkpoint(os.path.join(work, "iter_4.pth"))}


# --- the engines ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_engine_matches_one_process(engine, baseline, cache, tmp_path, monkeypatch):
    if engine.startswith("zero") and not has_deepspeed():
        pytest.skip("DeepSpeed is not installed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    work = str(tmp_path / "work")
    if engine == "ddp":
        # XTuner's way: NPROC_PER_NODE relaunches `packtune train` under torchrun (free port).
        cmd = _train_cmd(work, [], nproc=None)
        env = launch_env(cache, NPROC_PER_NODE="2")
    else:
        cmd, env = _train_cmd(work, ENGINES[engine]), launch_env(cache)
    rc, out, seconds = run_command(cmd, env)
    assert_ran(rc, out, f"the {engine} run")
    assert "engine ddp" in out if engine == "ddp" else True
    assert out.count("checkpoint: ") == 1, "the summary line is printed once, by rank 0"

    # Same packs, same global loss normalisation: the same losses, norms and schedule.
    # DeepSpeed computes the gradient norm itself, more exactly than the reference: torch's
    # fp32 vector_norm on the CPU is off by up to ~2e-4 (relative, measured against float64) on
    # a gradient of millions of elements like lm_head's, which the 1-process run reports.
    norm_rel = 3e-4 if engine.startswith("zero") else None
    gaps = _assert_same_curve(read_metrics(work), baseline["metrics"], steps=(1, 2, 3, 4), norm_rel=norm_rel)
    print(f"\n{engine}: {seconds:.1f} s, largest relative gaps to 1 process: loss {gaps['loss']:.2e}, grad_norm {gaps['grad_norm']:.2e}")

    # The final checkpoint: a file (DDP) or a sharded folder, converted and loaded by transformers.
    final = os.path.join(work, "iter_4.pth")
    assert (os.path.isdir(final) and os.path.isfile(os.path.join(final, "packtune.json"))) if engine != "ddp" else os.path.isfile(final)
    assert not [n for n in os.listdir(work) if ".tmp" in n], "no temporary checkpoint left behind"
    from transformers import AutoModelForCausalLM

    from packtune.cli.main import main

    hf = str(tmp_path / "hf")
    assert main(["convert", "pth_to_hf", CONFIG, final, hf, "--cfg-options", *OPTIONS]) == 0
    model = AutoModelForCausalLM.from_pretrained(hf)
    state = model.state_dict()
    # The worst tensor's ||a - b|| / ||a||: a single element may differ by up to the learning
    # rate where two ranks' gradients nearly cancel (Adam's update is about their sign there).
    gap = max(float((state[k].float() - v.float()).norm() / v.float().norm().clamp(min=1e-12))
              for k, v in baseline["state"].items())
    assert gap < 1e-5, f"{engine}: final weights differ from 1 process by {gap:.2e} (relative)"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 415, 2936, 9060]])).logits
    assert torch.isfinite(logits).all()

    if engine in RESUMED:
        # Resume from step 2 as if step 4 never happened: steps 3 and 4 repeat exactly.
        first = read_metrics(work)
        shutil.rmtree(final) if os.path.isdir(final) else os.remove(final)
        with open(os.path.join(work, "last_checkpoint"), "w") as f:
            f.write(os.path.join(os.path.abspath(work), "iter_2.pth") + "\n")
        rc, out, _ = run_command(_train_cmd(work, ENGINES[engine], resume="auto"), launch_env(cache))
        assert_ran(rc, out, f"the resumed {engine} run")
        assert "resumed from" in out and "at step 2" in out
        again = read_metrics(work)
        assert [r["step"] for r in again] == [1, 2, 3, 4]
        _assert_same_curve(again, first, steps=(3, 4), rel=1e-5)
        assert os.path.exists(final)


@pytest.mark.slow
@pytest.mark.skipif(not has_deepspeed(), reason="DeepSpeed is not installed")
def test_deepspeed_accumulation_matches_one_process(cache, tmp_path):
    """2 processes x 2 accumulation steps under ZeRO-2 (boundary set per micro-batch, one
    ``step()``) equal 1 process x 4: the update of step 1 shows in the loss of step 2."""
    options = ["max_steps=2", "log_steps=1", "save_steps=10", "batch_size=1", "max_length=128", "evaluation_inputs=[]"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    rc, out, _ = run_command(_train_cmd(one, [], options=[*options, "accumulative_counts=4"], nproc=None), launch_env(cache))
    assert_ran(rc, out, "the 1-process run")
    rc, out, _ = run_command(_train_cmd(two, ENGINES["zero2"], options=[*options, "accumulative_counts=2"]), launch_env(cache))
    assert_ran(rc, out, "the ZeRO-2 run")
    _assert_same_curve(read_metrics(two), read_metrics(one), steps=(1, 2), norm_rel=3e-4)


@pytest.mark.slow
@pytest.mark.skipif(not has_deepspeed(), reason="DeepSpeed is not installed")
def test_deepspeed_offload_on_one_process(baseline, cache, tmp_path):
    """``packtune train --deepspeed deepspeed_zero3_offload`` without a launcher (one GPU, as
    XTuner users offload): a group of one is made for DeepSpeed, and the run equals the plain one."""
    work = str(tmp_path / "work")
    cmd = _train_cmd(work, ["--deepspeed", "deepspeed_zero3_offload"], options=[*OPTIONS, "accumulative_counts=2"], nproc=None)
    rc, out, _ = run_command(cmd, launch_env(cache))
    assert_ran(rc, out, "the one-process ZeRO-3 offload run")
    _assert_same_curve(read_metrics(work), baseline["metrics"], steps=(1, 2, 3, 4), norm_rel=3e-4)


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory):
    """A tiny 'downloaded' llama (weights and tokenizer in a folder) for LoRA runs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from packtune.data import load_tokenizer

    folder = tmp_path_factory.mktemp("base")
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=32000, max_position_embeddings=256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_tokenizer("packtune://mistral-v1").save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_sharded_lora_on_a_pretrained_base(engine, pretrained_folder, cache, tmp_path, monkeypatch):
    """LoRA on a downloaded base under ZeRO-3 / FSDP2: the sharded checkpoints hold only the
    adapter, resume repeats step 2 exactly, and the last converts to a PEFT adapter."""
    if engine.startswith("zero") and not has_deepspeed():
        pytest.skip("DeepSpeed is not installed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    options = [f"pretrained_model_name_or_path={pretrained_folder!r}", "model_config=None", "tokenizer_name_or_path=None",
               "lora={'r': 4}", "max_steps=2", "save_steps=1", "log_steps=1", "batch_size=1", "max_length=128",
               "evaluation_inputs=[]", "lr=1e-2"]
    work = str(tmp_path / "work")
    rc, out, _ = run_command(_train_cmd(work, ENGINES[engine], options=options), launch_env(cache))
    assert_ran(rc, out, f"the {engine} LoRA run")
    from packtune.convert import read_checkpoint

    state = read_checkpoint(os.path.join(work, "iter_2.pth"))
    assert state and all("lora_" in k for k in state), sorted(state)[:5]

    first = read_metrics(work)
    shutil.rmtree(os.path.join(work, "iter_2.pth"))
    rc, out, _ = run_command(_train_cmd(work, ENGINES[engine], options=options, resume=os.path.join(work, "iter_1.pth")), launch_env(cache))
    assert_ran(rc, out, f"the resumed {engine} LoRA run")
    _assert_same_curve(read_metrics(work), first, steps=(2,), rel=1e-5)

    from peft import AutoPeftModelForCausalLM

    from packtune.cli.main import main

    adapter = str(tmp_path / "adapter")
    assert main(["convert", "pth_to_hf", "tiny_llama_lora_demo", os.path.join(work, "iter_2.pth"), adapter,
                 "--cfg-options", *options]) == 0
    AutoPeftModelForCausalLM.from_pretrained(adapter)


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_rank_that_raises_ends_the_job(engine, cache, tmp_path):
    """Rank 1 raises at step 2 while rank 0 waits in a collective: the job ends, non-zero,
    with rank 1's error in the output, in seconds (not at the process-group timeout)."""
    if engine.startswith("zero") and not has_deepspeed():
        pytest.skip("DeepSpeed is not installed")
    work = str(tmp_path / "work")
    rc, out, seconds = run_command(_train_cmd(work, ENGINES[engine]), launch_env(cache, PACKTUNE_DEBUG_RAISE="1:2"), timeout=FAULT_DEADLINE + 60)
    assert rc != 0, out[-3000:]
    assert "rank 1 of 2 failed: InjectedFault: PACKTUNE_DEBUG_RAISE: rank 1 raises at step 2" in out, out[-3000:]
    assert seconds < FAULT_DEADLINE, f"the failing job took {seconds:.0f} s"
    assert [r["step"] for r in read_metrics(work)] == [1]


@pytest.mark.slow
def test_data_error_on_the_main_rank_ends_the_job(cache, tmp_path):
    """A real single-rank failure: rank 0 tokenizes (the others wait at a barrier) and meets
    a bad row with ``on_bad_row='error'``; the job ends with rank 0's message naming the row."""
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Say {w}", "input": "", "output": w} for w in ("one", "two", "three")]
    rows.append({"instruction": "no output field"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = [*OPTIONS, f"dataset={data}", "on_bad_row=error"]
    rc, out, seconds = run_command(_train_cmd(str(tmp_path / "work"), [], options=options), launch_env(str(tmp_path / "cache")),
                            timeout=FAULT_DEADLINE + 60)
    assert rc != 0
    assert "rank 0 of 2 failed: DataError" in out and "line 4" in out and "bad row" in out, out[-3000:]
    assert seconds < FAULT_DEADLINE


# --- launchers, configs, errors (no processes started) ------------------------------------------


def test_slurm_variables(monkeypatch):
    from packtune import distributed

    monkeypatch.setattr(distributed.shutil, "which", lambda name: None)  # no scontrol here
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[007-008],cpu1"}
    assert distributed.slurm_env(env) == {
        "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007", "MASTER_PORT": "29500",
    }
    env.update(PORT="1234", ADDR="10.0.0.5")
    assert distributed.slurm_env(env)["MASTER_ADDR"] == "10.0.0.5"
    assert distributed.slurm_env(env)["MASTER_PORT"] == "1234"
    with pytest.raises(RuntimeError, match="SLURM_PROCID is not set"):
        distributed.slurm_env({"SLURM_NTASKS": "2"})
    assert distributed.first_host("node3,node4") == "node3"
    assert distributed.first_host("a[10-12,15]") == "a10"


def test_torchrun_relaunch_command(monkeypatch):
    from packtune.distributed import torchrun_args

    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    assert torchrun_args(["train", "cfg"]) is None
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    cmd = torchrun_args(["train", "cfg"])
    assert "--nproc_per_node=4" in cmd and "--nnodes=1" in cmd and cmd[-4:] == ["train", "cfg", "--launcher", "pytorch"]
    assert cmd[-6:-4] == ["-m", "packtune"]  # what packtune's own launcher hands torch.distributed.run
    port = next(a for a in cmd if a.startswith("--master_port="))
    assert int(port.split("=")[1]) > 0
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("ADDR", "10.1.2.3")
    monkeypatch.setenv("PORT", "29511")
    cmd = torchrun_args(["train", "cfg"])
    for arg in ("--nnodes=2", "--node_rank=1", "--master_addr=10.1.2.3", "--master_port=29511"):
        assert arg in cmd
    monkeypatch.delenv("PORT")
    assert "--master_port=29500" in torchrun_args(["train", "cfg"]), "nodes must agree on a port"
    monkeypatch.setenv("RANK", "0")  # already under torchrun: no second relaunch
    assert torchrun_args(["train", "cfg"]) is None


def test_deepspeed_missing_is_one_clear_line(monkeypatch, capsys, tmp_path):
    from packtune.cli.main import main

    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    code = main(["train", CONFIG, "--work-dir", str(tmp_path), "--deepspeed", "deepspeed_zero2"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "not installed" in err and "pip install" in err

    from packtune.recipe.engines.deepspeed_config import require_deepspeed

    with pytest.raises(ImportError, match="pip install"):
        require_deepspeed()


@pytest.mark.skipif(not has_deepspeed(), reason="DeepSpeed is not installed")
def test_deepspeed_configs(tmp_path):
    from packtune.recipe.engines.deepspeed_config import BUILTIN, fill_auto, resolve_deepspeed_config, zero_stage

    stages = {name: zero_stage(resolve_deepspeed_config(name)) for name in BUILTIN}
    assert stages == {"deepspeed_zero1": 1, "deepspeed_zero2": 2, "deepspeed_zero3": 3,
                      "deepspeed_zero2_offload": 2, "deepspeed_zero3_offload": 3}
    for name in BUILTIN:
        config = resolve_deepspeed_config(name + ".json")
        assert config["zero_allow_untested_optimizer"] is True
        filled = fill_auto(config, micro_batch=2, accumulation=3, world_size=4, max_norm=0.5,
                           dtype=torch.bfloat16, hidden_size=64)
        assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
                filled["train_batch_size"], filled["gradient_clipping"]) == (2, 3, 24, 0.5)
        assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
        assert "auto" not in json.dumps(filled)

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="disagrees with batch_size = 1"):
        fill_auto(resolve_deepspeed_config(str(user)), micro_batch=1, accumulation=1, world_size=2, max_norm=1.0,
                  dtype=torch.float32)
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}))
    with pytest.raises(ValueError, match="zero_optimization.sub_group_size"):
        fill_auto(resolve_deepspeed_config(str(user)), micro_batch=1, accumulation=1, world_size=2, max_norm=1.0,
                  dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="not a built-in config"):
        resolve_deepspeed_config("deepspeed_zero9")


def test_fsdp_finds_the_decoder_layers():
    from helpers import tiny_model
    from peft import LoraConfig, get_peft_model

    from packtune.recipe.engines.fsdp import decoder_layers

    for family in ("llama", "qwen2", "gpt_bigcode"):
        model = tiny_model(family)
        layers = decoder_layers(model)
        assert len(layers) == 2 and len({type(m) for m in layers}) == 1, family
        peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        assert [id(m) for m in decoder_layers(peft)] == [id(m) for m in layers]


def test_unknown_folder_is_not_a_checkpoint(tmp_path):
    from packtune.recipe.engines import read_sharded_model_state

    with pytest.raises(ValueError, match="not a checkpoint packtune can read"):
        read_sharded_model_state(str(tmp_path))


def test_debug_raise_spec(monkeypatch):
    from packtune.distributed import DistEnv
    from packtune.recipe.train import _injected_fault

    monkeypatch.setenv("PACKTUNE_DEBUG_RAISE", "1:3")
    assert _injected_fault(DistEnv(rank=1, world_size=2)) == 3
    assert _injected_fault(DistEnv(rank=0, world_size=2)) is None
    monkeypatch.setenv("PACKTUNE_DEBUG_RAISE", "rank1")
    with pytest.raises(ValueError, match="RANK:STEP"):
        _injected_fault(DistEnv())


def test_balanced_plan_keeps_the_packs_of_every_step():
    """``StepPlan(balance=True)``: the same packs per step for any number of processes, each
    rank a full share, and a more even attention cost than the plain deal."""
    import numpy as np

    from packtune.recipe.step_plan import StepPlan

    class Packs:
        def __init__(self, docs):
            self.docs = docs

        def __len__(self):
            return len(self.docs)

        def __getitem__(self, i):
            return {"cu_seqlens": np.concatenate([[0], np.cumsum(self.docs[i])])}

        def epoch_order(self, epoch):
            return np.random.default_rng([7, epoch]).permutation(len(self))

    rng = np.random.default_rng(0)
    # Half the packs hold one long document, half many short ones: the same tokens, very different cost.
    docs = [[128] if i % 2 else list(rng.integers(4, 12, size=12)) for i in range(37)]
    data = Packs(docs)
    plain = {w: StepPlan(data, 2, 4 // w, w, 1, None) for w in (1, 2, 4)}
    balanced = {w: StepPlan(data, 2, 4 // w, w, 1, None, balance=True) for w in (1, 2, 4)}
    costs = balanced[1].attention_costs()
    assert costs[1] == 128**2
    slowest = {"plain": 0.0, "balanced": 0.0}  # the costliest rank's share, summed over steps
    for step in range(plain[1].total_steps):
        want = sorted(plain[1].step_packs(step))
        for w in (1, 2, 4):
            per_rank = [sum(balanced[w].micro_batches(step, r), []) for r in range(w)]
            assert sorted(sum(per_rank, [])) == want
            if len(want) == 8:  # a full step: every rank a full share of packs
                assert [len(p) for p in per_rank] == [8 // w] * w
                assert all(len(mb) == 2 for r in range(w) for mb in balanced[w].micro_batches(step, r))
        if len(want) == 8:
            for name, plans in (("plain", plain), ("balanced", balanced)):
                loads = [sum(costs[p] for p in sum(plans[4].micro_batches(step, r), [])) for r in range(4)]
                slowest[name] += max(loads) / sum(loads)
    # Each rank keeps a full share of packs, which bounds what dealing can even out (measured:
    # the costliest rank's share summed over 4 steps, 1.58 plain, 1.35 balanced).
    assert slowest["balanced"] < 0.9 * slowest["plain"], slowest
