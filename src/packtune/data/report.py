"""What the pipeline did: ``DataReport``, printed by ``format_report``; packs shown by ``show_packs``.

Every row is accounted for, twice over::

    samples_read == kept + sum(skipped.values())     # rows -> samples (formats, templates)
    kept         == packed + sum(dropped.values())   # samples -> packs (overflow, no label)

``show_packs`` decodes packs for reading, with the trained tokens marked apart from the
masked ones (``«`` and ``»`` around trained text, or colour on a terminal), under a legend, so
that a person can check by eye what a new chat template trains: each reply from where the
generation prompt ends through its end-of-turn token, nothing of the system, user or tool turns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from packtune.data.formats import BAD_ROW_REASONS
from packtune.packing.packs import IGNORE_INDEX

DROP_REASONS = {
    "empty": "the sample has no token",
    "too_long": "longer than max_length (overflow = 'drop')",
    "no_trainable_token": "no trained token left (after truncation)",
}


@dataclass
class DataReport:
    """Counts of one ``build_dataset`` run (see the module docstring for the invariants)."""

    dataset: str = ""
    formats: dict[str, int] = field(default_factory=dict)
    template: str = ""
    tokenizer: str = ""
    samples_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    #: The first skipped row of each reason: where, and why (e.g. the chat template's message).
    skip_examples: dict[str, str] = field(default_factory=dict)
    kept: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    packed: int = 0
    documents: int = 0
    packs: int = 0
    packed_tokens: int = 0
    max_length: int = 0
    strategy: str = ""
    utilization: float = 0.0
    docs_per_pack: float = 0.0
    min_packs: int = 0
    length_min: int = 0
    length_mean: float = 0.0
    length_max: int = 0
    tokenize_seconds: float = 0.0
    tokenize_tokens_per_s: float = 0.0
    num_proc: int = 1
    cache_hit: bool = False
    tokenize_cache_hit: bool = False
    cache_dir: str = ""

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def check(self) -> None:
        """Raise ``AssertionError`` when the counts do not add up (also under ``python -O``)."""
        if self.samples_read != self.kept + self.skipped_total or self.kept != self.packed + self.dropped_total:
            raise AssertionError(f"the data report's counts do not add up: {self}")

    def add_reading(self, meta: dict[str, Any], tokenizer: Any, dataset: str,
                    template: str | None = None) -> DataReport:
        """Fill in what reading and tokenizing the rows did, from its record ``meta`` (a
        tokenized cache entry's meta: ``read``, ``skipped``, ``examples``, ``formats``,
        ``seconds``, ``tokens_per_s``, ``num_proc``, ``template``), the tokenizer's name and
        the ``dataset``'s description (``describe_dataset``); ``template`` names the template
        instead of ``meta``'s. Returns the report."""
        self.dataset = dataset
        self.tokenizer = str(getattr(tokenizer, "name_or_path", "")) or type(tokenizer).__name__
        self.formats = dict(meta["formats"])
        self.template = meta["template"] if template is None else template
        self.samples_read = meta["read"]
        self.skipped = dict(meta["skipped"])
        self.skip_examples = dict(meta.get("examples", {}))
        self.tokenize_seconds = round(meta["seconds"], 3)
        self.tokenize_tokens_per_s = round(meta["tokens_per_s"], 1)
        self.num_proc = meta.get("num_proc", 1)
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataReport:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


def _n(x: int | float) -> str:
    return f"{x:,}"


