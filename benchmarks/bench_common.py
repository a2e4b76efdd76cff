"""Shared pieces of the benchmarks: settings, goals, the table row, timing, the machine.

Imported by ``bench.py`` (which sets ``OMP_WAIT_POLICY`` before torch loads) and
``bench_model.py``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import packtune  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
    import packtune  # noqa: F401

GOALS = {
    "attn_longtail": 6.0,  # varlen at least 6x faster than the dense block-diagonal mask
    "attn_uniform": 2.0,  # varlen at most 2x the ideal batched call
    "train_step": 3.3,  # at least 3.3x faster than transformers' padding-free sdpa path
    "memory_growth": 2.5,  # varlen growth per doubling of tokens: linear is 2.0, quadratic 4.0
}


@dataclasses.dataclass
class Settings:
    """Sizes and repeats of one run; ``full``, ``quick`` and ``smoke`` (tests) presets."""

    name: str
    pack_tokens: int = 4096
    long_docs: int = 25
    uniform_docs: int = 128
    uniform_len: int = 32
    heads: int = 8
    head_dim: int = 64
    attn_repeats: int = 7
    uniform_repeats: int = 15
    train_repeats: int = 5
    # The architecture of packtune's own tiny Llama demo (the tiny_llama_full_demo config),
    # with a 2,048-token vocabulary; ``real_vocab`` adds an info row with the demo's own
    # 32,000, where the output layer and the loss dominate the step.
    model: dict = dataclasses.field(
        default_factory=lambda: dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=2048,
        )
    )
    real_vocab: int | None = 32000
    memory_tokens: tuple[int, ...] = (4096, 8192, 16384)
    memory_layers: int = 2
    memory_max_doc: int = 2048
    memory_subprocess: bool = True
    plan_lengths: int = 1_000_000
    plan_max_length: int = 4096
    plan_repeats: int = 3

    @classmethod
    def preset(cls, name: str, device: str) -> Settings:
        if name == "full":
            return cls(name)
        if name == "quick":
            small_memory = (1024, 2048, 4096) if device == "cpu" else (4096, 8192, 16384)
            return cls(
                name, attn_repeats=3, uniform_repeats=5, train_repeats=2, real_vocab=None, memory_tokens=small_memory, plan_repeats=1
            )
        if name == "smoke":
            return cls(
                name,
                pack_tokens=512,
                long_docs=8,
                uniform_docs=16,
                uniform_len=16,
                heads=2,
                head_dim=16,
                attn_repeats=1,
                uniform_repeats=1,
                train_repeats=1,
                real_vocab=None,
                model=dict(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    num_key_value_heads=2,
                    vocab_size=64,
                ),
                memory_tokens=(256, 512),
                memory_layers=1,
                memory_max_doc=128,
                memory_subprocess=False,
                plan_lengths=5000,
                plan_max_length=512,
                plan_repeats=1,
            )
        raise ValueError(f"unknown preset {name!r}")


# ---------------------------------------------------------------------------------------------
# helpers


def longtail_lengths(total: int, docs: int, seed: int = 0, max_len: int | None = None, sigma: float = 1.0) -> list[int]:
    """``docs`` lognormal document lengths summing to exactly ``total`` (each in ``[1, max_len]``)."""
    rng = np.random.default_rng(seed)
    cap = max_len or total
    x = rng.lognormal(0.0, sigma, docs)
    lengths = np.clip(np.floor(x / x.sum() * total).astype(np.int64), 1, cap)
    # Hand out what flooring and capping left over, one token at a time to the shortest
    # documents with room (keeps the shape; never exceeds the cap).
    while lengths.sum() < total:
        room = np.flatnonzero(lengths < cap)
        if room.size == 0:
            raise ValueError(f"{docs} documents of at most {cap} tokens cannot hold {total}")
        need = int(total - lengths.sum())
        lengths[room[np.argsort(lengths[room], kind="stable")[:need]]] += 1
    while lengths.sum() > total:  # flooring cannot overshoot, the clip to >= 1 can
        lengths[int(np.argmax(lengths))] -= 1
    return [int(v) for v in lengths]


def cu_seqlens(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)


def block_diagonal_causal_mask(lengths, device) -> torch.Tensor:
    """``(1, 1, T, T)`` boolean: token ``i`` sees ``j <= i`` of its own document."""
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    pos = torch.arange(doc.numel(), device=device)
    return ((doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None]))[None, None]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, device: str, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every function, run in turns (A, B, A, B, ...) after a warm-up."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def best_ms(ts: list[float]) -> float:
    """The fastest of the repeats: on a shared machine, the one least slowed by others."""
    return min(ts) * 1e3


def summary(times: dict[str, list[float]]) -> dict:
    return {name: {"best_ms": best_ms(t), "median_ms": statistics.median(t) * 1e3, "all_ms": [x * 1e3 for x in t]} for name, t in times.items()}


def machine(device: str) -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?",
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = "not installed"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory"] = f"{int(line.split()[1]) / 2**20:.0f} GiB"
                break
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


@dataclasses.dataclass
class Row:
    """One line of the results table."""

    what: str
    ours: str
    baseline: str
    ratio: str
    goal: str = "-"
    result: str = "info"


