"""The benchmark's smallest path runs, and both sides of every comparison agree.

No timing is asserted: ``benchmarks/bench.py`` itself raises when packtune and a baseline
compute different outputs or losses, which is what this test is for.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("packtune_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("total,docs,cap", [(4096, 25, None), (16384, 100, 2048), (512, 8, 128), (7, 7, None)])
def test_longtail_lengths_sum_exactly(bench, total, docs, cap):
    lengths = bench.longtail_lengths(total, docs, seed=0, max_len=cap)
    assert sum(lengths) == total and len(lengths) == docs
    assert min(lengths) >= 1 and max(lengths) <= (cap or total)
    assert lengths == bench.longtail_lengths(total, docs, seed=0, max_len=cap)  # seeded


def test_block_diagonal_mask(bench):
    mask = bench.block_diagonal_causal_mask([2, 1], "cpu")[0, 0].int().tolist()
    assert mask == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_smallest_run_end_to_end(bench, tmp_path):
    torch.manual_seed(0)
    settings = bench.Settings.preset("smoke", "cpu")
    rows, details = bench.run(settings, "cpu", log=lambda *a, **k: None)
    table = bench.render(rows, bench.machine("cpu"), settings, "cpu", torch.float32, 0.0)
    # Every benchmark produced its rows, and every goal a verdict.
    assert table.count("\n| ") == len(rows) + 1
    assert sum(r.result in ("PASS", "FAIL") for r in rows) == 4
    assert "AMD" in table or "cores" in table
    # Same weights, same documents: the three training paths start from the same loss.
    losses = details["train_step"]["losses"]
    assert losses["padding_free"] == pytest.approx(losses["varlen"], rel=1e-4)
    assert losses["padded"] == pytest.approx(losses["varlen"], rel=1e-4)
    # The padded baseline really is one document per row, padded to the longest.
    lengths = details["attn_longtail"]["lengths"]
    assert details["train_step"]["padded_shape"] == [len(lengths), max(lengths)]
    assert set(details["memory"]) == {f"{k}@{t}" for k in ("varlen", "padding_free") for t in settings.memory_tokens}
    plan = details["plan"]
    assert plan["bfd"]["utilization"] >= plan["sequential"]["utilization"] > plan["none"]["utilization"]
    assert np.isclose(plan["none"]["packs"], settings.plan_lengths)


@pytest.mark.slow
def test_dpo_benchmark_smallest_run(tmp_path):
    """``benchmarks/bench_dpo.py`` end to end at its smallest: TRL's DPOTrainer and packtune on
    the same pairs, and the chunked and full-logit steps (which must give the same loss)."""
    pytest.importorskip("trl")
    path = BENCH.parent / "bench_dpo.py"
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("packtune_bench_dpo", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        out = tmp_path / "dpo.md"
        assert module.main(["--pairs", "8", "--batch", "4", "--max-length", "1024", "--memory-tokens", "1024",
                            "--in-process", "--out", str(out)]) == 0
    finally:
        sys.path.remove(str(BENCH.parent))
    table = out.read_text()
    assert table.count("| DPO ") == 2 and table.count("PASS") + table.count("FAIL") == 2
    import json

    details = json.loads(out.with_suffix(".json").read_text())
    assert details["trl"]["steps"] == 2 and details["packtune"]["steps"] == 2 and details["packtune"]["packs"] >= 2
    assert details["memory"]["chunked"]["loss"] == pytest.approx(details["memory"]["full"]["loss"], rel=1e-5)
