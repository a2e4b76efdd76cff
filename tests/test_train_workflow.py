"""The workflow through the CLI, in-process: train, convert, load in transformers, chat, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import TRAIN_OPTIONS, read_metrics
from packtune.cli.main import main

@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PACKTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _train(work: Path, *options: str, config: str = "tiny_mistral_full_demo", extra: tuple = ()) -> int:
    return main(["train", config, "--work-dir", str(work), *extra, "--cfg-options", *TRAIN_OPTIONS, *options])


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_train_convert_load_chat(tmp_path, capsys):
    work = tmp_path / "work"
    assert _train(work, "max_steps=4", "save_steps=2", "evaluation_inputs=['What sound does a cow make?']") == 0
    # Checkpoints, pointer, rotation.
    assert sorted(p.name for p in work.glob("iter_*.pth")) == ["iter_2.pth", "iter_4.pth"]
    assert (work / "last_checkpoint").read_text().strip() == str((work / "iter_4.pth").resolve())
    # Logs: one line per step, the documented fields, a loss curve and TensorBoard scalars.
    rows = read_metrics(work)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
        assert r["loss"] > 0 and r["tokens_per_s"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (work / "loss_curve.png").stat().st_size > 5000
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))
    evals = [json.loads(line) for line in (work / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["step"] == 4 and evals[-1]["answers"][0]["prompt"] == "What sound does a cow make?"

    hf = tmp_path / "hf"
    assert main(["convert", "pth_to_hf", "tiny_mistral_full_demo", str(work / "iter_4.pth"), str(hf), "--cfg-options", *TRAIN_OPTIONS]) == 0
    assert (hf / "model.safetensors").exists() and (hf / "generation_config.json").exists()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from packtune.config import load_settings
    from packtune.recipe.model_setup import load_base_model

    loaded = AutoModelForCausalLM.from_pretrained(hf)
    assert loaded.config._attn_implementation in ("sdpa", "eager")
    assert "packtune_attn_backend" not in json.loads((hf / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert len(tokenizer) == 32000 and tokenizer.chat_template
    trained = load_base_model(load_settings("tiny_mistral_full_demo", TRAIN_OPTIONS), torch.device("cpu"))
    trained.load_state_dict(_state(work / "iter_4.pth"))
    ids = tokenizer("Repeat after me: red river stone", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, rtol=1e-5, atol=1e-5)

    capsys.readouterr()
    assert main(["chat", str(hf), "--prompt", "What sound does a cow make?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_lora_run_gives_adapter_or_merged_model(tmp_path):
    work = tmp_path / "work"
    assert _train(work, "max_steps=2", "save_steps=2", "lora={'r': 4, 'alpha': 8}", "lr=1e-2") == 0
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    common = ["tiny_mistral_full_demo", str(work / "iter_2.pth")]
    opts = ["--cfg-options", *TRAIN_OPTIONS, "lora={'r': 4, 'alpha': 8}"]
    assert main(["convert", "pth_to_hf", *common, str(adapter), *opts]) == 0
    assert main(["convert", "pth_to_hf", *common, str(merged), "--merge", *opts]) == 0
    assert (adapter / "adapter_config.json").exists() and (adapter / "base_model" / "config.json").exists()

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    via_adapter = AutoPeftModelForCausalLM.from_pretrained(adapter)
    via_merge = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.tensor([[1, 851, 349, 264, 1369]])
    with torch.no_grad():
        torch.testing.assert_close(via_adapter(ids).logits, via_merge(ids).logits, rtol=1e-4, atol=1e-5)
    # The adapter trained something: the merged model differs from its base.
    base = AutoModelForCausalLM.from_pretrained(adapter / "base_model")
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, via_merge(ids).logits)
    later = tmp_path / "merged_later"
    assert main(["convert", "merge", str(adapter / "base_model"), str(adapter), str(later)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(later)(ids).logits, via_merge(ids).logits, rtol=1e-4, atol=1e-5)


def _spawn(work: Path, *options: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "packtune", "train", "tiny_mistral_full_demo", "--work-dir", str(work), "--cfg-options", *TRAIN_OPTIONS, *options]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_and_resume_ends_with_the_same_weights(tmp_path):
    options = ("max_steps=6", "save_steps=2", "lora=None")
    straight = tmp_path / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed run uses one thread too: same reduction order
    try:
        assert _train(straight, *options) == 0
        killed = tmp_path / "killed"
        proc = _spawn(killed, *options)
        deadline = time.time() + 300
        pointer = killed / "last_checkpoint"
        while time.time() < deadline and proc.poll() is None:
            if pointer.exists() and "iter_2" in pointer.read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert not (killed / "iter_6.pth").exists()
        assert main(["train", "tiny_mistral_full_demo", "--work-dir", str(killed), "--resume", "auto", "--cfg-options", *TRAIN_OPTIONS, *options]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = _state(straight / "iter_6.pth"), _state(killed / "iter_6.pth")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # The resumed run's log continues the interrupted one without duplicate steps.
    assert [r["step"] for r in read_metrics(killed)] == [1, 2, 3, 4, 5, 6]


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from packtune.recipe import checkpoint as ckpt

    work = tmp_path / "work"
    assert _train(work, "max_steps=2", "save_steps=1") == 0
    before = (work / "last_checkpoint").read_text()
    real_save = torch.save

    def dies_halfway(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # what a kill at this point leaves behind

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_torch_save({"x": 1}, str(work / "iter_3.pth"))
    monkeypatch.setattr(torch, "save", real_save)
    assert not (work / "iter_3.pth").exists()
    assert (work / "last_checkpoint").read_text() == before
    torch.load(ckpt.find_last(str(work)), weights_only=False)  # still loads
    ckpt.rotate(str(work), 2)
    assert not list(work.glob("*.tmp*"))


def test_rotation_keeps_the_new_checkpoint_beside_older_higher_steps(tmp_path):
    """A fresh run in a work dir holding iter_400/iter_500 of an earlier, longer run."""
    from packtune.recipe import checkpoint as ckpt

    work = str(tmp_path)
    for step in (400, 500):
        ckpt.atomic_torch_save({}, ckpt.checkpoint_path(work, step))
    for step in (100, 200):
        path = ckpt.checkpoint_path(work, step)
        ckpt.atomic_torch_save({}, path)
        ckpt.mark_last(work, path)
        ckpt.rotate(work, 2)
        assert ckpt.find_last(work) == path
    assert sorted(p.name for p in tmp_path.glob("iter_*.pth")) == ["iter_200.pth", "iter_500.pth"]
    ckpt.rotate(work, 1)
    assert [p.name for p in tmp_path.glob("iter_*.pth")] == ["iter_200.pth"]


def test_resume_at_the_last_step_repeats_nothing(tmp_path):
    work = tmp_path / "work"
    options = ("max_steps=2", "save_steps=1", "evaluation_inputs=['What sound does a cow make?']", "max_new_tokens=2")
    assert _train(work, *options) == 0
    saved = (work / "iter_2.pth").stat().st_mtime_ns
    assert _train(work, *options, extra=("--resume", "auto")) == 0
    assert (work / "iter_2.pth").stat().st_mtime_ns == saved
    assert [r["step"] for r in read_metrics(work)] == [1, 2]
    evals = [json.loads(line)["step"] for line in (work / "eval.jsonl").read_text().splitlines()]
    assert evals == [2]  # the final evaluation is redone, not appended a second time


def _nan_from_step(monkeypatch, bad_step: int):
    """Make the loss of one optimizer step NaN, as an overflow would."""
    from packtune.recipe import step as step_mod

    calls = {"n": 0}
    real = step_mod.forward_loss_sum  # the loss of one micro-batch, whichever loss head computes it

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == bad_step else value

    monkeypatch.setattr(step_mod, "forward_loss_sum", loss)


def test_non_finite_loss_stops_naming_the_step(tmp_path, capsys, monkeypatch):
    _nan_from_step(monkeypatch, bad_step=2)  # one micro-batch per step: step 2
    code = _train(tmp_path / "work", "max_steps=3", "save_steps=100")
    err = capsys.readouterr().err
    assert code == 1
    assert "NonFiniteLossError: non-finite loss at step 2 (packs [" in err and "on_nonfinite_loss" in err
    assert len(err.strip().splitlines()) == 1


def test_non_finite_loss_can_be_skipped(tmp_path, monkeypatch):
    _nan_from_step(monkeypatch, bad_step=2)
    work = tmp_path / "work"
    assert _train(work, "max_steps=3", "save_steps=100", "on_nonfinite_loss='skip'") == 0
    state = _state(work / "iter_3.pth")
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert [r["step"] for r in read_metrics(work)] == [1, 2, 3]


def test_config_errors_stop_before_any_model_loads(tmp_path, capsys):
    code = main(["train", "tiny_mistral_full_demo", "--work-dir", str(tmp_path / "w"), "--cfg-options",
                 "use_varlen_attn=True", "pack_to_max_length=False", "bach_size=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "did you mean `batch_size`" in err and "pack_to_max_length" in err
    assert not (tmp_path / "w").exists()


def test_fp16_loss_scale_overflow_is_skipped_not_an_error(tmp_path, monkeypatch):
    """A GradScaler (CUDA fp16) whose scale overflows skips the step; on_nonfinite_loss='error'
    must not stop the run for it. Simulated on the CPU with a scale that overflows at once."""
    from packtune.recipe.engines import plain as engine

    real_init = engine.PlainEngine.__init__

    def with_scaler(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        # Step 1 overflows; the backoff then lowers the scale to 2**7, which fits.
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-120)

    monkeypatch.setattr(engine.PlainEngine, "__init__", with_scaler)
    work = tmp_path / "work"
    assert _train(work, "max_steps=3", "save_steps=100", "evaluation_inputs=[]") == 0
    rows = read_metrics(work)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert not math.isfinite(rows[0]["grad_norm"]) and math.isfinite(rows[-1]["grad_norm"])
    state = _state(work / "iter_3.pth")
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_data_errors_are_one_line_exit_2(tmp_path, capsys):
    code = _train(tmp_path / "w1", f"dataset={str(tmp_path / 'missing.jsonl')!r}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no such file" in err[0] and "--debug" not in err[0]
    (tmp_path / "empty.jsonl").write_text('{"instruction": "hi", "output": "yo"}\n')
    code = _train(tmp_path / "w2", f"dataset={str(tmp_path / 'empty.jsonl')!r}", "max_length=2")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no trainable samples" in err[0] and "1 rows read" in err[0], err


def test_missing_resume_checkpoint_is_one_line(tmp_path, capsys):
    code = main(["train", "tiny_mistral_full_demo", "--work-dir", str(tmp_path / "w"), "--resume", str(tmp_path / "nope.pth"),
                 "--cfg-options", *TRAIN_OPTIONS, "max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no such checkpoint" in err[0]


@pytest.fixture
def pretrained_folder(tmp_path):
    """A tiny 'downloaded' model: config, weights and tokenizer in a local folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from packtune.data import load_tokenizer

    folder = tmp_path / "base"
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=32000, max_position_embeddings=256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_tokenizer("packtune://mistral-v1").save_pretrained(folder)
    return folder


