"""The pack data contract: tokenized samples in, packed rows out.

**Samples** (``TokenizedSamples``) live in three flat arrays, never as lists of lists, so a
million samples fit in memory: ``input_ids`` and ``labels`` of every sample end to end, and
``offsets`` where sample ``i`` is ``input_ids[offsets[i]:offsets[i+1]]``. A label is the token
to learn at that position, or ``-100`` (``IGNORE_INDEX``) where nothing is learned (prompt,
system, tool results, padding).

The arrays may be memory-mapped files bigger than memory: ``layout_packs`` reads them in
pieces (``packing.chunks``) and keeps only a few int32 arrays of one value per sample, so
planning a billion tokens needs no array the size of the tokens.

**A layout** (``PackLayout``) says which token ranges (documents) go into which pack. It comes
from ``layout_packs``, which applies the overflow policy and the strategy:

* ``"bfd"`` / ``"sequential"``: every sample is one document; ``pack_plan`` groups them.
* ``"none"``: no packing, one sample per pack (for models that cannot take varlen rows).
* ``"concat"`` (XTuner's ``pack_to_max_length`` for raw text): the token stream of all samples
  is cut into rows of exactly ``max_length`` tokens (the last row may be shorter, so nothing is
  lost). A sample cut by a row boundary becomes two documents, one in each row.

**A pack** (``get_pack``) is one row, a dict of numpy arrays:

``input_ids`` ``(T,)``
    tokens of its documents, end to end.
``labels`` ``(T,)``
    the samples' labels, except that the first token of every document is ``-100``. Models
    shift labels by one (position ``t`` predicts ``labels[t + 1]``), so this is what stops the
    last token of one document from being trained to predict the first of the next: no label
    crosses a document boundary, exactly as when each sample is alone.
``position_ids`` ``(T,)``
    ``0, 1, 2, ...`` restarting at every document, as if each were alone.
``cu_seqlens`` ``(D + 1,)`` int32
    document starts and the total: document ``d`` is ``[cu_seqlens[d], cu_seqlens[d+1])``.
``max_seqlen`` int
    the longest document.

Worked example: samples ``[5, 6, 7]`` (prompt 5, answer 6 7) and ``[8, 9]`` (answer 9), labels
``[-100, 6, 7]`` and ``[-100, 9]``, packed together::

    input_ids    [5, 6, 7, 8, 9]
    labels       [-100, 6, 7, -100, 9]
    position_ids [0, 1, 2, 0, 1]
    cu_seqlens   [0, 3, 5]
    max_seqlen   3
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from packtune.packing.chunks import (
    IGNORE_INDEX,
    gather,
    non_decreasing,
    sample_lengths,
    trained_after_first,
    trained_before,
)
from packtune.config.settings import OVERFLOW_POLICIES as OVERFLOW
from packtune.config.settings import PACK_STRATEGIES
from packtune.packing.plan import plan_order

#: The layouts ``layout_packs`` makes: a pack strategy, or ``"none"`` (one sample per row, no packing).
MODES = (*PACK_STRATEGIES, "none")


@dataclass
class TokenizedSamples:
    """Samples in flat arrays: see the module docstring."""

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        self.input_ids = np.asarray(self.input_ids)
        self.labels = np.asarray(self.labels)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.input_ids.shape != self.labels.shape or self.input_ids.ndim != 1:
            raise ValueError(f"input_ids and labels must be 1-D and equal in shape, got {self.input_ids.shape} and {self.labels.shape}")
        if self.offsets.ndim != 1 or self.offsets.size == 0 or self.offsets[0] != 0 or self.offsets[-1] != self.input_ids.size:
            raise ValueError("offsets must start at 0 and end at the number of tokens")
        if not non_decreasing(self.offsets):
            raise ValueError("offsets must be non-decreasing")

    @classmethod
    def from_lists(cls, samples: Iterable[tuple[Sequence[int], Sequence[int]] | dict]) -> TokenizedSamples:
        """Build from ``(input_ids, labels)`` pairs or ``{"input_ids", "labels"}`` dicts."""
        ids, labels, lengths = [], [], [0]
        for s in samples:
            i, l = (s["input_ids"], s["labels"]) if isinstance(s, dict) else s
            if len(i) != len(l):
                raise ValueError(f"sample {len(lengths) - 1}: {len(i)} input_ids but {len(l)} labels")
            ids.append(np.asarray(i, dtype=np.int64))
            labels.append(np.asarray(l, dtype=np.int64))
            lengths.append(len(i))
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64))
        return cls(cat(ids), cat(labels), np.cumsum(lengths))

    def __len__(self) -> int:
        return self.offsets.size - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class PackingReport:
    """What packing did, every sample accounted for: ``samples == packed + dropped``."""

    samples: int = 0
    packed: int = 0
    documents: int = 0
    packs: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_length: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def utilization(self) -> float:
        """Share of the packs' capacity (``packs * max_length``) filled with tokens."""
        return self.tokens / (self.packs * self.max_length) if self.packs else 0.0

    @property
    def docs_per_pack(self) -> float:
        return self.documents / self.packs if self.packs else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["utilization"] = round(self.utilization, 6)
        out["docs_per_pack"] = round(self.docs_per_pack, 3)
        return out


