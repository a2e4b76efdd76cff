"""One process of the sequence-parallel equivalence test (run by torchrun, gloo or NCCL).

    python -m torch.distributed.run --nproc_per_node=N tests/sequence_parallel_worker.py OUT.json [--device cuda]

Every process builds the same tiny models and the same packed row and computes the
one-process reference itself; then the N processes run the row as N sequence-parallel
shards. Compared, for each family and each ``loss_reduction``: the logits of every shard
against the reference's rows, the loss, the token counts, and the gradient of every
parameter (summed over the ranks and averaged, as DDP does). ``ulysses_attention`` itself is
also compared against one ``varlen_attn_func`` call for several head layouts (GQA, MQA, KV
heads that straddle ranks unevenly) with causal masks, sliding windows, soft-capping and
ALiBi. Rank 0 writes the largest relative errors to ``OUT.json``; every rank raises
(non-zero exit) on an error above the tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # helpers' tiny_config

import packtune  # noqa: E402,F401  (registers packtune_varlen)
from packtune.attention.varlen import varlen_attn_func  # noqa: E402
from packtune.loss import REDUCTIONS, target_weights  # noqa: E402
from packtune.modeling import enable_varlen  # noqa: E402
from packtune.packing.collate import collate_varlen  # noqa: E402
from packtune.packing.packs import IGNORE_INDEX, build_packs  # noqa: E402
from packtune.parallel.groups import init_sequence_parallel  # noqa: E402
from packtune.parallel.sequence_shards import shard_bounds, shard_micro_batch  # noqa: E402
from packtune.attention.hf import SP_KWARG  # noqa: E402
from packtune.parallel.ulysses import UlyssesContext, ulysses_attention  # noqa: E402
from packtune.recipe.step import accumulate_gradients  # noqa: E402

TOLERANCE = 1e-5
#: Document lengths of the row: 45 tokens, so sp = 2 and sp = 4 both need a padding document;
#: with sp = 4 (shards of 12) the 17-token document is longer than a shard and spans three.
LENGTHS = (5, 17, 3, 9, 7, 4)
FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "gpt_bigcode", "glm")
#: Also checked: llama with activation checkpointing (the all-to-alls run again in backward).
CHECKPOINTED = "llama+checkpointing"
#: (query heads, KV heads) for the attention-level check, per number of ranks.
HEAD_LAYOUTS = {
    1: [(4, 2), (4, 1)],
    2: [(4, 4), (4, 2), (4, 1), (6, 3), (8, 2)],
    4: [(4, 4), (4, 2), (4, 1), (8, 4), (12, 3), (8, 2)],
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def model_config(family: str):
    from transformers import AutoConfig

    if family == "glm":  # partial rotary: only half of each head's dimensions rotate
        return AutoConfig.for_model(
            "glm", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5, vocab_size=128,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=0.0,
        )
    from helpers import tiny_config

    return tiny_config(family)  # mistral, qwen2, gemma2: sliding window 4 < documents


def make_packs(vocab: int) -> list[dict]:
    """The documents, each with a prompt (untrained) and an answer, in two packs of <= 24."""
    gen = torch.Generator().manual_seed(1)
    samples = []
    for n in LENGTHS:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        prompt = max(1, n // 3)
        samples.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    packs, _ = build_packs(samples, max_length=24, strategy="sequential")
    return packs


class Engine:
    """The part of an engine ``accumulate_gradients`` uses; sums over ``group`` (or nothing)."""

    def __init__(self, model, world_size: int, group=None):
        self.model, self.world_size, self.group = model, world_size, group

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return value
        value = value.clone()
        dist.all_reduce(value, group=self.group)
        return value

    def accumulate(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def check_family(family: str, sp, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(family.split("+")[0]), dtype=torch.float32)
    enable_varlen(model)
    if family == CHECKPOINTED:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    vocab = model.config.get_text_config().vocab_size
    packs = make_packs(vocab)
    row = collate_varlen(packs).to(device)  # both packs flattened into one row (batch_size 2)
    padded = collate_varlen(packs, pad_to_multiple_of=sp.size).to(device)
    total = row.input_ids.shape[1]
    start, end = shard_bounds(padded.input_ids.shape[1], sp.size, sp.rank)
    errors = {"logits": 0.0, "loss": 0.0, "grad": 0.0}
    cut = torch.zeros((), dtype=torch.float64, device=device)

    # Logits: this rank's shard against the same rows of the one-process forward.
    with torch.no_grad():
        want = model(**row.model_inputs(), use_cache=False).logits[0]
        targets, weights = target_weights(padded.labels, padded.cu_seqlens)
        shard, _, _ = shard_micro_batch(padded, targets, weights, sp)
        got = model(**shard.model_inputs(), use_cache=False).logits[0]
    real = min(end, total) - start
    assert shard.num_tokens == max(real, 0), (shard.num_tokens, real)
    errors["logits"] = rel(got[:real], want[start : start + real])
    # The check can fail: attention over this shard alone (documents cut at its edges, as
    # without the all-to-alls) differs on some rank, since documents cross the shards.
    with torch.no_grad():
        alone = {k: v for k, v in shard.model_inputs().items() if k != SP_KWARG}
        cut.fill_(rel(model(**alone, use_cache=False).logits[0][:real], want[start : start + real]))
    dist.all_reduce(cut, op=dist.ReduceOp.MAX, group=sp.group)
    if sp.size > 1:
        assert float(cut) > 1e-3, f"{family}: cutting the row at the shards changed nothing ({float(cut):.2g})"

    # Loss and every gradient, through the recipe's own step, for every loss_reduction.
    for reduction in REDUCTIONS:
        ref = accumulate_gradients(Engine(model, 1), [row], reduction)
        ref_grads = grads(model)
        res = accumulate_gradients(Engine(model, sp.size, sp.group), [padded], reduction, sequence_parallel=sp)
        sp_grads = grads(model)
        assert (res.tokens, res.trained_tokens) == (ref.tokens, ref.trained_tokens), (family, reduction, res, ref)
        assert abs(res.weight_total - ref.weight_total) <= 1e-6 * ref.weight_total, (res.weight_total, ref.weight_total)
        errors["loss"] = max(errors["loss"], abs(res.loss - ref.loss) / abs(ref.loss))
        assert sp_grads.keys() == ref_grads.keys()
        for name, g in sp_grads.items():
            dist.all_reduce(g, group=sp.group)  # what DDP does over the group: sum, then / ranks
            errors["grad"] = max(errors["grad"], rel(g / sp.size, ref_grads[name]))
    return errors


def check_attention(sp, device: torch.device) -> dict:
    """``ulysses_attention`` against one ``varlen_attn_func`` call, outputs and q/k/v gradients."""
    lengths = (13, 2, 21, 4, 8)  # 48 tokens: shards of 24 or 12 tokens
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    start, end = shard_bounds(total, sp.size, sp.rank)
    context = UlyssesContext(group=sp.group, size=sp.size, rank=sp.rank, cu_seqlens=cu, max_seqlen=max(lengths), total=total)
    errors = {}
    for heads, kv_heads in HEAD_LAYOUTS[sp.size]:
        gen = torch.Generator().manual_seed(heads * 100 + kv_heads)
        q = torch.randn(total, heads, 16, generator=gen).to(device).requires_grad_()
        k = torch.randn(total, kv_heads, 16, generator=gen).to(device).requires_grad_()
        v = torch.randn(total, kv_heads, 8, generator=gen).to(device).requires_grad_()
        slopes = torch.rand(heads, generator=gen).to(device)
        out_grad = torch.randn(total, heads, 8, generator=gen).to(device)
        options = dict(causal=True, window_size=(6, 0), softcap=5.0, alibi_slopes=slopes, backend="eager")
        want = varlen_attn_func(q, k, v, cu, cu, max(lengths), max(lengths), **options)
        want.backward(out_grad)
        ref = {"q": q.grad, "k": k.grad, "v": v.grad}
        mine = {name: t.detach()[start:end].clone().requires_grad_() for name, t in (("q", q), ("k", k), ("v", v))}
        got = ulysses_attention(varlen_attn_func, context, mine["q"], mine["k"], mine["v"], **options)
        got.backward(out_grad[start:end])
        err = rel(got, want[start:end])
        for name in ("q", "k", "v"):
            # The reverse all-to-all brings back every head's part of this shard's gradient
            # (a replicated KV head's copies summed by the indexing's backward).
            err = max(err, rel(mine[name].grad, ref[name][start:end]))
        errors[f"{heads}q/{kv_heads}kv"] = err
    return errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--families", default=",".join((*FAMILIES, CHECKPOINTED)))
    # cuBLAS picks its kernels by shape, so a shard's matmuls may round differently on a GPU.
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    sp = init_sequence_parallel(world, rank, world, device.type) if world > 1 else None
    if sp is None:  # a world of one: the same code path over a group of one
        from packtune.parallel.groups import SequenceParallel

        sp = SequenceParallel(size=1, rank=0, group=dist.group.WORLD)
    report = {"sp": sp.size, "attention": check_attention(sp, device), "families": {}}
    for family in args.families.split(","):
        report["families"][family] = check_family(family, sp, device)
    worst = max([*report["attention"].values(), *(e for f in report["families"].values() for e in f.values())])
    report["worst"] = worst
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    if not worst <= args.tolerance:
        raise SystemExit(f"rank {rank}: sequence parallelism differs from one process by {worst:.3g} (> {args.tolerance:g})")


if __name__ == "__main__":
    main()
