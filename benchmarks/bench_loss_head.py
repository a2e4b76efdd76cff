"""Benchmark: the chunked loss head against the plain head, forward plus backward (issue 11).

    python benchmarks/bench_loss_head.py                 # 16,384 trained tokens, hidden 1,024, vocab 151,936, fp32
    python benchmarks/bench_loss_head.py --quick         # 2,048 tokens: about a minute on 2 cores
    python benchmarks/bench_loss_head.py --device cuda   # on a GPU (fp32, and a bf16-autocast row)

The plain head is packtune's own without chunks: ``weighted_loss_sum(hidden @ weight.T,
targets, weights)`` (the ``(tokens, vocab)`` logits in full, the cross-entropy of
``torch.nn.functional``), then backward. The chunked head is ``packtune.loss_head.
chunked_loss_sum`` with ``--chunk`` tokens per chunk (default: ``loss_chunk_size``'s). Both get
the same seeded inputs, every token trained, and the backward the same incoming scale (1 /
tokens, as a step's normalisation gives); their losses and gradients are checked equal first.

Every run of every contender is a fresh process, so that its peak memory is its own: the
growth of peak RSS over the forward and backward (``/proc/self/clear_refs`` resets the peak;
``ru_maxrss`` would carry the parent's over ``exec``), or ``torch.cuda.max_memory_allocated``
on a GPU; the inputs (hidden states and weight) exist before, and are not counted. The
contenders take turns (chunked, plain, chunked, ...) for ``--rounds`` rounds; a time is the
best of its runs. The plain head needs about three ``(tokens, vocab)`` fp32 buffers at its
peak (logits, their log-softmax, the gradient): 30 GB at the full size. Where that is more
than 60% of the memory the machine has available (on the CPU; other jobs may share it), the
two heads take turns at the largest halving of ``--tokens`` that is not, which gives the time
ratio; the chunked head then also runs once at ``--tokens``, and its peak there is compared
with the plain head's measured peak scaled by the number of tokens (the table says so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see benchmarks/README.md

import torch  # noqa: E402

from bench_common import Row, machine  # noqa: E402  (also puts src/ on the path)
from bench_model import _pythonpath, measure_peak  # noqa: E402
from packtune.config.settings import LOSS_CHUNK_SIZE  # noqa: E402
from packtune.loss import weighted_loss_sum  # noqa: E402
from packtune.loss_head import chunked_loss_sum  # noqa: E402

GOAL_MEMORY = 0.10  # chunked peak <= 10% of plain
GOAL_TIME = 1.10  # chunked time <= 1.1x plain
KINDS = ("chunked", "plain")


def _inputs(tokens: int, hidden: int, vocab: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen).to(device).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    weights = torch.ones(tokens, device=device)
    return h, w, targets, weights


def _step(kind: str, h, w, targets, weights, chunk: int, autocast: bool) -> torch.Tensor:
    """One forward + backward of the head; the loss."""
    ctx = torch.autocast(h.device.type, dtype=torch.bfloat16) if autocast else torch.autocast(h.device.type, enabled=False)
    with ctx:
        if kind == "plain":
            loss = weighted_loss_sum(h @ w.T, targets, weights)
        else:
            loss = chunked_loss_sum(h, w, targets, weights, chunk)
    (loss / targets.numel()).backward()
    return loss.detach()


def child(kind: str, tokens: int, hidden: int, vocab: int, chunk: int, device: str, autocast: bool) -> dict:
    """Peak memory growth and seconds of one forward + backward, in this (fresh) process."""
    h, w, targets, weights = _inputs(tokens, hidden, vocab, device)
    # Warm-up on a few rows (kernels, allocator, lazy inits), then measure the real size.
    _step(kind, h[:64].detach().requires_grad_(), w, targets[:64], weights[:64], chunk, autocast)
    w.grad = None
    loss, peak, exact, seconds = measure_peak(device, lambda: _step(kind, h, w, targets, weights, chunk, autocast))
    probe = torch.Generator().manual_seed(1)
    checks = {
        "loss": float(loss),
        "grad_h_norm": float(h.grad.double().norm()),
        "grad_w_norm": float(w.grad.double().norm()),
        # A random projection of each gradient: any difference anywhere shows.
        "grad_h_probe": float((h.grad.double().cpu() * torch.randn(h.shape, generator=probe, dtype=torch.float64)).sum()),
        "grad_w_probe": float((w.grad.double().cpu() * torch.randn(w.shape, generator=probe, dtype=torch.float64)).sum()),
    }
    return {"kind": kind, "tokens": tokens, "mb": peak / 2**20, "exact": exact, "seconds": seconds, **checks}


def _available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _plain_need_mb(tokens: int, vocab: int) -> float:
    """The plain head's peak: logits, log-softmax and a gradient, (tokens, vocab) fp32 each."""
    return 3 * tokens * vocab * 4 / 2**20