def _pretrained_options(folder: Path) -> list[str]:
    rest = [o for o in TRAIN_OPTIONS if not o.startswith("model_config")]
    return [f"pretrained_model_name_or_path={str(folder)!r}", "model_config=None", "tokenizer_name_or_path=None", *rest]


def test_lora_on_a_pretrained_folder_saves_only_the_adapter(tmp_path, pretrained_folder):
    options = _pretrained_options(pretrained_folder) + ["lora={'r': 4}", "max_steps=2", "save_steps=2", "lr=1e-2"]
    work = tmp_path / "work"
    assert main(["train", "tiny_llama_lora_demo", "--work-dir", str(work), "--cfg-options", *options]) == 0
    state = _state(work / "iter_2.pth")
    assert state and all("lora_" in k for k in state)  # the frozen base is not copied into checkpoints
    adapter = tmp_path / "adapter"
    assert main(["convert", "pth_to_hf", "tiny_llama_lora_demo", str(work / "iter_2.pth"), str(adapter), "--cfg-options", *options]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(pretrained_folder)
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(adapter)


def test_qlora_on_cpu_is_one_clear_line(tmp_path, pretrained_folder, capsys):
    options = _pretrained_options(pretrained_folder) + ["lora={'r': 4, 'quantization': '4bit'}", "max_steps=1"]
    code = main(["train", "tiny_llama_lora_demo", "--work-dir", str(tmp_path / "w"), "--cfg-options", *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "QLoRA" in err[0] and "CUDA" in err[0]


def test_resume_from_another_engines_checkpoint_is_one_line(tmp_path, capsys):
    from packtune.recipe import checkpoint_folders

    folder = tmp_path / "iter_2.pth"
    folder.mkdir()
    checkpoint_folders.write_info(str(folder), engine="fsdp", full_state=True, state_keys=[], trainable=[], meta={"step": 2})
    code = main(["train", "tiny_mistral_full_demo", "--work-dir", str(tmp_path / "w"), "--resume", str(folder),
                 "--cfg-options", *TRAIN_OPTIONS, "max_steps=3"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading" not in line]
    assert code == 2 and len(err) == 1, err
    assert "written by fsdp" in err[0] and "this run uses single" in err[0]