@dataclass
class PackLayout:
    """Documents as token ranges ``[doc_start, doc_end)`` of the flat arrays, grouped in packs.

    Pack ``p`` holds documents ``pack_offsets[p]:pack_offsets[p+1]``, in that order.
    """

    doc_start: np.ndarray
    doc_end: np.ndarray
    pack_offsets: np.ndarray
    max_length: int

    def __len__(self) -> int:
        return self.pack_offsets.size - 1

    def pack_lengths(self) -> np.ndarray:
        """Tokens in every pack."""
        per_doc = self.doc_end - self.doc_start
        cum = np.concatenate([[0], np.cumsum(per_doc)])
        return cum[self.pack_offsets[1:]] - cum[self.pack_offsets[:-1]]


def layout_packs(
    samples: TokenizedSamples,
    max_length: int,
    strategy: str = "bfd",
    overflow: str = "truncate",
    order: np.ndarray | None = None,
) -> tuple[PackLayout, PackingReport]:
    """Decide every pack: apply ``overflow`` to long samples, then ``strategy``.

    Args:
        samples: the tokenized samples.
        max_length: tokens per pack.
        strategy: ``"bfd"``, ``"sequential"``, ``"concat"`` or ``"none"`` (module docstring).
        overflow: a sample longer than ``max_length`` is cut to its first ``max_length`` tokens
            (``"truncate"``), left out (``"drop"``) or an error (``"error"``). Not used by
            ``"concat"``, which splits instead.
        order: optional permutation of the samples to plan in (``shuffle_before_pack``):
            decides ties in bfd, and the whole grouping in sequential and concat.

    Samples left with no trainable token (after truncation) are dropped and counted under
    ``"no_trainable_token"``; empty samples under ``"empty"``.
    """
    if strategy not in MODES:
        raise ValueError(f"unknown pack strategy {strategy!r}; choose one of {', '.join(MODES)}")
    if overflow not in OVERFLOW:
        raise ValueError(f"unknown overflow policy {overflow!r}; choose one of {', '.join(OVERFLOW)}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    n = len(samples)
    idx = _permutation(order, n)
    report = PackingReport(samples=n, max_length=max_length)
    # Per-sample work in sample order, on int32 arrays of one value per sample; token arrays
    # are only read in pieces. The planning order is applied at the end.
    lengths = sample_lengths(samples.offsets)
    keep = np.ones(n, dtype=bool)
    _drop(report, keep, lengths == 0, "empty")
    if strategy == "concat":
        sel = idx[keep[idx]]
        starts = gather(samples.offsets, sel)
        return _concat_layout(samples, starts, starts + lengths[sel], max_length, report)
    over = np.flatnonzero(lengths > max_length)
    excess = lengths[over].astype(np.int64) - max_length
    if over.size:
        if overflow == "error":
            first = int(idx[np.argmax(lengths[idx] > max_length)])  # the first in planning order
            raise ValueError(f"sample {first} has {int(lengths[first])} tokens, more than max_length={max_length} (overflow='error')")
        if overflow == "drop":
            mask = np.zeros(n, dtype=bool)
            mask[over] = True
            _drop(report, keep, mask, "too_long")
        else:
            lengths[over] = max_length
    # Trained labels after each document's first token (that one is masked in its pack).
    trained = trained_after_first(samples.labels, samples.offsets, lengths)
    _drop(report, keep, trained == 0, "no_trainable_token")
    report.trained_tokens = int(trained.sum(where=keep, dtype=np.int64))
    del trained
    # Counted among the kept samples: one cut and then dropped counts as dropped only.
    report.truncated = int(keep[over].sum())
    report.truncated_tokens = int(excess[keep[over]].sum())
    sel = idx[keep[idx]]  # the kept samples, in planning order
    del keep
    doc_len = lengths[sel]
    del lengths
    if strategy == "none":
        offsets = np.arange(sel.size + 1, dtype=np.int64)
    else:
        plan, offsets = plan_order(doc_len, max_length, strategy)
        sel, doc_len = sel[plan], doc_len[plan]
        del plan
    doc_start = gather(samples.offsets, sel)
    del sel
    layout = PackLayout(doc_start, doc_start + doc_len, offsets, max_length)
    report.documents = report.packed = int(doc_len.size)
    report.packs = len(layout)
    report.tokens = int(doc_len.sum(dtype=np.int64))
    return layout, report


def _drop(report: PackingReport, keep: np.ndarray, mask: np.ndarray, reason: str) -> None:
    """Drop the kept samples in ``mask``, counting them under ``reason``."""
    count = int((mask & keep).sum())
    if count:
        report.dropped[reason] = report.dropped.get(reason, 0) + count
    keep[mask] = False


def _permutation(order: np.ndarray | None, n: int) -> np.ndarray:
    """``order`` checked to be a permutation of ``range(n)``, as int32 (4 bytes a sample)."""
    dtype = np.int32 if n < 2**31 else np.int64
    if order is None:
        return np.arange(n, dtype=dtype)
    idx = np.asarray(order)
    if idx.shape != (n,) or (n and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError("order must be a permutation of the sample indices")
    if n:
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError("order must be a permutation of the sample indices")
        seen = np.zeros(n, dtype=bool)
        seen[idx] = True
        if not seen.all():  # n values in range, all seen: each exactly once
            raise ValueError("order must be a permutation of the sample indices")
    return idx.astype(dtype, copy=False)


def _concat_layout(samples, starts, ends, max_length, report):
    """Cut the concatenated stream of the kept samples into rows of ``max_length`` tokens."""
    lengths = ends - starts
    stream_end = np.cumsum(lengths)
    stream_start = stream_end - lengths
    total = int(stream_end[-1]) if lengths.size else 0
    cuts = np.arange(0, total, max_length)
    # Every boundary (sample ends and row cuts) on the stream, in order; each consecutive pair
    # is one document, belonging to the sample it lies in and the row it lies in.
    bounds = np.unique(np.concatenate([stream_start, stream_end, cuts, [total]]))
    seg_a, seg_b = bounds[:-1], bounds[1:]
    sample = np.searchsorted(stream_end, seg_a, side="right")
    doc_start = starts[sample] + (seg_a - stream_start[sample])
    doc_end = doc_start + (seg_b - seg_a)
    row = seg_a // max_length
    offsets = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=cuts.size))]).astype(np.int64)
    layout = PackLayout(doc_start.astype(np.int64), doc_end.astype(np.int64), offsets, max_length)
    report.truncated = 0
    report.documents = int(layout.doc_start.size)
    report.packed = int(lengths.size)
    report.packs = len(layout)
    report.tokens = int((layout.doc_end - layout.doc_start).sum())
    # A document's first label is masked in its pack (see get_pack).
    cum = trained_before(samples.labels, np.concatenate([np.minimum(layout.doc_start + 1, layout.doc_end),
                                                         layout.doc_end]))
    report.trained_tokens = int(cum[cum.size // 2:].sum() - cum[:cum.size // 2].sum())
    return layout, report


def get_pack(samples: TokenizedSamples, layout: PackLayout, p: int) -> dict:
    """Pack ``p`` as a dict of numpy arrays (the fields are defined in the module docstring)."""
    a, b = int(layout.pack_offsets[p]), int(layout.pack_offsets[p + 1])
    starts, ends = layout.doc_start[a:b], layout.doc_end[a:b]
    lengths = ends - starts
    pieces = [slice(int(s), int(e)) for s, e in zip(starts, ends)]
    input_ids = np.concatenate([samples.input_ids[sl] for sl in pieces]).astype(np.int64)
    labels = np.concatenate([samples.labels[sl] for sl in pieces]).astype(np.int64)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    labels[cu[:-1]] = IGNORE_INDEX
    position_ids = np.arange(input_ids.size, dtype=np.int64) - np.repeat(cu[:-1], lengths)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": cu,
        "max_seqlen": int(lengths.max()),
    }


def build_packs(
    samples: TokenizedSamples | Iterable,
    max_length: int,
    strategy: str = "bfd",
    overflow: str = "truncate",
    order: np.ndarray | None = None,
) -> tuple[list[dict], PackingReport]:
    """Every pack as a dict, and the report. Convenience for small data; see ``layout_packs``."""
    if not isinstance(samples, TokenizedSamples):
        samples = TokenizedSamples.from_lists(samples)
    layout, report = layout_packs(samples, max_length, strategy, overflow, order)
    return [get_pack(samples, layout, p) for p in range(len(layout))], report
