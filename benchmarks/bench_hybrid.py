"""Hybrid linear attention packed exactly: a Qwen3.5-shaped model on one long-tailed pack.

Two ratios, each measured side by side in one run (taking turns, after a warm-up):

1. One training step (forward, backward, AdamW) of a tiny Qwen3.5-shaped model (``qwen3_5_text``:
   3 Gated DeltaNet layers to 1 attention layer, hidden 256) on one 4,096-token pack of 25
   long-tailed documents: packtune (``enable_varlen``: varlen attention, the boundary-aware scan
   and convolution) against the same documents padded one per row with an ``attention_mask``
   (transformers' own forward). Goal: >= 2x the tokens per second.
2. The scan alone, forward and backward at that model's Gated DeltaNet shapes:
   ``varlen_chunk_gated_delta_rule`` over the pack's 25 documents against the same function over
   the row as one document (no boundaries). Goal: <= 1.3x its time. transformers' own chunked
   scan over the row is an info row beside it.

Before timing, both sides of the training step are checked to give the same loss, and the scan
over one document is checked against transformers' own, so a fast wrong answer fails loudly.

    python benchmarks/bench_hybrid.py                  # writes benchmarks/results-hybrid.json
    python benchmarks/bench_hybrid.py --device cuda    # bf16 autocast; fla / causal-conv1d if installed
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, best_ms, interleaved, longtail_lengths, machine, summary  # noqa: E402
from bench_model import _batches, _inputs, _loss  # noqa: E402
from packtune.attention.varlen import CuSeqlens  # noqa: E402
from packtune.layers.gated_delta import varlen_chunk_gated_delta_rule  # noqa: E402
from packtune.layers.segments import Segments  # noqa: E402
from packtune.modeling import enable_varlen  # noqa: E402

GOALS = {"hybrid_step": 2.0, "scan_overhead": 1.3}


@dataclasses.dataclass
class HybridSettings:
    pack_tokens: int = 4096
    docs: int = 25
    repeats: int = 3
    scan_repeats: int = 5
    model: dict = dataclasses.field(
        default_factory=lambda: dict(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            linear_conv_kernel_dim=4,
            vocab_size=8192,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
        )
    )

    @classmethod
    def smoke(cls) -> HybridSettings:
        small = dict(
            cls().model, hidden_size=32, intermediate_size=64, head_dim=16, linear_key_head_dim=16,
            linear_value_head_dim=16, vocab_size=64,
        )
        return cls(pack_tokens=300, docs=6, repeats=1, scan_repeats=1, model=small)


def _segments(lengths, device) -> Segments:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return Segments.build(CuSeqlens.validate("cu", cu).to(torch.device(device)), rows=1, length=sum(lengths))


def bench_step(s: HybridSettings, lengths, device: str, dtype) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_5_text", **s.model)
    base = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa").to(device).train()
    packed_batch, padded_batch = _batches(lengths, cfg.vocab_size, device)
    models = {"packed": enable_varlen(copy.deepcopy(base)), "padded": base}
    setups = {"packed": ("varlen", packed_batch), "padded": ("padded", padded_batch)}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    autocast = torch.autocast(device, dtype) if dtype != torch.float32 else torch.autocast(device, enabled=False)

    def loss(name):
        kind, batch = setups[name]
        with autocast:
            return _loss(models[name], batch, _inputs(batch, kind))

    with torch.no_grad():
        losses = {name: float(loss(name)) for name in models}
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if abs(losses["packed"] - losses["padded"]) > tol * max(1.0, abs(losses["padded"])):
        raise AssertionError(f"hybrid step: packed loss {losses['packed']:.6f} != padded {losses['padded']:.6f}")

    def step(name):
        def run():
            loss(name).backward()
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)

        return run

    times = interleaved({name: step(name) for name in models}, s.repeats, device)
    ms = {name: best_ms(t) for name, t in times.items()}
    tokens = sum(lengths)
    return {
        "times": summary(times),
        "losses": losses,
        "padded_shape": list(padded_batch.input_ids.shape),
        "tokens_per_s": {name: tokens / (v / 1e3) for name, v in ms.items()},
        "ratio": ms["padded"] / ms["packed"],
    }


def bench_scan(s: HybridSettings, lengths, device: str, dtype) -> dict:
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    m = s.model
    total = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    kshape = (1, total, m["linear_num_key_heads"], m["linear_key_head_dim"])
    vshape = (1, total, m["linear_num_value_heads"], m["linear_value_head_dim"])
    q, k = torch.randn(kshape, generator=gen), torch.randn(kshape, generator=gen)
    v = torch.randn(vshape, generator=gen)
    g = -torch.rand(vshape[:3], generator=gen) * 2
    beta = torch.rand(vshape[:3], generator=gen)
    leaves = [x.to(device=device, dtype=dtype if x is not g else torch.float32).requires_grad_() for x in (q, k, v, g, beta)]
    upstream = torch.randn(vshape, generator=gen).to(device=device, dtype=dtype)
    packed, whole = _segments(lengths, device), _segments([total], device)

    with torch.no_grad():
        ours_whole = varlen_chunk_gated_delta_rule(*leaves, whole)
        theirs, _ = torch_chunk_gated_delta_rule(*leaves, use_qk_l2norm_in_kernel=True)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    error = float((ours_whole.float() - theirs.float()).abs().max() / theirs.float().abs().max())
    if error > tol:
        raise AssertionError(f"scan over one document differs from transformers' by {error:.3g}")

    def run(fn):
        def call():
            out = fn()
            torch.autograd.grad((out * upstream).sum(), leaves)

        return call

    fns = {
        "boundaries": run(lambda: varlen_chunk_gated_delta_rule(*leaves, packed)),
        "no_boundaries": run(lambda: varlen_chunk_gated_delta_rule(*leaves, whole)),
        "transformers": run(lambda: torch_chunk_gated_delta_rule(*leaves, use_qk_l2norm_in_kernel=True)[0]),
    }
    times = interleaved(fns, s.scan_repeats, device)
    ms = {name: best_ms(t) for name, t in times.items()}
    return {"times": summary(times), "ratio": ms["boundaries"] / ms["no_boundaries"], "check_error": error}


def run(s: HybridSettings, device: str, dtype) -> dict:
    lengths = longtail_lengths(s.pack_tokens, s.docs, seed=0)
    return {
        "lengths": lengths,
        "model": s.model,
        "dtype": str(dtype).replace("torch.", ""),
        "step": bench_step(s, lengths, device, dtype),
        "scan": bench_scan(s, lengths, device, dtype),
        "goals": GOALS,
    }


def render(result: dict) -> str:
    step, scan = result["step"], result["scan"]
    lengths = result["lengths"]
    ms = {k: v["best_ms"] for k, v in step["times"].items()}
    sms = {k: v["best_ms"] for k, v in scan["times"].items()}
    rows, width = step["padded_shape"]
    head = (
        f"Qwen3.5-shaped (3 Gated DeltaNet : 1 attention, hidden {result['model']['hidden_size']}, "
        f"vocab {result['model']['vocab_size']:,}, {result['dtype']}), one {sum(lengths):,}-token pack of "
        f"{len(lengths)} docs ({min(lengths)}-{max(lengths)} tokens)"
    )
    step_ok = step["ratio"] >= GOALS["hybrid_step"]
    scan_ok = scan["ratio"] <= GOALS["scan_overhead"]
    lines = [
        head,
        "",
        "| Row | packtune | Baseline | Ratio | Goal | Result |",
        "|---|---|---|---|---|---|",
        f"| training step (fwd, bwd, AdamW) | {ms['packed']:.0f} ms, {step['tokens_per_s']['packed']:,.0f} tok/s "
        f"(packed, `enable_varlen`) | {ms['padded']:.0f} ms, {step['tokens_per_s']['padded']:,.0f} tok/s "
        f"({rows} rows padded to {width}) | **{step['ratio']:.1f}x** tokens/s | >= {GOALS['hybrid_step']:g}x | "
        f"{'PASS' if step_ok else 'FAIL'} |",
        f"| gated delta rule scan fwd+bwd, {sum(lengths):,} tokens | {sms['boundaries']:.0f} ms ({len(lengths)} documents) "
        f"| {sms['no_boundaries']:.0f} ms (same scan, the row as one document) | **{scan['ratio']:.2f}x** the time "
        f"| <= {GOALS['scan_overhead']:g}x | {'PASS' if scan_ok else 'FAIL'} |",
        f"| (info) transformers' chunked scan over the row | | {sms['transformers']:.0f} ms | "
        f"{sms['boundaries'] / sms['transformers']:.2f}x | - | info |",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-hybrid.json"))
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    s = HybridSettings()
    if args.repeats:
        s = dataclasses.replace(s, repeats=args.repeats, scan_repeats=args.repeats)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    result = run(s, args.device, dtype)
    result["machine"] = machine(args.device)
    table = render(result)
    print(table)
    result["table"] = table
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
