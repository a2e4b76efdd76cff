"""``build_dataset``: from ``DataOptions`` and a tokenizer to a ``PackedDataset`` of packs.

Steps, each cached on disk (``cache``): resolve the sources, detect each file's format,
tokenize every row with the prompt template (``tokenize``), then plan the packs over the
whole dataset at once with ``layout_packs`` (``pack_plan``'s BFD by default).
``shuffle_before_pack`` and ``seed`` decide the order the samples are planned in (which
samples share a pack); ``epoch_order(epoch)`` re-orders the packs every epoch.

>>> tok = load_tokenizer("packtune://mistral-v1")                        # doctest: +SKIP
>>> ds = build_dataset(DataOptions(dataset="train.jsonl", max_length=2048), tok)  # doctest: +SKIP
>>> len(ds), ds[0]["cu_seqlens"], ds.report.utilization                   # doctest: +SKIP
(155, array([   0,  312,  771, ..., 2048], dtype=int32), 0.9986)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from packtune.data.cache import DataCache, pack_key, tokenize_key
from packtune.data.errors import DataError
from packtune.data.formats import check_format_name, detect_format
from packtune.config.settings import BAD_ROW_POLICIES, PACK_STRATEGIES
from packtune.data.options import DataOptions
from packtune.data.report import DataReport
from packtune.data.sources import LocalFile, Part, describe_dataset, iter_batches, resolve
from packtune.data.templates import Template, check_template_name, get_template
from packtune.data.tokenize import Encoder, tokenize_batches
from packtune.data.tokenizer_loader import tokenizer_info
from packtune.packing.chunks import sample_lengths
from packtune.packing.packs import OVERFLOW, PackLayout, TokenizedSamples, get_pack, layout_packs

TOK_ARRAYS = ("input_ids", "labels", "offsets", "row_ids")
BATCH_SIZE = 1000


class PackedDataset:
    """Packs of tokenized samples: ``ds[i]`` is pack ``i`` (``get_pack``'s dict)."""

    def __init__(self, samples: TokenizedSamples, layout: PackLayout, report: DataReport, *,
                 row_ids: np.ndarray | None = None, options: DataOptions | None = None,
                 tokenizer_info: dict | None = None, template: str = "") -> None:
        self.samples = samples
        self.layout = layout
        self.report = report
        self.row_ids = row_ids if row_ids is not None else np.arange(len(samples))
        self.options = options
        self.tokenizer_info = tokenizer_info or {}
        self.template = template
        self.seed = options.seed if options is not None else 0

    def __len__(self) -> int:
        return len(self.layout)

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"pack {i} out of range (0..{n - 1})")
        return get_pack(self.samples, self.layout, i % n)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The packs' order in ``epoch``: a permutation, fixed by ``(seed, epoch)``."""
        return np.random.default_rng([self.seed, epoch, 0x9ACC]).permutation(len(self))

    def pack_lengths(self) -> np.ndarray:
        """Tokens in every pack."""
        return self.layout.pack_lengths()

    def row_of_document(self, doc: int) -> int:
        """The row (0-based, over all rows read) that document ``doc`` of the layout comes from."""
        start = int(self.layout.doc_start[doc])
        sample = int(np.searchsorted(self.samples.offsets, start, side="right")) - 1
        return int(self.row_ids[sample])

    def __repr__(self) -> str:
        r = self.report
        return (f"PackedDataset({len(self)} packs of max {r.max_length} tokens, {r.packed} samples, "
                f"utilization {r.utilization:.2%})")


def _check(options: DataOptions) -> None:
    check_format_name(options.dataset_format)
    check_template_name(options.prompt_template)
    for name, value, known in (("pack_strategy", options.pack_strategy, PACK_STRATEGIES),
                               ("overflow", options.overflow, OVERFLOW),
                               ("on_bad_row", options.on_bad_row, BAD_ROW_POLICIES)):
        if value not in known:
            raise DataError(f"unknown {name} {value!r}; known: {', '.join(known)}")
    if options.max_length < 2:
        raise DataError(f"max_length must be >= 2, got {options.max_length}")
    if options.max_samples is not None and options.max_samples < 1:
        raise DataError(f"max_samples must be >= 1 or None, got {options.max_samples}")


def _formats(parts: list[Part], fmt: str) -> list[str]:
    if fmt != "auto":
        return [fmt] * len(parts)
    out = []
    for p in parts:
        if isinstance(p, LocalFile) and p.kind == "txt":
            out.append("text")
        else:
            out.append(detect_format(p.head(), p.name))
    return out


def build_dataset(options: DataOptions, tokenizer: Any) -> PackedDataset:
    """Load (or reuse from the cache) the packed dataset described by ``options``.

    Raises ``DataError`` (a ``ValueError``) for an unknown format/template/strategy name
    (listing the known ones), a missing file, a line that is not JSON (file and line), a
    bad row under ``on_bad_row="error"``, or a too long sample under ``overflow="error"``.
    """
    try:
        _check(options)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    cache = DataCache(options.data_cache_dir)
    parts = resolve(options.dataset, options.dataset_split, streaming=options.dataset_streaming)
    try:
        template = get_template(options.prompt_template, tokenizer)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    data = cache.fingerprints(parts, "its tokenized data is not cached: every run tokenizes it again")
    tok_key = tokenize_key(data, tokenizer, template, options, format=options.dataset_format)
    (arrays, tok_meta), tok_hit = _tokenized(cache, tok_key, parts, options, tokenizer, template)
    samples = TokenizedSamples(arrays["input_ids"], arrays["labels"], arrays["offsets"])
    row_ids = arrays["row_ids"]
    strategy, template_name = _strategy(options, tok_meta["formats"], tok_meta["template"])
    name = describe_dataset(options.dataset, options.dataset_split)

    def pack() -> tuple[PackLayout, DataReport]:
        layout, report = _pack(samples, row_ids, options, strategy)
        return layout, report.add_reading(tok_meta, tokenizer, name, template=template_name)

    layout, report, pack_hit = cache.layout("pack", pack_key(tok_key, options, strategy), options.max_length, pack)
    report.dataset = name  # a cached report may name other files with the same bytes
    report.tokenize_cache_hit = tok_hit
    report.cache_hit = tok_hit and pack_hit
    report.cache_dir = str(cache.dir)
    return PackedDataset(samples, layout, report, row_ids=row_ids, options=options,
                         tokenizer_info=tokenizer_info(tokenizer), template=template.name)


