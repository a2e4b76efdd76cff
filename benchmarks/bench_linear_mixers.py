"""The boundary-aware KDA and lightning-attention scans against the same scans with no boundaries.

One long-tailed pack of documents, forward plus backward of the mixer's core scan:

* KDA (kimi_linear, bailing_hybrid): ``packtune.layers.kda.kda_scan`` over the documents against
  transformers' ``chunk_kimi_delta_attention`` over the whole row as one sequence (on CUDA with
  flash-linear-attention installed, both are fla's ``chunk_kda``, with and without ``cu_seqlens``).
* MiniMax lightning attention: ``lightning_attention_varlen`` against the same blocks with one
  document (what transformers' layer computes over the row).

The ratio is the price of the boundaries (the issue's goal for scans: at most 1.3x). Before
timing, the boundary-aware scan is checked against each document alone, so a fast wrong answer
fails loudly.

    python benchmarks/bench_linear_mixers.py [--tokens 4096] [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
from bench_common import best_ms, interleaved, longtail_lengths
from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention
from transformers.models.minimax.configuration_minimax import MiniMaxConfig
from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

from packtune.attention.varlen import CuSeqlens
from packtune.layers.kda import kda_scan
from packtune.layers.lightning import lightning_attention_varlen
from packtune.layers.segments import Segments


def _segments(lengths: list[int], device: str) -> Segments:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return Segments.build(CuSeqlens.validate("cu", cu, device=device), rows=1, length=sum(lengths))


def _fwd_bwd(fn, inputs):
    leaves = [x.detach().requires_grad_() for x in inputs]
    fn(*leaves).float().sum().backward()


def bench_kda(lengths, device, dtype, heads, dim, repeats) -> tuple[float, float]:
    total = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, total, heads, dim, generator=gen) for _ in range(3))
    g = -torch.rand(1, total, heads, dim, generator=gen) * 0.5
    beta = torch.rand(1, total, heads, generator=gen)
    inputs = [x.to(device, dtype) for x in (q, k, v)] + [g.to(device), beta.to(device, dtype)]
    seg, whole = _segments(lengths, device), _segments([total], device)
    packed = kda_scan(*inputs, seg)
    start = 0
    for n in lengths[:3]:  # the first documents alone, through transformers' scan
        part = [x[:, start : start + n] for x in inputs]
        alone, _ = chunk_kimi_delta_attention(*part[:3], part[3], part[4], use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(packed[:, start : start + n].float(), alone.float(), rtol=2e-2, atol=2e-2)
        start += n
    times = interleaved(
        {
            "boundaries": lambda: _fwd_bwd(lambda *x: kda_scan(*x, seg), inputs),
            "one document": lambda: _fwd_bwd(
                lambda q, k, v, g, b: chunk_kimi_delta_attention(q, k, v, g, b, use_qk_l2norm_in_kernel=True)[0]
                if device == "cpu"
                else kda_scan(q, k, v, g, b, whole),
                inputs,
            ),
        },
        repeats,
        device,
    )
    return best_ms(times["boundaries"]), best_ms(times["one document"])


def bench_lightning(lengths, device, dtype, heads, dim, block, repeats) -> tuple[float, float]:
    total = sum(lengths)
    cfg = MiniMaxConfig(num_attention_heads=heads, head_dim=dim, hidden_size=heads * dim, block_size=block,
                        num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    layer = MiniMaxLightningAttention(cfg, layer_idx=0).to(device, dtype)
    decays = (layer.slope_rate, layer.query_decay, layer.key_decay, layer.diagonal_decay)
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(1, heads, total, dim, generator=gen) * 0.5).to(device, dtype) for _ in range(3)]
    seg, whole = _segments(lengths, device), _segments([total], device)
    times = interleaved(
        {
            "boundaries": lambda: _fwd_bwd(lambda *x: lightning_attention_varlen(*x, seg, *decays), inputs),
            "one document": lambda: _fwd_bwd(lambda *x: lightning_attention_varlen(*x, whole, *decays), inputs),
        },
        repeats,
        device,
    )
    return best_ms(times["boundaries"]), best_ms(times["one document"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--docs", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    lengths = longtail_lengths(args.tokens, args.docs, seed=0)
    rows = [
        ("KDA (4 heads x 64)", *bench_kda(lengths, args.device, dtype, 4, 64, args.repeats)),
        (
            "lightning (4 heads x 64, block 256)",
            *bench_lightning(lengths, args.device, dtype, 4, 64, 256, args.repeats),
        ),
    ]
    print(f"{args.tokens} tokens in {args.docs} long-tailed documents, {args.device}, {dtype}, forward + backward\n")
    print("| scan | boundaries (ms) | one document (ms) | ratio |\n|---|---:|---:|---:|")
    for name, mine, base in rows:
        print(f"| {name} | {mine:.1f} | {base:.1f} | {mine / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
