"""A checkpoint resumes on another number of processes, with every engine.

One uninterrupted run is the reference: one process, 2 accumulation steps, 4 steps of 2 packs,
a tiny Llama loaded from a folder of sharded safetensors (so ZeRO-3 and FSDP2 build it sharded
and stream the weights in), full fine-tuning with weight decay and gradient checkpointing. Each
engine then writes a checkpoint at step 2 on N processes and resumes it on M != N, keeping the
global batch by scaling ``accumulative_counts`` on its own; the resumed run must end with the
reference's weights (worst tensor's ||a - b|| / ||a|| <= 1e-5) and repeat its losses:

* DDP:   the reference's own step-2 file (1 process) resumed on 2 processes;
* FSDP2: 2 processes under ``NPROC_PER_NODE`` (packtune is torchrun's agent) with rank 1 raising
         at step 3, which must end the launcher with rank 1's error line last and exit code 1;
         then resumed on 1 process;
* ZeRO-2: 1 process (work dir and ``--deepspeed`` both ``deepspeed_zero2``: the built-in name
         wins) resumed on 2, through DeepSpeed's universal checkpoint;
* ZeRO-3: 2 processes, each reading its own partitions of the checkpoint (its first steps must
         equal the reference's), resumed on 1, the same way.

A global batch the new number of processes cannot keep is refused in one line (exit 2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from helpers import has_deepspeed

from packtune.distributed import free_port

CONFIG = "tiny_mistral_full_demo"
RUN_TIMEOUT = 300
REL = 1e-5
_LAUNCH_VARS = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PACKTUNE_DEBUG_RAISE", "TORCHELASTIC_ERROR_FILE")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A tiny 'downloaded' Llama in three safetensors shards, with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from packtune.data import load_tokenizer

    folder = tmp_path_factory.mktemp("base")
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=32000, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="3MB")
    assert len([n for n in os.listdir(folder) if n.endswith(".safetensors")]) > 1
    load_tokenizer("packtune://mistral-v1").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def _options(base: str, accumulation: int) -> list[str]:
    return [f"pretrained_model_name_or_path={base!r}", "model_config=None", "tokenizer_name_or_path=None",
            "max_steps=4", "save_steps=2", "log_steps=1", "batch_size=1", "max_length=128", "evaluation_inputs=[]",
            "weight_decay=0.01", "gradient_checkpointing=True", f"accumulative_counts={accumulation}"]


def _env(cache: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(PACKTUNE_CACHE=cache, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if env.get("PYTHONPATH"):  # some runs start in another directory: keep this source tree first
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep))
    env.update(extra)
    return env


def _train(work: str, options: list[str], cache: str, *, nproc: int = 1, engine=(), resume: str | None = None,
           cwd: str | None = None, nproc_per_node: bool = False, **env) -> tuple[int, str]:
    """``packtune train`` on ``nproc`` processes (torchrun, or packtune's own ``NPROC_PER_NODE``)."""
    cmd = [sys.executable, "-m", "packtune"]
    if nproc > 1 and not nproc_per_node:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "packtune"]
    cmd += ["train", CONFIG, "--work-dir", work, *engine]
    if nproc > 1 and not nproc_per_node:
        cmd += ["--launcher", "pytorch"]
    if nproc_per_node:
        env["NPROC_PER_NODE"] = str(nproc)
    if resume:
        cmd += ["--resume", resume]
    tic = time.monotonic()
    proc = subprocess.run(cmd + ["--cfg-options", *options], env=_env(cache, **env), cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=RUN_TIMEOUT)
    print(f"\n{' '.join(engine) or 'plain'} x{nproc}{' resumed' if resume else ''}: {time.monotonic() - tic:.1f} s")
    return proc.returncode, proc.stdout


def _ok(rc: int, out: str, what: str) -> None:
    assert rc == 0, f"{what} exited {rc}:\n{out[-5000:]}"


