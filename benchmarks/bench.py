#!/usr/bin/env python
"""packtune benchmarks: one markdown table of ratios, each measured side by side in one run.

    python benchmarks/bench.py                      # full run, CPU (a few minutes on 2 cores)
    python benchmarks/bench.py --quick              # fewer repeats, smaller memory sizes
    python benchmarks/bench.py --quick --device cuda  # GPU check (bf16, every CUDA backend)

What is compared (every baseline is the real thing, never a weakened one):

1. **Attention, long-tailed pack**: forward + backward of ``varlen_attn_func`` over a
   4096-token pack of 25 long-tailed documents, against one dense SDPA call with a real
   ``(T, T)`` block-diagonal causal boolean mask (what stacks without varlen kernels run).
2. **Attention, 128 x 32 tokens**: ``varlen_attn_func`` against the ideal, one batched causal
   SDPA call over the same documents as a ``(128, heads, 32, dim)`` batch.
3. **Training step** (forward, backward, AdamW) of a small Llama on one 4096-token pack:
   ``attn_implementation="packtune_varlen"`` against transformers' own padding-free path
   (``attn_implementation="sdpa"``, ``position_ids`` restarting, no mask, no cache: it builds a
   ``T x T`` block-diagonal mask) and against padded batching (one document per row, padded
   to the longest, with a 2-D ``attention_mask``). Same weights, same loss, checked equal.
4. **Peak memory** of a forward + backward at 4k/8k/16k tokens per pack, each in a fresh
   process (peak RSS growth on CPU, ``max_memory_allocated`` on CUDA): varlen must grow
   linearly (8k/4k and 16k/8k ratios near 2), the dense mask path grows towards 4.
5. **pack_plan** on 1M long-tailed lengths: time, and utilization per strategy.

Timings are interleaved (A, B, A, B, ...) after a warm-up and summarised by their median, so
that noise from other processes hits both sides alike. Every comparison first checks that
both sides compute the same result. ``--out`` saves the table with a description of the
machine (CPU model, cores, versions, date).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# libgomp's default spin-wait turns every parallel region into a scheduler time slice (~4 ms)
# as soon as another process wants the same cores: on a shared 2-core machine a ``cat`` of 8 MB
# took 15 ms instead of 0.4. Passive waiting removes that; it is set before torch loads its
# OpenMP runtime, applies to both sides of every comparison, and an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
try:
    import packtune  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
    import packtune  # noqa: F401

from packtune.attention import backends as _backends  # noqa: E402
from packtune.attention.varlen import varlen_attn_func  # noqa: E402
from packtune.loss import target_weights, weighted_loss_sum  # noqa: E402
from packtune.packing.collate import collate_padded, collate_varlen  # noqa: E402
from packtune.packing.packs import TokenizedSamples, get_pack, layout_packs  # noqa: E402
from packtune.packing.plan import pack_plan  # noqa: E402

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
    # The architecture of packtune's own tiny Llama demo (configs/tiny_llama_full_demo.py),
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


# ---------------------------------------------------------------------------------------------
# 1 + 2: attention


def _attn_inputs(lengths, heads, head_dim, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(total, heads, head_dim, generator=g).to(device, dtype)
    return q, k, v, grad


def _fwd_bwd(fn, inputs, grad):
    def step():
        for t in inputs:
            t.grad = None
        fn().backward(grad)

    return step


def _probe(device: str, dtype, head_dim: int = 64):
    """The request a causal fwd+bwd of these benchmarks makes (to ask which backends can run it)."""
    from packtune.attention.varlen import AttnRequest

    return AttnRequest(
        device_type=device, dtype=dtype, causal=True, window=(-1, -1), softcap=0.0, dropout_p=0.0, alibi=False,
        return_lse=False, head_dim=head_dim, v_head_dim=head_dim, gqa=False, needs_grad=True,
    )  # fmt: skip


def _varlen_backends(device: str, head_dim: int) -> list[str]:
    """The backends to time: ``auto`` on CPU; on CUDA every one this machine can run, best first."""
    if device != "cuda":
        return ["auto"]
    req = _probe(device, torch.bfloat16, head_dim)
    return [name for name in ("flash_attn", "torch", "sdpa") if _backends.unsupported(name, req) is None]


def _backend_label(backend: str, device: str, dtype) -> str:
    name = _backends.choose(_probe(device, dtype), "auto") if backend == "auto" else backend
    return f"{name} backend"


def _check_close(name: str, ours: torch.Tensor, ref: torch.Tensor, dtype) -> float:
    err = float((ours.float() - ref.float()).abs().max())
    tol = 2e-5 if dtype == torch.float32 else 5e-2  # a leak or a wrong mask is off by ~1
    if not err <= tol:
        raise AssertionError(f"{name}: packtune and the baseline disagree (max abs diff {err:.3g} > {tol})")
    return err


def bench_attention(s: Settings, device: str, dtype) -> tuple[list[Row], dict]:
    rows, details = [], {}
    H, D = s.heads, s.head_dim
    shape = f"{H} heads x {D}, {str(dtype).replace('torch.', '')}"
    backends = _varlen_backends(device, D)

    # 1. long-tailed pack vs dense block-diagonal mask.
    lengths = longtail_lengths(s.pack_tokens, s.long_docs, seed=0)
    q, k, v, grad = _attn_inputs(lengths, H, D, device, dtype)
    cu = cu_seqlens(lengths, device)
    mask = block_diagonal_causal_mask(lengths, device)
    T = sum(lengths)

    def dense():
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask)
        return out[0].transpose(0, 1)

    def varlen(backend):
        return lambda: varlen_attn_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True, backend=backend)

    with torch.no_grad():
        ref = dense()
        for b in backends:
            _check_close(f"varlen[{b}] vs dense mask", varlen(b)(), ref, dtype)
    fns = {f"varlen[{b}]": _fwd_bwd(varlen(b), (q, k, v), grad) for b in backends}
    fns["dense"] = _fwd_bwd(dense, (q, k, v), grad)
    times = interleaved(fns, s.attn_repeats, device)
    base = best_ms(times["dense"])
    stats = f"{len(lengths)} docs, {min(lengths)}-{max(lengths)} tokens (median {int(np.median(lengths))})"
    details["attn_longtail"] = {"lengths": lengths, "times": summary(times)}
    for b in backends:
        ours = best_ms(times[f"varlen[{b}]"])
        ratio = base / ours
        is_goal = b == backends[0]
        rows.append(
            Row(
                f"attention fwd+bwd, {T}-token pack of {stats}; {shape}",
                f"{ours:.1f} ms (`varlen_attn_func`, {_backend_label(b, device, dtype)})",
                f"{base:.1f} ms (dense SDPA, {T}x{T} block-diagonal causal bool mask)",
                f"**{ratio:.1f}x** faster",
                f">= {GOALS['attn_longtail']:g}x" if is_goal else "-",
                ("PASS" if ratio >= GOALS["attn_longtail"] else "FAIL") if is_goal else "info",
            )
        )

    # 2. many short documents vs the ideal batched call.
    n, L = s.uniform_docs, s.uniform_len
    lengths = [L] * n
    q, k, v, grad = _attn_inputs(lengths, H, D, device, dtype, seed=1)
    cu = cu_seqlens(lengths, device)

    def ideal():
        out = F.scaled_dot_product_attention(*(t.view(n, L, H, D).transpose(1, 2) for t in (q, k, v)), is_causal=True)
        return out.transpose(1, 2).reshape(n * L, H, D)

    with torch.no_grad():
        ref = ideal()
        for b in backends:
            _check_close(f"varlen[{b}] vs batched SDPA", varlen(b)(), ref, dtype)
    fns = {f"varlen[{b}]": _fwd_bwd(varlen(b), (q, k, v), grad) for b in backends}
    fns["ideal"] = _fwd_bwd(ideal, (q, k, v), grad)
    times = interleaved(fns, s.uniform_repeats, device)
    base = best_ms(times["ideal"])
    details["attn_uniform"] = {"times": summary(times)}
    for b in backends:
        ours = best_ms(times[f"varlen[{b}]"])
        ratio = ours / base
        is_goal = b == backends[0]
        rows.append(
            Row(
                f"attention fwd+bwd, {n} docs x {L} tokens; {shape}",
                f"{ours:.1f} ms (`varlen_attn_func`, {_backend_label(b, device, dtype)})",
                f"{base:.1f} ms (one batched causal SDPA call over ({n}, {H}, {L}, {D}): the ideal)",
                f"**{ratio:.2f}x** the ideal",
                f"<= {GOALS['attn_uniform']:g}x" if is_goal else "-",
                ("PASS" if ratio <= GOALS["attn_uniform"] else "FAIL") if is_goal else "info",
            )
        )
    return rows, details


# ---------------------------------------------------------------------------------------------
# 3 + 4: a small Llama


def _llama_config(s: Settings, layers: int | None = None, max_positions: int = 32768):
    from transformers import LlamaConfig

    model = dict(s.model)
    if layers is not None:
        model["num_hidden_layers"] = layers
    return LlamaConfig(
        **model,
        max_position_embeddings=max_positions,
        attention_dropout=0.0,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
    )


def _make_model(cfg, attn: str, device: str, dtype, state=None):
    from transformers import AutoModelForCausalLM

    # from_config(..., attn_implementation=...) writes into the config it is given: one copy each.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).train()


def _samples(lengths, vocab: int, seed: int = 0) -> TokenizedSamples:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=sum(lengths))
    return TokenizedSamples(ids, ids.copy(), np.concatenate([[0], np.cumsum(lengths)]))


def _batches(lengths, vocab: int, device: str):
    """The same documents as one varlen pack and as a padded batch (one document per row)."""
    samples = _samples(lengths, vocab)
    total = sum(lengths)
    layout, _ = layout_packs(samples, max_length=total, strategy="sequential")
    assert len(layout) == 1, "the documents must fill exactly one pack"
    packed = collate_varlen([get_pack(samples, layout, 0)]).to(device)
    layout, _ = layout_packs(samples, max_length=max(lengths), strategy="none")
    padded = collate_padded([get_pack(samples, layout, p) for p in range(len(layout))]).to(device)
    return packed, padded


def _loss(model, batch, inputs):
    logits = model(**inputs).logits
    targets, weights = target_weights(batch.labels, batch.cu_seqlens)
    return weighted_loss_sum(logits, targets, weights) / weights.sum()


def _inputs(batch, kind: str) -> dict:
    if kind == "varlen":
        return batch.model_inputs()  # position_ids and cu_seq_lens, no mask
    if kind == "padding_free":
        # transformers' own padding-free path: restarting position_ids, no mask, no cache.
        return {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
    return {**batch.model_inputs(), "use_cache": False}  # padded rows with a 2-D attention_mask


def bench_train_step(s: Settings, device: str, dtype) -> tuple[list[Row], dict]:
    rows, details = _train_step(s, device, dtype, s.model, with_padded=True, repeats=s.train_repeats, goal=True)
    if s.real_vocab:
        model = {**s.model, "vocab_size": s.real_vocab}
        more, info = _train_step(s, device, dtype, model, with_padded=False, repeats=max(2, s.train_repeats // 2), goal=False)
        rows += more
        details["train_step_real_vocab"] = info["train_step"]
    return rows, details


def _train_step(s: Settings, device: str, dtype, model_cfg: dict, with_padded: bool, repeats: int, goal: bool):
    torch.manual_seed(0)
    cfg = _llama_config(dataclasses.replace(s, model=model_cfg))
    lengths = longtail_lengths(s.pack_tokens, s.long_docs, seed=0)
    packed, padded = _batches(lengths, cfg.vocab_size, device)
    state = _make_model(cfg, "sdpa", "cpu", torch.float32).state_dict()
    setups = {"varlen": ("packtune_varlen", packed), "padding_free": ("sdpa", packed)}
    if with_padded:
        setups["padded"] = ("sdpa", padded)
    models, optims = {}, {}
    for name, (attn, _) in setups.items():
        models[name] = _make_model(cfg, attn, device, dtype, state)
        optims[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)

    with torch.no_grad():
        losses = {name: float(_loss(models[name], batch, _inputs(batch, name))) for name, (_, batch) in setups.items()}
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, value in losses.items():
        if abs(value - losses["varlen"]) > tol * max(1.0, abs(losses["varlen"])):
            raise AssertionError(f"training step: loss of {name} ({value:.6f}) differs from varlen ({losses['varlen']:.6f})")

    def step(name):
        model, opt, (_, batch) = models[name], optims[name], setups[name]
        inputs = _inputs(batch, name)

        def run():
            _loss(model, batch, inputs).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    times = interleaved({name: step(name) for name in setups}, repeats, device)
    ms = {name: best_ms(t) for name, t in times.items()}
    m = model_cfg
    kv = f" ({m['num_key_value_heads']} kv)" if m.get("num_key_value_heads", m["num_attention_heads"]) != m["num_attention_heads"] else ""
    desc = (
        f"Llama {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads{kv}, "
        f"vocab {m['vocab_size']:,}, {str(dtype).replace('torch.', '')}"
    )
    free_ratio = ms["padding_free"] / ms["varlen"]
    what = f"training step (fwd, bwd, AdamW), one {sum(lengths)}-token pack of {len(lengths)} docs; {desc}"
    if not goal:
        what = f"same training step with the demo's real vocabulary; {desc}"
    rows = [
        Row(
            what,
            f"{ms['varlen']:.0f} ms (`packtune_varlen`)",
            f"{ms['padding_free']:.0f} ms (transformers `sdpa`, padding-free: position_ids, no mask, no cache)",
            f"**{free_ratio:.1f}x** faster",
            f">= {GOALS['train_step']:g}x" if goal else "-",
            ("PASS" if free_ratio >= GOALS["train_step"] else "FAIL") if goal else "info",
        )
    ]
    if with_padded:
        rows.append(
            Row(
                "training step, same documents and model",
                f"{ms['varlen']:.0f} ms (`packtune_varlen`)",
                f"{ms['padded']:.0f} ms (transformers `sdpa`, {len(lengths)} rows padded to {max(lengths)}, attention_mask)",
                f"**{ms['padded'] / ms['varlen']:.1f}x** faster",
            )
        )
    return rows, {"train_step": {"times": summary(times), "losses": losses, "padded_shape": list(padded.input_ids.shape), "model": m}}


def memory_child(s: Settings, kind: str, tokens: int, device: str, dtype) -> dict:
    """Peak memory growth of one forward + backward (run in a fresh process for a clean peak)."""
    torch.manual_seed(0)
    cfg = _llama_config(s, layers=s.memory_layers, max_positions=max(tokens, 32))
    attn = "packtune_varlen" if kind == "varlen" else "sdpa"
    model = _make_model(cfg, attn, device, dtype)
    docs = max(1, round(tokens / (s.pack_tokens / s.long_docs)))
    lengths = longtail_lengths(tokens, docs, seed=1, max_len=s.memory_max_doc)
    packed, _ = _batches(lengths, cfg.vocab_size, device)
    inputs = _inputs(packed, kind)
    # Warm up on a small pack (kernels, allocator, lazy inits), then measure the big one.
    small, _ = _batches([8, 8], cfg.vocab_size, device)
    _loss(model, small, _inputs(small, kind)).backward()
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_peak_rss()
    t0 = time.perf_counter()
    _loss(model, packed, inputs).backward()
    synchronize(device)
    seconds = time.perf_counter() - t0
    if device == "cuda":
        peak, exact = torch.cuda.max_memory_allocated() - before, True
    else:
        high, exact = _peak_rss()
        peak = high - before
    return {"kind": kind, "tokens": tokens, "mb": peak / 2**20, "exact": exact, "seconds": seconds, "max_doc": max(lengths)}


def _status(field: str) -> int | None:
    """A ``/proc/self/status`` memory field in bytes (``None`` where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_PEAK = {"reset": False, "before": 0}


def _reset_peak_rss() -> int:
    """Reset the process's peak RSS to its current RSS (Linux ``clear_refs``); the current RSS.

    ``getrusage``'s ``ru_maxrss`` cannot be used as is: it is never reset, and on Linux it even
    keeps the peak of the parent process from before ``exec``.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _PEAK["reset"] = True
    except OSError:
        _PEAK["reset"] = False
        _PEAK["before"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    now = _status("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> tuple[int, bool]:
    """Peak RSS since ``_reset_peak_rss``, and whether it is exact (else: a lower bound)."""
    if _PEAK["reset"]:
        high = _status("VmHWM")
        if high is not None:
            return high, True
    high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return high, high > _PEAK["before"]


def bench_memory(s: Settings, device: str, dtype, args) -> tuple[list[Row], dict]:
    results = {}
    for kind in ("varlen", "padding_free"):
        for tokens in s.memory_tokens:
            if s.memory_subprocess:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", kind, str(tokens), "--device", device]
                cmd += ["--preset", s.name] + (["--threads", str(args.threads)] if args.threads else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
                if proc.returncode != 0:
                    raise RuntimeError(f"memory child {kind} {tokens} failed:\n{proc.stderr[-3000:]}")
                results[(kind, tokens)] = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                results[(kind, tokens)] = memory_child(s, kind, tokens, device, dtype)
    sizes = s.memory_tokens

    def fmt(kind):
        return " / ".join(f"{results[(kind, t)]['mb']:.0f}" for t in sizes) + " MB"

    def growth(kind):
        return [results[(kind, b)]["mb"] / max(results[(kind, a)]["mb"], 1e-9) for a, b in zip(sizes, sizes[1:])]

    g_ours, g_base = growth("varlen"), growth("padding_free")
    label = "/".join(f"{t // 1024}k" if t >= 1024 else str(t) for t in sizes)
    inexact = [f"{k}@{t}" for (k, t), r in results.items() if not r["exact"]]
    what = (
        f"peak memory of fwd+bwd at {label} tokens per pack ({s.memory_layers}-layer Llama, docs <= {s.memory_max_doc}); "
        + ("GPU `max_memory_allocated`" if device == "cuda" else "peak RSS growth, fresh process each")
    )
    growth_txt = lambda g: ", ".join(f"{x:.2f}" for x in g)  # noqa: E731
    ok = all(x <= GOALS["memory_growth"] for x in g_ours)
    rows = [
        Row(
            what,
            f"{fmt('varlen')} (`packtune_varlen`); growth per doubling {growth_txt(g_ours)}",
            f"{fmt('padding_free')} (transformers `sdpa`, padding-free T x T mask); growth {growth_txt(g_base)}",
            f"{results[('padding_free', sizes[-1])]['mb'] / max(results[('varlen', sizes[-1])]['mb'], 1e-9):.1f}x less at {label.split('/')[-1]}",
            f"linear: growth <= {GOALS['memory_growth']:g} (2 = linear, 4 = quadratic)",
            "PASS" if ok else "FAIL",
        )
    ]
    if inexact:
        rows[0].what += f" (peak not above an earlier one for {', '.join(inexact)}: a lower bound)"
    details = {f"{k}@{t}": r for (k, t), r in results.items()}
    return rows, {"memory": details}


def _pythonpath() -> str:
    parts = [str(ROOT / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(parts)


# ---------------------------------------------------------------------------------------------
# 5: pack_plan


def bench_plan(s: Settings) -> tuple[list[Row], dict]:
    rng = np.random.default_rng(0)
    # Long-tailed like chat/instruction data: median ~ max_length / 16, a tail to max_length.
    lengths = np.clip(rng.lognormal(np.log(s.plan_max_length / 16), 1.0, s.plan_lengths), 1, s.plan_max_length).astype(np.int64)
    out, details = [], {}
    util = {}
    for strategy in ("bfd", "sequential"):
        ts = []
        for _ in range(s.plan_repeats):
            t0 = time.perf_counter()
            plan = pack_plan(lengths, s.plan_max_length, strategy)
            ts.append(time.perf_counter() - t0)
        assert sorted(i for p in plan for i in p) == list(range(lengths.size))
        util[strategy] = (float(lengths.sum()) / (len(plan) * s.plan_max_length), len(plan), min(ts))
    util["none"] = (float(lengths.mean()) / s.plan_max_length, lengths.size, 0.0)
    n_txt = f"{s.plan_lengths / 1e6:g}M" if s.plan_lengths >= 1e6 else f"{s.plan_lengths:,}"
    out.append(
        Row(
            f"`pack_plan` on {n_txt} long-tailed lengths (lognormal, median {int(np.median(lengths))}, max {s.plan_max_length})",
            f"bfd {util['bfd'][2]:.2f} s",
            f"sequential {util['sequential'][2]:.2f} s",
            "-",
        )
    )
    out.append(
        Row(
            "pack utilization (tokens / pack capacity), same lengths",
            f"bfd **{util['bfd'][0]:.3%}** ({util['bfd'][1]:,} packs)",
            f"sequential {util['sequential'][0]:.3%} ({util['sequential'][1]:,} packs); "
            f"no packing (one sample per {s.plan_max_length}-token row) {util['none'][0]:.3%}",
            "-",
        )
    )
    details["plan"] = {k: {"utilization": v[0], "packs": v[1], "seconds": v[2]} for k, v in util.items()}
    return out, details


# ---------------------------------------------------------------------------------------------
# the table


def render(rows: list[Row], info: dict, s: Settings, device: str, dtype, seconds: float) -> str:
    lines = [
        f"## Benchmarks ({device.upper()}, `{s.name}` run)",
        "",
        "| Benchmark | packtune | Baseline | Ratio | Goal | Result |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.what} | {r.ours} | {r.baseline} | {r.ratio} | {r.goal} | {r.result} |")
    goal_rows = [r for r in rows if r.result in ("PASS", "FAIL")]
    passed = sum(r.result == "PASS" for r in goal_rows)
    hw = (
        info["cpu"] + f", {info['cores']} cores ({info['torch_threads']} torch threads, OMP_WAIT_POLICY={info['omp_wait_policy']}), "
        f"{info.get('memory', '?')} RAM, load average {info['load_average']} (1/5/15 min) at the end of the run"
    )
    if device == "cuda":
        hw = f"{info['gpu']} (CUDA {info['cuda']}); host {hw}"
    lines += [
        "",
        f"Goals met: {passed}/{len(goal_rows)}. Measured on {hw}; Python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}, numpy {info['numpy']}; {info['date']}; whole run {seconds:.0f} s.",
        "",
        f"Each time is the best of {s.attn_repeats} (attention, long-tailed), {s.uniform_repeats} "
        f"(attention, {s.uniform_docs} x {s.uniform_len}) and {s.train_repeats} (training step) runs, the contenders "
        "taking turns after one warm-up, so that other load on the machine hits all alike (medians and every run "
        f"are in the .json next to this file); {str(dtype).replace('torch.', '')} on {device}. Both sides of every "
        "ratio are first checked to compute the same output (or loss). "
        "Reproduce with `python benchmarks/bench.py" + (" --quick" if s.name == "quick" else "") + (" --device cuda" if device == "cuda" else "") + "`.",
    ]
    return "\n".join(lines) + "\n"


def run(s: Settings, device: str = "cpu", args=None, log=print) -> tuple[list[Row], dict]:
    """Every benchmark; returns the table rows and the raw numbers."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows, details = [], {}
    for name, fn in (
        ("attention", lambda: bench_attention(s, device, dtype)),
        ("training step", lambda: bench_train_step(s, device, dtype)),
        ("memory", lambda: bench_memory(s, device, dtype, args or argparse.Namespace(threads=None))),
        ("pack_plan", lambda: bench_plan(s)),
    ):
        t0 = time.perf_counter()
        r, d = fn()
        rows += r
        details.update(d)
        log(f"[bench] {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return rows, details


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller memory sizes (CI, GPU check)")
    parser.add_argument("--out", type=Path, help="also save the markdown table here (and the raw numbers next to it as .json)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a goal fails")
    parser.add_argument("--preset", choices=("full", "quick", "smoke"), help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", nargs=2, metavar=("KIND", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    preset = args.preset or ("quick" if args.quick else "full")
    s = Settings.preset(preset, args.device)
    if args.memory_child:
        kind, tokens = args.memory_child
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        print(json.dumps(memory_child(s, kind, int(tokens), args.device, dtype)))
        return 0
    t0 = time.perf_counter()
    rows, details = run(s, args.device, args)
    info = machine(args.device)
    table = render(rows, info, s, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32, time.perf_counter() - t0)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "settings": dataclasses.asdict(s), **details}, indent=1, default=str) + "\n")
    return 1 if args.strict and any(r.result == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
