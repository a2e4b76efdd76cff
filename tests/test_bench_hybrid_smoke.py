"""``benchmarks/bench_hybrid.py`` runs end to end at a tiny size, and both sides agree.

No timing is asserted: the benchmark raises when the packed and padded training steps give
different losses, or its scan over one document differs from transformers' own.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_hybrid.py"


def test_smallest_run_end_to_end():
    spec = importlib.util.spec_from_file_location("packtune_bench_hybrid", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        result = module.run(module.HybridSettings.smoke(), "cpu", torch.float32)
    finally:
        sys.modules.pop(spec.name, None)
    lengths = result["lengths"]
    assert sum(lengths) == 300 and len(lengths) == 6
    assert result["step"]["padded_shape"] == [len(lengths), max(lengths)]
    assert result["step"]["losses"]["packed"] == result["step"]["losses"]["packed"]  # not NaN
    table = module.render(result)
    assert table.count("PASS") + table.count("FAIL") == 2
