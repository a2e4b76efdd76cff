"""Benchmarks 3 and 4: a training step and peak memory of a small Llama."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import GOALS, ROOT, Row, Settings, best_ms, interleaved, longtail_lengths, summary, synchronize
from packtune.loss import target_weights, weighted_loss_sum
from packtune.packing.collate import collate_padded, collate_varlen
from packtune.packing.packs import TokenizedSamples, get_pack, layout_packs

BENCH = Path(__file__).resolve().parent / "bench.py"



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
    _, peak, exact, seconds = measure_peak(device, lambda: _loss(model, packed, inputs).backward())
    return {"kind": kind, "tokens": tokens, "mb": peak / 2**20, "exact": exact, "seconds": seconds, "max_doc": max(lengths)}


def measure_peak(device: str, fn):
    """``fn()`` once: its result, the growth of peak memory over it in bytes, whether that is
    exact (else a lower bound), and its seconds. Peak RSS on the CPU, allocated memory on CUDA."""
    before = memory_mark(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    seconds = time.perf_counter() - t0
    peak, exact = memory_peak(device, before)
    return out, peak, exact, seconds


def memory_mark(device: str) -> int:
    """Start a peak-memory measurement: reset the peak; returns the memory in use now."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _reset_peak_rss()


def memory_peak(device: str, before: int) -> tuple[int, bool]:
    """Bytes the peak grew since ``memory_mark`` returned ``before``, and whether exact."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() - before, True
    high, exact = _peak_rss()
    return high - before, exact


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
                cmd = [sys.executable, str(BENCH), "--memory-child", kind, str(tokens), "--device", device]
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


