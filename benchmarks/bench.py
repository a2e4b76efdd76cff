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
6. **Real chat samples** (when ``../shared/data`` is present): packs of the 1,299 alpaca and
   glaive tool-call samples with bfd against the lower bound ``ceil(tokens / max_length)``.

Timings are interleaved (A, B, A, B, ...) after a warm-up and summarised by their median, so
that noise from other processes hits both sides alike. Every comparison first checks that
both sides compute the same result. ``--out`` saves the table with a description of the
machine (CPU model, cores, versions, date).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

# libgomp's default spin-wait turns every parallel region into a scheduler time slice (~4 ms)
# as soon as another process wants the same cores: on a shared 2-core machine a ``cat`` of 8 MB
# took 15 ms instead of 0.4. Passive waiting removes that; it is set before torch loads its
# OpenMP runtime, applies to both sides of every comparison, and an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_common import (  # noqa: E402,F401  (re-exported for tests and the memory child)
    GOALS,
    Row,
    Settings,
    best_ms,
    block_diagonal_causal_mask,
    cu_seqlens,
    interleaved,
    longtail_lengths,
    machine,
    summary,
)
from bench_model import bench_memory, bench_train_step, memory_child  # noqa: E402
from packtune.attention import backends as _backends  # noqa: E402
from packtune.attention.varlen import varlen_attn_func  # noqa: E402
from packtune.packing.plan import pack_plan  # noqa: E402


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


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CHAT_FILES = ("alpaca_en_demo.json", "glaive_toolcall_en_demo.json")


def bench_real_chat(s: Settings) -> tuple[list[Row], dict]:
    """Packing of the real alpaca and glaive tool-call samples in ``../shared/data`` (if present)."""
    if s.name == "smoke" or not all((SHARED / f).exists() for f in CHAT_FILES):
        return [], {}
    from packtune.data import DataOptions, build_dataset, load_tokenizer

    tokenizer = load_tokenizer("packtune://mistral-v1")
    reports = {}
    for strategy in ("bfd", "sequential"):
        options = DataOptions(dataset=[str(SHARED / f) for f in CHAT_FILES], max_length=2048, pack_strategy=strategy)
        reports[strategy] = build_dataset(options, tokenizer).report
    bfd, seq = reports["bfd"], reports["sequential"]
    bound = bfd.min_packs
    row = Row(
        f"packing the {bfd.samples_read:,} real chat samples of `../shared/data` (alpaca + glaive tool calls; Mistral "
        f"tokenizer, `{bfd.template}` template, max_length 2048): {bfd.packed_tokens:,} tokens, at least {bound} packs",
        f"bfd **{bfd.packs}** packs, {bfd.utilization:.2%} full",
        f"sequential {seq.packs} packs, {seq.utilization:.2%} full",
        f"{seq.packs / bfd.packs:.2f}x fewer packs",
        "bfd <= ceil(tokens / 2048) + 1",
        "PASS" if bfd.packs <= bound + 1 else "FAIL",
    )
    return [row], {"real_chat": {k: {"packs": r.packs, "utilization": r.utilization, "min_packs": r.min_packs} for k, r in reports.items()}}


# ---------------------------------------------------------------------------------------------
# the table


def render(rows: list[Row], info: dict, s: Settings, device: str, dtype, seconds: float) -> str:
    lines = [
        f"## Benchmarks ({device.upper()}, `{s.name}` run)",
        "",
        "| Benchmark | packtune | Baseline | Ratio | Goal | Result |",
        "|---|---|---|---|---|---|",
    ]
    lines += [table_line(r) for r in rows]
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


def table_line(r: Row) -> str:
    return f"| {r.what} | {r.ours} | {r.baseline} | {r.ratio} | {r.goal} | {r.result} |"


def run(s: Settings, device: str = "cpu", args=None, log=print, on_rows=None) -> tuple[list[Row], dict]:
    """Every benchmark; returns the table rows and the raw numbers.

    ``on_rows(rows, details)`` is called after each benchmark with its rows, so that a caller
    can keep what finished (``main`` writes them to ``--out`` as they come)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows, details = [], {}
    for name, fn in (
        ("attention", lambda: bench_attention(s, device, dtype)),
        ("training step", lambda: bench_train_step(s, device, dtype)),
        ("memory", lambda: bench_memory(s, device, dtype, args or argparse.Namespace(threads=None))),
        ("pack_plan", lambda: bench_plan(s)),
        ("real chat samples", lambda: bench_real_chat(s)),
    ):
        t0 = time.perf_counter()
        r, d = fn()
        rows += r
        details.update(d)
        log(f"[bench] {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if on_rows:
            on_rows(r, d)
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
    on_rows = None
    if args.out:
        # Row by row: a run stopped by a timeout leaves the rows that finished (the complete
        # table with the machine's description replaces them at the end).
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"## Benchmarks ({args.device.upper()}, `{s.name}` run, partial until it ends)\n\n"
                            "| Benchmark | packtune | Baseline | Ratio | Goal | Result |\n|---|---|---|---|---|---|\n")

        def on_rows(new_rows, _details):
            with args.out.open("a") as f:
                f.writelines(table_line(r) + "\n" for r in new_rows)

    rows, details = run(s, args.device, args, on_rows=on_rows)
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
