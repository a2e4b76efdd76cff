"""``packtune train`` with ``method = 'dpo'`` end to end (issue 17, Exactness and Settings).

A tiny Llama in a folder is the starting checkpoint. One process with 2 accumulation steps,
the reference loaded from that folder (``ref_model``), is the baseline; the same global batch
must log the same loss, gradient norm, pairs and TRL metrics at both steps:

* with the frozen copy of the starting weights (``ref_model = None``), the same weights;
* with the reference's log-probs precomputed (``precompute_ref_log_probs = True``), and loaded
  from the data cache by a second run;
* on 2 processes under DDP, ZeRO-2 (with precomputed reference log-probs), ZeRO-3 and FSDP2 (1
  accumulation step each), and with ``sequence_parallel_size = 2`` (one data-parallel group of 2
  ranks, 2 accumulation steps).

SimPO, ORPO and a reward model each compare DDP on 2 processes with 1 process, the same way; and
a reference whose vocabulary differs stops ``train`` in one line with exit code 2.

Step 2 follows an update, so it also checks that every run applied the same one.
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import assert_ran, has_deepspeed, launch_env, read_metrics, run_command

CONFIG = "tiny_mistral_dpo_demo"
KEYS = ("loss", "grad_norm", "lr", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    from packtune.data import load_tokenizer

    path = tmp_path_factory.mktemp("base")
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=32000, max_position_embeddings=256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    load_tokenizer("packtune://mistral-v1").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("packtune_cache"))


def _options(folder: str, *extra: str) -> list[str]:
    return [f"pretrained_model_name_or_path={folder!r}", "model_config=None", "tokenizer_name_or_path=None", "max_steps=2",
            "log_steps=1", "save_steps=100", "batch_size=1", "max_length=128", "evaluation_inputs=[]", "max_samples=48",
            "lr=1e-2", "warmup_ratio=0.0", *extra]


def _run(work: str, options: list[str], engine: list[str] = (), nproc: int | None = None,
         cache: str = "") -> tuple[int, str]:
    cmd = [sys.executable, "-m", "packtune", "train", CONFIG, "--work-dir", work, *engine, "--cfg-options", *options]
    rc, out, _ = run_command(cmd, launch_env(cache, **({"NPROC_PER_NODE": str(nproc)} if nproc else {})))
    return rc, out


def _train(work: str, options: list[str], engine: list[str] = (), nproc: int | None = None, cache: str = "",
           log: list[str] | None = None) -> list[dict]:
    rc, out = _run(work, options, engine, nproc, cache)
    assert_ran(rc, out, " ".join(options))
    if log is not None:
        log.append(out)
    return read_metrics(work)


def _same(got: list[dict], want: list[dict], rel: float = 1e-5) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for a, b in zip(got, want):
        assert a["pairs"] == b["pairs"] and a["tokens"] == b["tokens"], "different pairs in the step"
        for key in KEYS:
            if key == "rewards/accuracies" and a["step"] == 1:
                # At step 1 the policy is its reference: every reward is 0 up to float noise
                # (1e-7 under FSDP2), and a tie's noise decides the accuracy. The rewards are compared.
                continue
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), f"step {a['step']} {key}: {a[key]} vs {b[key]}"


@pytest.fixture(scope="module")
def baseline(folder, cache, tmp_path_factory) -> list[dict]:
    work = str(tmp_path_factory.mktemp("one"))
    metrics = _train(work, _options(folder, f"ref_model={folder!r}", "accumulative_counts=2"), cache=cache)
    assert metrics[1]["rewards/margins"] != 0.0  # the policy moved away from its reference
    return metrics


@pytest.mark.slow
def test_frozen_copy_matches(baseline, folder, cache, tmp_path):
    _same(_train(str(tmp_path), _options(folder, "accumulative_counts=2"), cache=cache), baseline)


@pytest.mark.slow
def test_precomputed_reference_matches_and_is_cached(baseline, folder, cache, tmp_path):
    """The first run computes the reference's log-probs and caches them with the pairs; a second
    run (another work dir, the same pairs and starting weights) loads them: the same steps."""
    options = _options(folder, "accumulative_counts=2", "precompute_ref_log_probs=True")
    logs: list[str] = []
    for run in ("first", "second"):
        _same(_train(str(tmp_path / run), options, cache=cache, log=logs), baseline)
    assert "reference log-probs of 48 pairs precomputed" in logs[0], logs[0][-3000:]
    assert "reference log-probs of 48 pairs loaded from the data cache" in logs[1], logs[1][-3000:]


ENGINES = {
    "ddp": ([], ["accumulative_counts=1"]),
    # With the reference's log-probs precomputed: the ranks agree on loading or computing them.
    "zero2": (["--deepspeed", "deepspeed_zero2"], ["accumulative_counts=1", "precompute_ref_log_probs=True"]),
    "zero3": (["--deepspeed", "deepspeed_zero3"], ["accumulative_counts=1"]),
    "fsdp": (["--fsdp"], ["accumulative_counts=1"]),
    "sequence_parallel": ([], ["accumulative_counts=2", "sequence_parallel_size=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_match_one(engine, baseline, folder, cache, tmp_path, monkeypatch):
    if engine.startswith("zero") and not has_deepspeed():
        pytest.skip("DeepSpeed is not installed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    args, extra = ENGINES[engine]
    got = _train(str(tmp_path), _options(folder, f"ref_model={folder!r}", *extra), args, nproc=2, cache=cache)
    # DeepSpeed computes the gradient norm itself (see tests/test_distributed.py): rel 3e-4 there.
    _same(got, baseline, rel=3e-4 if engine.startswith("zero") else 1e-5)


#: The other methods (reference-free), each on DDP, 2 processes: a step's pairs are counted over
#: both ranks (at step 1 the ranks hold 3 and 4 of its 7 pairs, so a per-rank mean would differ).
METHODS = {
    "simpo": (["method='simpo'"], KEYS),
    "orpo": (["method='orpo'"], KEYS),
    "reward": (["method='reward'", "beta=0.1"], ("loss", "grad_norm", "lr", "accuracy", "margin")),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_other_methods_on_two_processes_match_one(method, folder, cache, tmp_path):
    extra, keys = METHODS[method]
    one = _train(str(tmp_path / "one"), _options(folder, *extra, "accumulative_counts=2"), cache=cache)
    two = _train(str(tmp_path / "two"), _options(folder, *extra, "accumulative_counts=1"), nproc=2, cache=cache)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(two, one):
        assert a["pairs"] == b["pairs"] and a["tokens"] == b["tokens"], "different pairs in the step"
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), f"{method} step {a['step']} {key}: {a[key]} vs {b[key]}"
    assert one[1]["loss"] != pytest.approx(one[0]["loss"], rel=1e-3)  # the first step moved the model


@pytest.mark.slow
def test_reference_of_another_vocabulary_is_refused_by_train(folder, cache, tmp_path):
    """``check_same_vocabulary`` through a real run: one line, exit code 2, before any step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from packtune.data import load_tokenizer

    other = tmp_path / "ref"
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=32064, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    load_tokenizer("packtune://mistral-v1").save_pretrained(other)
    rc, out = _run(str(tmp_path / "work"), _options(folder, f"ref_model={str(other)!r}"), cache=cache)
    last = [line for line in out.splitlines() if line.strip()][-1]
    assert rc == 2, out[-3000:]
    assert last == (f"packtune train: error: ref_model {str(other)!r} has a vocabulary of 32064 tokens, the policy 32000: "
                    "a reference must share the policy's tokenizer"), out[-3000:]
    assert "Traceback" not in out and not (tmp_path / "work" / "metrics.jsonl").exists()