def _spawn(kind: str, tokens: int, args) -> dict:
    if args.in_process:  # the tests' smoke run: no clean peak, but every code path
        return child(kind, tokens, args.hidden, args.vocab, args.chunk, args.device, args.autocast)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--tokens", str(tokens), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--device", args.device]
    cmd += ["--autocast"] if args.autocast else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} at {tokens} tokens failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_same(a: dict, b: dict, rel: float) -> float:
    """The largest relative gap between the two contenders' loss and gradient checks; raises above ``rel``."""
    worst = 0.0
    for key in ("loss", "grad_h_norm", "grad_w_norm", "grad_h_probe", "grad_w_probe"):
        gap = abs(a[key] - b[key]) / max(abs(b[key]), 1e-30)
        if key.endswith("probe"):  # a sum of signed terms: relative to the gradient's norm
            gap = abs(a[key] - b[key]) / max(b[key.replace("probe", "norm")], 1e-30)
        if not gap <= rel:
            raise AssertionError(f"chunked and plain heads differ in {key}: {a[key]!r} vs {b[key]!r}")
        worst = max(worst, gap)
    return worst


def run(args, log=print) -> tuple[list[Row], dict]:
    full = args.tokens
    side = args.side_tokens or full  # where both heads run side by side
    if args.device == "cpu" and not args.side_tokens:
        free = _available_mb()
        while free is not None and _plain_need_mb(side, args.vocab) > 0.6 * free and side > 256:
            side //= 2
    results: dict[tuple[str, int], list[dict]] = {}

    def spawn(kind: str, tokens: int, label: str) -> None:
        res = _spawn(kind, tokens, args)
        results.setdefault((kind, tokens), []).append(res)
        log(f"[loss head] {kind} {tokens} tokens, {label}: {res['seconds']:.2f} s, peak +{res['mb']:.0f} MB", file=sys.stderr)

    for r in range(args.rounds):
        for kind in KINDS:
            spawn(kind, side, f"round {r + 1}")
    if side != full:
        spawn("chunked", full, "alone (the plain head does not fit)")
    best = {k: min(v, key=lambda x: x["seconds"]) for k, v in results.items()}
    peak = {k: max(x["mb"] for x in v) for k, v in results.items()}
    rel = 1e-2 if args.autocast else 1e-5
    gap = _check_same(best[("chunked", side)], best[("plain", side)], rel)

    dtype = "bf16 autocast" if args.autocast else "fp32"
    where = "GPU `max_memory_allocated`" if args.device == "cuda" else "peak RSS growth"
    what = f"loss head fwd+bwd, {{tokens}} trained tokens, hidden {args.hidden:,}, vocabulary {args.vocab:,}, {dtype}, chunks of {args.chunk:,}"
    scale = full / side
    plain_mb, ours_mb = peak[("plain", side)] * scale, peak[("chunked", full)]
    mem_ratio = ours_mb / max(plain_mb, 1e-9)  # 0 only in the tests' in-process smoke run
    c, p = best[("chunked", side)]["seconds"], best[("plain", side)]["seconds"]
    time_ratio = c / p
    if scale == 1:
        plain_txt = f"{plain_mb:,.0f} MB (plain head)"
    else:
        plain_txt = (f"{plain_mb:,.0f} MB (plain head: {peak[('plain', side)]:,.0f} MB measured at {side:,} tokens, x{scale:g}; "
                     f"it would need about {_plain_need_mb(full, args.vocab) / 1024:.0f} GB at {full:,})")
    rows = [
        Row(what.format(tokens=f"{full:,}") + f": peak memory ({where}, a fresh process per run)",
            f"{ours_mb:,.0f} MB (`chunked_loss_sum`)", plain_txt, f"**{mem_ratio:.1%}** of plain",
            f"<= {GOAL_MEMORY:.0%}", "PASS" if mem_ratio <= GOAL_MEMORY else "FAIL"),
        Row(what.format(tokens=f"{side:,}") + f": time, best of {args.rounds} each, taking turns",
            f"{c:.2f} s", f"{p:.2f} s (plain head)", f"**{time_ratio:.2f}x** plain", f"<= {GOAL_TIME:g}x",
            "PASS" if time_ratio <= GOAL_TIME else "FAIL"),
    ]
    if scale != 1:
        at_full = best[("chunked", full)]["seconds"]
        rows.append(Row(f"the chunked head alone at {full:,} tokens; the same heads at {side:,}",
                        f"{at_full:.1f} s ({at_full / full * 1e3:.1f} ms per token); {peak[('chunked', side)]:,.0f} MB at {side:,}",
                        f"{p * scale:.1f} s (plain at {side:,}, x{scale:g}); {peak[('plain', side)]:,.0f} MB at {side:,}",
                        f"{peak[('chunked', side)] / max(peak[('plain', side)], 1e-9):.1%} of the memory at {side:,}", "-", "info"))
    details = {"runs": {f"{k}@{t}": v for (k, t), v in results.items()}, "largest_check_gap": gap, "side_by_side_tokens": side}
    return rows, details