def format_report(r: DataReport) -> str:
    """The report as aligned lines for a terminal."""
    rows: list[tuple[str, str]] = [
        ("dataset", r.dataset),
        ("format", ", ".join(f"{k} ({_n(v)} rows)" for k, v in r.formats.items()) or "-"),
        ("template", r.template),
        ("tokenizer", r.tokenizer),
        ("samples read", _n(r.samples_read)),
        ("  kept", _n(r.kept)),
        ("  skipped", _n(r.skipped_total)),
    ]
    for reason, count in sorted(r.skipped.items()):
        rows.append((f"    {reason}", f"{_n(count)}  ({BAD_ROW_REASONS.get(reason, '')})"))
        if reason in r.skip_examples:
            example = r.skip_examples[reason]
            rows.append(("", f"  first: {example if len(example) <= 300 else example[:297] + '...'}"))
    rows += [
        ("tokens", f"{_n(r.tokens)} in kept samples; {_n(r.trained_tokens)} trained in packs"),
        ("sample length", f"min {_n(r.length_min)}, mean {r.length_mean:,.1f}, max {_n(r.length_max)}"),
        ("truncated", f"{_n(r.truncated)} samples ({_n(r.truncated_tokens)} tokens cut)"),
        ("dropped", _n(r.dropped_total)),
    ]
    for reason, count in sorted(r.dropped.items()):
        rows.append((f"  {reason}", f"{_n(count)}  ({DROP_REASONS.get(reason, '')})"))
    rows += [
        ("packs", f"{_n(r.packs)} ({r.strategy}, max_length {_n(r.max_length)}; "
                  f"at least {_n(r.min_packs)} needed)"),
        ("documents", f"{_n(r.documents)} from {_n(r.packed)} samples"),
        ("utilization", f"{100 * r.utilization:.2f}% ({_n(r.packed_tokens)} tokens)"),
        ("docs per pack", f"{r.docs_per_pack:.2f}"),
        ("tokenization", f"{r.tokenize_seconds:.2f} s, {r.tokenize_tokens_per_s:,.0f} tokens/s, "
                         f"{r.num_proc} process{'es' if r.num_proc > 1 else ''}"),
        ("cache", ("hit" if r.cache_hit else "tokenized: hit, packed: built" if r.tokenize_cache_hit else "built")
         + (f" ({r.cache_dir})" if r.cache_dir else "")),
    ]
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in rows)


def _pieces(tokenizer: Any, ids: list[int], trained: np.ndarray) -> list[tuple[str, bool]]:
    """Decoded runs of equally-marked tokens. Each run is the growth of the decoded prefix, so
    spaces at run boundaries survive (decoding a run alone may drop a leading space)."""
    out: list[tuple[str, bool]] = []
    bounds = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    edges = [0, *bounds.tolist(), len(ids)]
    prev = ""
    for a, b in zip(edges, edges[1:]):
        cur = tokenizer.decode(ids[:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece = cur[len(prev):] if cur.startswith(prev) else tokenizer.decode(ids[a:b], skip_special_tokens=False)
        out.append((piece, bool(trained[a])))
        prev = cur
    return out


def show_packs(dataset: Any, n: int, tokenizer: Any, color: bool = False, max_chars: int | None = None) -> str:
    """The first ``n`` packs of ``dataset`` decoded, document by document, trained text marked."""
    on, off = ("\x1b[1;32m", "\x1b[0m") if color else ("«", "»")
    lines = [f"legend: {on}trained text{off} is learned (label = the token itself); the rest is context "
             "(label -100). A reply should be marked from where the generation prompt ends through the token "
             "that ends its turn; the first token of every document is never trained (pack contract)."]
    for p in range(min(n, len(dataset))):
        pack = dataset[p]
        cu = pack["cu_seqlens"]
        trained_total = int((pack["labels"] != IGNORE_INDEX).sum())
        lines.append(f"=== pack {p}: {cu[-1]} tokens, {len(cu) - 1} documents, {trained_total} trained "
                     f"({100 * cu[-1] / dataset.layout.max_length:.1f}% full) ===")
        a0 = int(dataset.layout.pack_offsets[p])
        for d in range(len(cu) - 1):
            a, b = int(cu[d]), int(cu[d + 1])
            labels = pack["labels"][a:b]
            # The label at t is the token at t (labels are not shifted): mark it by its id.
            trained = labels != IGNORE_INDEX
            row = dataset.row_of_document(a0 + d)
            role = getattr(dataset, "document_role", None)  # preference pairs: "pair 3 chosen"
            row = f"{row}, {role(a0 + d)}" if role else row
            lines.append(f"--- document {d + 1}/{len(cu) - 1}: row {row}, {b - a} tokens, "
                         f"{int(trained.sum())} trained ---")
            text = "".join(f"{on}{s}{off}" if t else s
                           for s, t in _pieces(tokenizer, pack["input_ids"][a:b].tolist(), trained))
            if max_chars is not None and len(text) > max_chars:
                more = len(text) - max_chars
                text = text[:max_chars]
                if text.count(on) > text.count(off):
                    text += off  # close the mark the cut left open
                text += f" [... {more:,} more characters]"
            lines.append(text)
    return "\n".join(lines)
