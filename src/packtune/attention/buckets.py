"""Group the documents of a varlen batch into a few batched attention calls.

A per-document loop of ``scaled_dot_product_attention`` pays a fixed cost per call; one padded
batch over all documents wastes compute on padding. ``plan_buckets`` picks the grouping in
between with the least modelled cost: documents are sorted by length, and a dynamic program
cuts the sorted list into buckets, each one call over its documents padded to its longest
one. A pack of 128 documents of 32 tokens is one bucket (one call, no padding, no copy); a
pack of 25 long-tailed documents becomes a handful of buckets of similar lengths.

Within a bucket every document starts at row 0 of its padded slot, so padding only ever sits
at the end. With causal self-attention (``Lq == Lk`` per document) that padding is invisible
to real queries, and the bucket needs no mask at all.

Plans are pure functions of the document lengths and flags, and are memoized on those
values (``functools.lru_cache``): every layer of a model sees the same ``cu_seqlens`` and
reuses one plan, and two different batches can never share one by accident.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

# Fixed cost of one bucket (gather, kernel launch, scatter, forward and backward), in the
# units of the variable cost below: score elements x (head_dim + v_head_dim) x heads.
# Measured on a 2-core CPU: one call costs about as much as the attention of a
# ~50-token document with 8 heads of 64 dims. Re-measured once the gathers became one per
# input (``RowMap``): a 4096-token pack of 25 long-tailed documents runs equally fast
# (within noise) for any value from 1e5 to 1e7, and slows down from 2e7 on (less
# splitting, more padding).
CALL_COST = 2.5e6


def allowed_mask(lq: int, lk: int, causal: bool, window: tuple[int, int]) -> torch.Tensor | None:
    """Boolean ``(lq, lk)`` mask of the keys each query may see (flash-attn semantics).

    Bottom-right aligned: query ``i`` sits at key position ``i + lk - lq``. ``None`` when
    every query may see every key.

    >>> allowed_mask(2, 3, causal=True, window=(-1, -1)).int().tolist()
    [[1, 1, 0], [1, 1, 1]]
    """
    left, right = window
    if not causal and left < 0 and right < 0:
        return None
    i = torch.arange(lq).unsqueeze(1) + (lk - lq)
    j = torch.arange(lk).unsqueeze(0)
    mask = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        mask &= j <= i
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


@dataclass
class Bucket:
    """One batched attention call over ``n`` documents padded to ``lq`` x ``lk``.

    ``rows`` selects the real query rows out of the padded ``(n * lq)`` output (``None``: all
    are real). ``is_causal`` uses SDPA's own causal flag;
    ``mask`` is a boolean ``(n or 1, 1, lq, lk)`` mask; ``row_scale`` zeroes real query rows
    that may see no key (flash-attn outputs zeros there). ``docs`` are the document indices.

    The inputs of all buckets are gathered at once through the plan's ``RowMap``s (one gather
    per input, whose backward is one gather too).
    """

    n: int
    lq: int
    lk: int
    docs: list[int]
    rows: torch.Tensor | None
    is_causal: bool
    mask: torch.Tensor | None
    row_scale: torch.Tensor | None


@dataclass
class RowMap:
    """Rows of ``x`` laid out as the padded rows of the buckets, one after another.

    ``y = x[src]`` with the rows at ``src_pad`` set to zero (padding). ``dst`` is the reverse
    map: row ``j`` of ``x`` sits at ``y[dst[j]]``; rows at ``dst_pad`` appear nowhere in ``y``.
    The two directions are each other's gradient (``RowGather`` in ``backends.py``), so the
    backward of a gather is one gather too, never a zero-filled scatter per bucket.
    ``identity``: ``y`` is ``x`` (one contiguous bucket, no padding): nothing to copy.
    """

    src: torch.Tensor
    src_pad: torch.Tensor
    dst: torch.Tensor
    dst_pad: torch.Tensor
    identity: bool

    @classmethod
    def build(cls, src: np.ndarray, n_rows: int) -> RowMap:
        """From ``src`` (``-1`` = padding) over an ``x`` of ``n_rows`` rows."""
        src = np.asarray(src, dtype=np.int64)
        dst = np.full(n_rows, -1, dtype=np.int64)
        real = np.flatnonzero(src >= 0)
        dst[src[real]] = real
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        return cls(
            src=t(np.maximum(src, 0)),
            src_pad=t(np.flatnonzero(src < 0)),
            dst=t(np.maximum(dst, 0)),
            dst_pad=t(np.flatnonzero(dst < 0)),
            identity=src.size == n_rows and bool((src == np.arange(n_rows)).all()),
        )

    def to(self, device: torch.device) -> RowMap:
        move = lambda t: t.to(device)  # noqa: E731
        return RowMap(move(self.src), move(self.src_pad), move(self.dst), move(self.dst_pad), self.identity)

    def reverse(self) -> RowMap:
        """The map from ``y`` back to ``x`` (rows of ``x`` that ``y`` lacks come out as zeros)."""
        return RowMap(self.dst, self.dst_pad, self.src, self.src_pad, self.identity)


@dataclass
class BucketPlan:
    """Buckets, and how rows travel between token order and the buckets' padded layout.

    ``q_map``/``k_map`` lay the query/key rows out as the buckets' padded inputs, all buckets
    end to end (bucket ``b`` takes ``n * lq`` rows, resp. ``n * lk``); ``q_map.reverse()``
    takes the buckets' outputs back to token order, with zeros for queries of documents
    without keys. ``row_scale`` ``(total_q,)`` zeroes the query rows that may see no key
    (``None``: there are none).
    """

    buckets: list[Bucket]
    q_map: RowMap
    k_map: RowMap
    row_scale: torch.Tensor | None = None
    _on_device: dict = field(default_factory=dict, repr=False)

    def maps_on(self, device: torch.device) -> tuple[RowMap, RowMap, torch.Tensor | None, list]:
        """``(q_map, k_map, row_scale, masks)`` on ``device`` (cached per device)."""
        key = ("maps", str(device))
        if key not in self._on_device:
            scale = self.row_scale.to(device) if self.row_scale is not None else None
            masks = [b.mask.to(device) if b.mask is not None else None for b in self.buckets]
            self._on_device[key] = (self.q_map.to(device), self.k_map.to(device), scale, masks)
        return self._on_device[key]


def _cut_points(lq: np.ndarray, lk: np.ndarray, width: int) -> list[tuple[int, int]]:
    """Optimal contiguous partition of documents sorted by ``(lk, lq)`` into buckets.

    Cost of a bucket ``[i, j]``: ``CALL_COST + n * max(lq) * max(lk) * width``. Documents of
    equal ``(lq, lk)`` are never split, so the dynamic program runs over distinct shapes.
    """
    shapes, first, counts = np.unique(np.stack([lk, lq], axis=1), axis=0, return_index=True, return_counts=True)
    order = np.argsort(first)
    shapes, counts = shapes[order], counts[order]
    u = len(shapes)
    cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
    best = np.zeros(u + 1)
    cut = np.zeros(u + 1, dtype=np.int64)
    for j in range(1, u + 1):
        # Candidate buckets cover shapes i..j-1 (i = 0..j-1): max lk is shapes[j-1] (sorted),
        # max lq over the range is a reverse running maximum.
        lq_max = np.maximum.accumulate(shapes[:j, 1][::-1])[::-1].astype(np.float64)
        n_docs = cum[j] - cum[:j]
        cost = best[:j] + CALL_COST + n_docs * lq_max * float(shapes[j - 1, 0]) * width
        i = int(np.argmin(cost))
        best[j], cut[j] = cost[i], i
    spans, j = [], u
    while j > 0:
        i = int(cut[j])
        spans.append((int(cum[i]), int(cum[j])))
        j = i
    return spans[::-1]


def _make_bucket(docs, lq, lk, causal, window, needs_math) -> Bucket:
    qls, kls = [lq[d] for d in docs], [lk[d] for d in docs]
    n, Lq, Lk = len(docs), max(qls), max(kls)
    rows = None
    if any(x != Lq for x in qls):
        rows = torch.from_numpy(
            np.concatenate([m * Lq + np.arange(x) for m, x in enumerate(qls)]).astype(np.int64)
        )
    self_attn = all(a == b for a, b in zip(qls, kls))
    left, _ = window
    is_causal, mask, row_scale = False, None, None
    if causal and self_attn and left < 0 and not needs_math:
        # Right padding is invisible to real queries under a top-left causal mask.
        is_causal = True
    elif causal and self_attn:
        mask = allowed_mask(Lq, Lk, causal, window).view(1, 1, Lq, Lk)
    elif allowed_mask(1, 1, causal, window) is None and len(set(kls)) == 1:
        mask = None  # full attention over keys of one length: nothing to mask
    else:
        mask = torch.zeros(n, 1, Lq, Lk, dtype=torch.bool)
        scale = torch.ones(n, Lq)
        for m, (a, b) in enumerate(zip(qls, kls)):
            own = allowed_mask(a, b, causal, window)
            mask[m, 0, :a, :b] = True if own is None else own
            empty = ~mask[m, 0, :a].any(-1)
            scale[m, :a][empty] = 0.0
        # Rows with no key (padding, or a query that sees nothing) attend to everything so the
        # softmax stays finite; real ones are zeroed by row_scale, padded ones are dropped.
        mask |= ~mask.any(-1, keepdim=True)
        flat = scale.reshape(-1)
        flat = flat[rows] if rows is not None else flat
        row_scale = flat if bool((flat == 0).any()) else None
    return Bucket(
        n=n,
        lq=Lq,
        lk=Lk,
        docs=list(docs),
        rows=rows,
        is_causal=is_causal,
        mask=mask,
        row_scale=row_scale,
    )


@functools.lru_cache(maxsize=128)
def plan_buckets(
    cu_q: tuple[int, ...],
    cu_k: tuple[int, ...],
    causal: bool,
    window: tuple[int, int],
    width: int,
    needs_math: bool = False,
) -> BucketPlan:
    """Plan the batched calls for documents ``cu_q``/``cu_k`` (host tuples).

    ``width`` is ``heads * (head_dim + v_head_dim)``, the cost of one score element.
    ``needs_math`` (soft-capping, ALiBi) makes every causal bucket carry an explicit mask,
    because the math path has no causal flag of its own.
    """
    sq, lq = list(cu_q[:-1]), [b - a for a, b in zip(cu_q, cu_q[1:])]
    sk, lk = list(cu_k[:-1]), [b - a for a, b in zip(cu_k, cu_k[1:])]
    # Documents with queries but no keys are in no bucket: their rows come back as zeros
    # (flash-attn semantics).
    live = [d for d in range(len(lq)) if lq[d] > 0 and lk[d] > 0]
    live.sort(key=lambda d: (lk[d], lq[d], sq[d]))
    buckets = []
    if live:
        spans = _cut_points(np.array([lq[d] for d in live]), np.array([lk[d] for d in live]), width)
        buckets = [_make_bucket(live[a:b], lq, lk, causal, window, needs_math) for a, b in spans]
    q_map, k_map, row_scale = _row_maps(buckets, sq, lq, sk, lk, cu_q[-1], cu_k[-1])
    return BucketPlan(buckets=buckets, q_map=q_map, k_map=k_map, row_scale=row_scale)


def _row_maps(buckets, sq, lq, sk, lk, total_q, total_k) -> tuple[RowMap, RowMap, torch.Tensor | None]:
    """The padded layout of every bucket's queries and keys, end to end, and the row scale."""

    def src_rows(starts, lengths, width, docs):
        if not docs:
            return np.zeros(0, dtype=np.int64)
        s, n = np.asarray([starts[d] for d in docs]), np.asarray([lengths[d] for d in docs])
        pos = np.arange(width)[None, :]
        return np.where(pos < n[:, None], pos + s[:, None], -1).reshape(-1)

    empty = np.zeros(0, dtype=np.int64)
    q_src = np.concatenate([empty] + [src_rows(sq, lq, b.lq, b.docs) for b in buckets])
    k_src = np.concatenate([empty] + [src_rows(sk, lk, b.lk, b.docs) for b in buckets])
    row_scale = None
    if any(b.row_scale is not None for b in buckets):
        scale = np.ones(total_q, dtype=np.float32)
        for b in buckets:
            if b.row_scale is None:
                continue
            real, at = b.row_scale.numpy(), 0
            for d in b.docs:
                scale[sq[d] : sq[d] + lq[d]] = real[at : at + lq[d]]
                at += lq[d]
        row_scale = torch.from_numpy(scale)
    return RowMap.build(q_src, total_q), RowMap.build(k_src, total_k), row_scale