def _metrics(work: str) -> dict[int, dict]:
    with open(os.path.join(work, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in rows}  # a resumed run's rows replace the earlier ones of the same step


def _state(path: str) -> dict:
    from packtune.convert import read_checkpoint

    return read_checkpoint(path)


def _worst_rel(got: dict, want: dict) -> float:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    return max(float((got[k].float() - want[k].float()).norm() / want[k].float().norm().clamp(min=1e-12)) for k in want)


def _same_as_reference(work: str, reference: dict, steps=(3, 4)) -> None:
    rel = _worst_rel(_state(os.path.join(work, "iter_4.pth")), reference["state"])
    print(f"worst relative weight difference to the uninterrupted run: {rel:.2e}")
    assert rel <= REL, f"resumed weights differ from the uninterrupted run's by {rel:.2e}"
    got = _metrics(work)
    for step in steps:
        a, b = got[step], reference["metrics"][step]
        assert a["tokens"] == b["tokens"], f"step {step}: other packs"
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == pytest.approx(b["lr"], rel=1e-6), (step, a, b)


def _restart_from(work: str, step: int) -> str:
    """Forget what came after ``step``, as if the run had died there; returns that checkpoint."""
    path = os.path.join(os.path.abspath(work), f"iter_{step}.pth")
    for name in os.listdir(work):
        if name.startswith("iter_") and name != f"iter_{step}.pth":
            shutil.rmtree(os.path.join(work, name)) if os.path.isdir(os.path.join(work, name)) else os.remove(os.path.join(work, name))
    with open(os.path.join(work, "last_checkpoint"), "w") as f:
        f.write(path + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base, cache) -> dict:
    work = str(tmp_path_factory.mktemp("reference"))
    rc, out = _train(work, _options(base, 2), cache)
    _ok(rc, out, "the uninterrupted run")
    return {"work": work, "metrics": _metrics(work), "state": _state(os.path.join(work, "iter_4.pth"))}


@pytest.mark.slow
def test_ddp_resumes_one_process_checkpoint_on_two(reference, base, cache, tmp_path):
    work = str(tmp_path / "work")
    os.makedirs(work)
    shutil.copy(os.path.join(reference["work"], "iter_2.pth"), work)
    rc, out = _train(work, _options(base, 2), cache, nproc=2, resume=os.path.join(work, "iter_2.pth"))
    _ok(rc, out, "DDP resumed on 2 processes")
    assert "engine ddp" in out and "accumulative_counts 1 instead of 2" in out, out[-3000:]
    assert "resumed from" in out and "at step 2 (4 packs trained on)" in out
    _same_as_reference(work, reference)


@pytest.mark.slow
def test_fsdp_two_processes_fail_then_resume_on_one(reference, base, cache, tmp_path):
    work = str(tmp_path / "work")
    rc, out = _train(work, _options(base, 1), cache, nproc=2, engine=["--fsdp"], nproc_per_node=True,
                     PACKTUNE_DEBUG_RAISE="1:3")
    # packtune's own launcher: rank 1's error is the last line, exit 1, no torchrun traceback.
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert rc == 1, out[-3000:]
    assert last.startswith("packtune train: error: rank 1 of 2 failed: InjectedFault: PACKTUNE_DEBUG_RAISE: rank 1 raises at step 3"), out[-3000:]
    assert "ChildFailedError" not in out and "Traceback" not in out
    assert "each rank reads its shards" in out, "FSDP2 streamed the checkpoint into the shards"
    # The two steps before the fault equal the reference: the streamed weights are the checkpoint's.
    for step in (1, 2):
        assert _metrics(work)[step]["loss"] == pytest.approx(reference["metrics"][step]["loss"], rel=1e-5)
    rc, out = _train(work, _options(base, 1), cache, engine=["--fsdp"], resume="auto")
    _ok(rc, out, "FSDP2 resumed on 1 process")
    assert "accumulative_counts 2 instead of 1" in out
    _same_as_reference(work, reference)


@pytest.mark.slow
@pytest.mark.skipif(not has_deepspeed(), reason="DeepSpeed is not installed")
def test_zero2_one_process_resumes_on_two(reference, base, cache, tmp_path):
    engine = ["--deepspeed", "deepspeed_zero2"]
    rc, out = _train("deepspeed_zero2", _options(base, 2), cache, engine=engine, cwd=str(tmp_path))
    _ok(rc, out, "ZeRO-2 on 1 process (work dir named like the built-in config)")
    work = str(tmp_path / "deepspeed_zero2")
    _restart_from(work, 2)
    rc, out = _train("deepspeed_zero2", _options(base, 2), cache, nproc=2, engine=engine, resume="auto", cwd=str(tmp_path))
    _ok(rc, out, "ZeRO-2 resumed on 2 processes")
    assert "universal checkpoint" in out and "accumulative_counts 1 instead of 2" in out, out[-3000:]
    _same_as_reference(work, reference)


@pytest.mark.slow
@pytest.mark.skipif(not has_deepspeed(), reason="DeepSpeed is not installed")
def test_zero3_two_processes_resume_on_one(reference, base, cache, tmp_path):
    work = str(tmp_path / "work")
    engine = ["--deepspeed", "deepspeed_zero3"]
    rc, out = _train(work, _options(base, 1), cache, nproc=2, engine=engine)
    _ok(rc, out, "ZeRO-3 on 2 processes")
    assert "each rank read its partitions" in out, "ZeRO-3 streamed the checkpoint into its partitions"
    # Its first steps equal the reference: each rank read the right part of every weight.
    for step in (1, 2):
        assert _metrics(work)[step]["loss"] == pytest.approx(reference["metrics"][step]["loss"], rel=1e-5)
    _restart_from(work, 2)
    rc, out = _train(work, _options(base, 1), cache, engine=engine, resume="auto")
    _ok(rc, out, "ZeRO-3 resumed on 1 process")
    assert "universal checkpoint" in out and "accumulative_counts 2 instead of 1" in out, out[-3000:]
    _same_as_reference(work, reference)


@pytest.mark.slow
def test_a_global_batch_that_cannot_stay_is_refused(reference, base, cache, tmp_path, monkeypatch, capsys):
    """The checkpoint trained 2 packs a step; batch_size 4 cannot keep that on any number of processes."""
    from packtune.cli.main import main

    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PACKTUNE_CACHE", cache)
    path = os.path.join(reference["work"], "iter_2.pth")
    options = [*_options(base, 1), "batch_size=4"]
    code = main(["train", CONFIG, "--work-dir", str(tmp_path / "w"), "--resume", path, "--cfg-options", *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (
        f"packtune train: error: {path} was trained with 2 packs per step (batch_size 1 x accumulative_counts 2 x "
        "1 process); this run would take 4 (batch_size 4 x accumulative_counts 1 x 1 process). Resuming keeps the "
        "global batch: with batch_size 4, resume on no number of processes; on 1 process, set batch_size to 1 or 2 "
        "(accumulative_counts = 2 / batch_size)"
    ), err[-1]


# --- the geometry, without processes ---------------------------------------------------------------


def test_keep_global_batch():
    from packtune.recipe.step_plan import keep_global_batch

    meta = {"global_packs": 8, "world_size": 4, "settings": {"batch_size": 1, "accumulative_counts": 2}}
    assert keep_global_batch(meta, 1, 2, 4, "c") == 2  # unchanged
    assert keep_global_batch(meta, 1, 2, 2, "c") == 4 and keep_global_batch(meta, 1, 2, 8, "c") == 1  # scaled
    assert keep_global_batch(meta, 2, 2, 2, "c") == 2  # the user changed it and it still keeps 8: fine
    assert keep_global_batch({}, 3, 1, 5, "c") == 1  # written before the geometry was kept
    with pytest.raises(ValueError, match=r"Resuming keeps the global batch: with batch_size 1, resume on 1 process "
                       r"\(accumulative_counts = 8\) or 2 processes \(accumulative_counts = 4\) or 4 processes "
                       r"\(accumulative_counts = 2\) or 8 processes \(accumulative_counts = 1\)$"):
        keep_global_batch(meta, 1, 2, 3, "c")  # 3 processes cannot take 8 packs
    with pytest.raises(ValueError, match=r"set accumulative_counts = 4$"):
        keep_global_batch(meta, 1, 3, 2, "c")  # changed by hand to a wrong value on 2 processes


def test_data_position_is_kept_in_packs():
    """The position survives any split of the same global batch, across epochs and the
    short last step of an epoch; another dataset size is refused."""
    from packtune.recipe.step_plan import StepPlan

    class Packs(list):
        def epoch_order(self, epoch):
            return list(range(len(self)))

    data = Packs(range(10))  # 4 packs a step: 3 steps an epoch, the last with 2 packs
    plans = [StepPlan(data, b, a, w, 3, None) for b, a, w in ((1, 4, 1), (2, 1, 2), (1, 1, 4), (2, 2, 1))]
    for step in range(plans[0].total_steps + 1):
        positions = {plan.packs_consumed(step) for plan in plans}
        assert len(positions) == 1
        (packs,) = positions
        assert all(plan.step_after(packs) == step for plan in plans)
        assert plans[1].resume_step(plans[0].position(step) | {"step": step}, "c") == step
    assert [plans[0].packs_consumed(s) for s in range(5)] == [0, 4, 8, 10, 14]
    with pytest.raises(ValueError, match="not the end of a step"):
        plans[0].step_after(5)
    with pytest.raises(ValueError, match="trained on 12 packs an epoch, and the data now makes 10"):
        plans[0].resume_step({"packs_consumed": 4, "packs_per_epoch": 12, "step": 1}, "c")