def _strategy(options: DataOptions, formats: dict[str, int], template: str) -> tuple[str, str]:
    """The packing strategy for rows of these ``formats`` (raw text is concatenated) and the
    template as the report names it."""
    fmts = [f for f, n in formats.items() if n]
    strategy = options.effective_strategy("text" if fmts and all(f == "text" for f in fmts) else None)
    return strategy, "none (raw text)" if strategy == "concat" and fmts == ["text"] else template


def _tokenized(cache: DataCache, key: str | None, parts: list[Part], options: DataOptions, tokenizer: Any,
               template: Template) -> tuple[tuple[dict[str, np.ndarray], dict], bool]:
    """The tokenized rows (arrays and meta) from the cache entry ``key``, or tokenized now
    (``_tokenize``); and whether the cache had them."""
    hit = cache.load("tok", key, TOK_ARRAYS) if key is not None else None
    if hit is not None:
        return hit, True
    return _tokenize(cache, key, parts, options, tokenizer, template), False


def _tokenize(cache: DataCache, key: str | None, parts: list[Part], options: DataOptions, tokenizer: Any,
              template: Template) -> tuple[dict[str, np.ndarray], dict]:
    """Tokenize every row straight into a new cache entry (streamed batch by batch, see
    ``tokenize_batches``); its arrays, memory-mapped, and meta. A failure or an interrupt
    leaves no entry behind."""
    formats = _formats(parts, options.dataset_format)
    encoder = Encoder(tokenizer, template, options.system_prompt, options.train_on_reasoning)
    batches = iter_batches(parts, formats, options.dataset_split, options.max_samples, BATCH_SIZE)
    tmp = cache.begin("tok", key)
    try:
        res = tokenize_batches(encoder, batches, options.num_proc, options.on_bad_row, out_dir=tmp)
        meta = {"read": res.read, "skipped": res.skipped, "examples": res.examples, "formats": res.formats,
                "seconds": res.seconds, "tokens_per_s": res.tokens_per_s, "num_proc": res.num_proc,
                "template": template.name}
        del res  # unmap the files before their folder is renamed
        entry = cache.commit(tmp, "tok", key, meta)
    except BaseException:
        cache.discard(tmp)
        raise
    hit = cache.load_folder(entry, TOK_ARRAYS)
    cache.release(entry)
    if hit is None:
        raise DataError(f"the tokenized data just written to {entry} cannot be read back")
    return hit


def _pack(samples: TokenizedSamples, row_ids: np.ndarray, options: DataOptions,
          strategy: str) -> tuple[PackLayout, DataReport]:
    lengths = sample_lengths(samples.offsets)  # int32: 4 bytes a sample
    if options.overflow == "error" and strategy != "concat" and lengths.size and lengths.max() > options.max_length:
        i = int(np.argmax(lengths > options.max_length))
        raise DataError(f"row {int(row_ids[i])} (0-based) has {int(lengths[i])} tokens, more than max_length="
                        f"{options.max_length} (overflow = 'error'); use overflow = 'truncate' or 'drop'")
    stats = (int(lengths.min()), round(float(lengths.mean()), 2), int(lengths.max())) if lengths.size else (0, 0.0, 0)
    total = int(lengths.sum(dtype=np.int64))
    del lengths
    order = None
    if options.shuffle_before_pack:
        order = np.random.default_rng(options.seed).permutation(len(samples))
        order = order.astype(np.int32 if order.size < 2**31 else np.int64)  # 4 bytes a sample
    layout, pr = layout_packs(samples, options.max_length, strategy, options.overflow, order)
    report = DataReport(
        kept=len(samples), tokens=total, trained_tokens=pr.trained_tokens, truncated=pr.truncated,
        truncated_tokens=pr.truncated_tokens, dropped=dict(pr.dropped), packed=pr.packed, documents=pr.documents,
        packs=pr.packs, packed_tokens=pr.tokens, max_length=options.max_length, strategy=strategy,
        utilization=round(pr.utilization, 6), docs_per_pack=round(pr.docs_per_pack, 4),
        min_packs=-(-pr.tokens // options.max_length),
        length_min=stats[0], length_mean=stats[1], length_max=stats[2],
    )
    return layout, report


def render_prompt(messages_or_text: str | Sequence[dict], tokenizer: Any, template: str | Template = "auto",
                  system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt for generation: the conversation rendered with ``template`` up to
    where the assistant's reply starts (a string is one user message).

    >>> tok = load_tokenizer("packtune://mistral-v1")                           # doctest: +SKIP
    >>> tok.decode(render_prompt("Hi", tok, "mistral"))                         # doctest: +SKIP
    '<s>[INST] Hi [/INST]'
    """
    if isinstance(messages_or_text, str):
        messages = [{"role": "user", "content": messages_or_text}]
    else:
        messages = list(messages_or_text)
    tpl = template if isinstance(template, Template) else get_template(template, tokenizer)
    text = tpl.prompt(messages, system_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

