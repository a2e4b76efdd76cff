"""Ulysses attention: every rank holds a shard of a packed row, attention sees the whole row.

Rank ``r`` of a sequence-parallel group of ``sp`` ranks holds tokens ``[r * L, (r + 1) * L)``
of one packed row of ``T = sp * L`` tokens. Embeddings, norms, MLPs and the head work on the
shard alone; attention cannot, since a document may span shards. Each attention layer so runs:

1. one all-to-all from sequence-sharded ``(L, heads, d)`` to head-sharded ``(T, heads / sp, d)``:
   rank ``r`` now has the whole row for query heads ``[r * heads / sp, (r + 1) * heads / sp)``;
2. ``varlen_attn_func`` over the whole row with the row's **global** ``cu_seqlens``, so every
   document is attended exactly as in one process (causal masks, sliding windows,
   soft-capping, ALiBi: whatever the call asks for, on this rank's heads);
3. one all-to-all back to ``(L, heads, d)``.

Both all-to-alls are autograd functions whose backward is the other one. Keys and values
go through the same all-to-all; with fewer KV heads than ranks (GQA, MQA) each rank is sent
the KV heads its query heads use (``kv_head_table``), so a KV head is replicated where
several ranks need it; its gradient comes back summed by the indexing's backward.

The context (group, rank, the row's ``cu_seqlens``) travels with the batch: ``Batch``
passes a ``UlyssesContext`` to the model's forward under the keyword ``SP_KWARG``
(``packtune.attention.hf``), and transformers hands it to the ``"packtune_varlen"`` attention
function of every layer.

In ``torch.profiler`` traces the all-to-alls show as ``packtune.ulysses.all_to_all`` and the
attention call as ``packtune.ulysses.attention``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from packtune.config.sizes import heads_problem

if TYPE_CHECKING:  # packtune.attention imports this module
    from packtune.attention.varlen import CuSeqlens


@dataclass(frozen=True, eq=False)
class UlyssesContext:
    """What the attention of a sequence-parallel shard needs: the group and the whole row.

    ``cu_seqlens`` and ``max_seqlen`` describe the documents of the **whole** row of ``total``
    tokens (``total = size * shard length``); this rank holds shard ``rank``.
    """

    group: dist.ProcessGroup | None
    size: int
    rank: int
    cu_seqlens: torch.Tensor | CuSeqlens  # a validated CuSeqlens spares each layer a host read
    max_seqlen: int
    total: int

    def wrap(self, attend: Callable) -> Callable:
        """``attend`` (``varlen_attn_func``'s signature) run on this shard; see ``ulysses_attention``."""
        return functools.partial(ulysses_attention, attend, self)


def kv_head_table(num_heads: int, num_kv_heads: int, size: int) -> list[list[int]]:
    """For each rank, the KV heads it is sent, in local order.

    Rank ``r`` computes query heads ``[r * q, (r + 1) * q)`` (``q = num_heads / size``); query
    head ``h`` uses KV head ``h // (num_heads / num_kv_heads)``. The table gives every rank
    the same number ``k`` of KV heads, such that its local query head ``i`` uses its local KV
    head ``i // (q / k)``, the GQA layout ``varlen_attn_func`` expects:

    >>> kv_head_table(8, 4, 2)    # KV heads split evenly
    [[0, 1], [2, 3]]
    >>> kv_head_table(4, 1, 4)    # MQA: the one KV head replicated to every rank
    [[0], [0], [0], [0]]
    >>> kv_head_table(4, 2, 4)    # fewer KV heads than ranks: each replicated twice
    [[0], [0], [1], [1]]
    >>> kv_head_table(6, 3, 2)    # rank 0 needs KV heads 0, 0, 1: one per query head
    [[0, 0, 1], [1, 2, 2]]
    """
    problem = heads_problem(size, num_heads)
    if problem:
        raise ValueError(problem)
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    q, group = num_heads // size, num_heads // num_kv_heads
    need = [[(r * q + i) // group for i in range(q)] for r in range(size)]
    distinct = [sorted(set(row)) for row in need]
    k = len(distinct[0])
    uniform = q % k == 0 and all(
        len(d) == k and all(n[i] == d[i // (q // k)] for i in range(q)) for n, d in zip(need, distinct)
    )
    # Otherwise (the query heads of a rank straddle KV heads unevenly) each local query head
    # gets its own copy of its KV head: plain multi-head attention on that rank.
    return distinct if uniform else need


@functools.lru_cache(maxsize=None)
def _kv_index(num_heads: int, num_kv_heads: int, size: int, device: torch.device) -> torch.Tensor | None:
    """``kv_head_table`` flattened, on ``device``: the KV heads to send, rank after rank; ``None``
    when that is the even split (the KV heads as they are). Built once per layout and device,
    not per layer: a host-to-device copy waits for the GPU."""
    table = kv_head_table(num_heads, num_kv_heads, size)
    if table == [list(range(r * num_kv_heads // size, (r + 1) * num_kv_heads // size)) for r in range(size)]:
        return None
    with torch.inference_mode(False):  # kept for later calls, which may need it for backward
        return torch.tensor([h for row in table for h in row], device=device)


def _all_to_all(chunks: torch.Tensor, group) -> torch.Tensor:
    """``chunks[j]`` goes to rank ``j``; returns ``out`` with ``out[i]`` from rank ``i``."""
    with torch.profiler.record_function("packtune.ulysses.all_to_all"):
        chunks = chunks.contiguous()
        out = torch.empty_like(chunks)
        dist.all_to_all_single(out, chunks, group=group)
        return out


def _seq_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """``(L, size * h, d)`` shard, all heads -> ``(size * L, h, d)`` whole row, this rank's heads."""
    length, heads, dim = x.shape
    # chunk j = the heads of rank j; what arrives as chunk i = rank i's tokens (row order).
    out = _all_to_all(x.reshape(length, size, heads // size, dim).transpose(0, 1), group)
    return out.view(size * length, heads // size, dim)


def _heads_to_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """``(size * L, h, d)`` whole row, this rank's heads -> ``(L, size * h, d)`` shard, all heads."""
    total, heads, dim = x.shape
    # chunk j = the tokens of rank j; what arrives as chunk i = rank i's heads of this shard.
    out = _all_to_all(x.reshape(size, total // size, heads, dim), group)
    return out.transpose(0, 1).reshape(total // size, size * heads, dim)


class _Reshard(torch.autograd.Function):
    """One all-to-all, seq -> heads (``to_heads``) or back; the backward is the other one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, size: int, to_heads: bool) -> torch.Tensor:
        ctx.group, ctx.size, ctx.to_heads = group, size, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (_heads_to_seq if ctx.to_heads else _seq_to_heads)(grad, ctx.group, ctx.size), None, None, None


def seq_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Autograd all-to-all ``(L, size * h, d)`` -> ``(size * L, h, d)``; backward: ``heads_to_seq``."""
    return _Reshard.apply(x, group, size, True)


def heads_to_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Autograd all-to-all ``(size * L, h, d)`` -> ``(L, size * h, d)``; backward: ``seq_to_heads``."""
    return _Reshard.apply(x, group, size, False)


def ulysses_attention(
    attend: Callable,
    sp: UlyssesContext,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    alibi_slopes: torch.Tensor | None = None,
    return_attn_probs: bool = False,
    **options,
) -> torch.Tensor:
    """``attend`` over the whole row for this rank's heads, between the two all-to-alls.

    ``q`` ``(L, heads, d)``, ``k``/``v`` ``(L, kv_heads, d)`` are this rank's shard; the
    result is its shard of the output, ``(L, heads, d_v)``, equal to those rows of ``attend``
    run on the whole row in one process. ``cu_seqlens_*``/``max_seqlen_*`` must be the whole
    row's (those of ``sp``, the default). ``alibi_slopes`` are those of all heads; each rank
    uses its own. ``options`` go to ``attend`` unchanged (causal, window, soft-capping, ...).
    """
    if return_attn_probs:
        raise NotImplementedError("sequence parallelism does not return the log-sum-exp (return_attn_probs)")
    size = sp.size
    if q.shape[0] * size != sp.total:
        raise ValueError(
            f"sequence parallelism: this rank holds {q.shape[0]} tokens, but the row has {sp.total} "
            f"tokens over {size} ranks; a shard is one flattened row cut into {size} equal parts"
        )
    heads = q.shape[1]
    mine = heads // size
    index = _kv_index(heads, k.shape[1], size, k.device)
    if index is not None:
        k, v = k.index_select(1, index), v.index_select(1, index)
    q_full, k_full, v_full = (seq_to_heads(t, sp.group, size) for t in (q, k, v))
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes[..., sp.rank * mine : (sp.rank + 1) * mine]
    with torch.profiler.record_function("packtune.ulysses.attention"):
        out = attend(
            q_full,
            k_full,
            v_full,
            sp.cu_seqlens if cu_seqlens_q is None else cu_seqlens_q,
            sp.cu_seqlens if cu_seqlens_k is None else cu_seqlens_k,
            sp.max_seqlen if max_seqlen_q is None else max_seqlen_q,
            sp.max_seqlen if max_seqlen_k is None else max_seqlen_k,
            alibi_slopes=alibi_slopes,
            **options,
        )
    return heads_to_seq(out, sp.group, size)