def render(rows: list[Row], info: dict, args, details: dict, seconds: float) -> str:
    lines = ["| Benchmark | packtune | Baseline | Ratio | Goal | Result |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.what} | {r.ours} | {r.baseline} | {r.ratio} | {r.goal} | {r.result} |" for r in rows]
    hw = f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), load average {info['load_average']}"
    if args.device == "cuda":
        hw = f"{torch.cuda.get_device_name()}; host {hw}"
    lines += ["", f"Measured on {hw}; torch {info['torch']}; {info['date']}; every run a fresh process, the contenders "
              f"taking turns ({args.rounds} rounds); loss and gradients checked equal first (largest relative gap "
              f"{details['largest_check_gap']:.1e}); whole run {seconds:.0f} s. "
              f"Reproduce with `python benchmarks/bench_loss_head.py" + (" --device cuda" if args.device == "cuda" else "")
              + (" --autocast" if args.autocast else "") + "`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=LOSS_CHUNK_SIZE, help="tokens per chunk (default: loss_chunk_size's default)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per contender, taking turns (default 3)")
    parser.add_argument("--side-tokens", type=int, help="tokens where both heads take turns (default: --tokens, or on the CPU "
                        "the largest halving of it whose plain head fits in 60%% of the available memory)")
    parser.add_argument("--quick", action="store_true", help="2,048 tokens")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (the products in bf16, the softmax in fp32)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="also save the table here (and the raw numbers next to it as .json)")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens = 2048
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.hidden, args.vocab, args.chunk, args.device, args.autocast)))
        return 0
    t0 = time.perf_counter()
    rows, details = run(args)
    text = render(rows, machine(args.device), args, details, time.perf_counter() - t0)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(details, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
