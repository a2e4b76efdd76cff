"""Preference rows to packs of pairs: ``build_preference_dataset``.

A row is one of:

* ``{"prompt": str, "chosen": str, "rejected": str}``: the prompt is a user turn, each
  completion an assistant reply;
* TRL's conversational shape, ``prompt`` a message list and ``chosen``/``rejected`` assistant
  message lists, or ``chosen``/``rejected`` whole conversations sharing a prefix (UltraFeedback
  binarized), whose common prefix of messages is the prompt;
* LLaMA-Factory's shape, ``conversations`` (ShareGPT messages) as the prompt and ``chosen``/
  ``rejected`` one ShareGPT message each.

An optional number ``margin`` is kept for reward models. Messages in ``{"role", "content"}`` or
``{"from", "value"}`` form are read by ``packtune.data.formats``, with its checks.

Each pair becomes two sequences, ``prompt + chosen`` and ``prompt + rejected``, rendered with the
prompt template and labelled with the SFT rules (``Template.render``): the completion's reply is
trained through its end-of-turn token, the prompt is context (an assistant turn inside a
multi-turn prompt is context too). The sequences are stored as consecutive samples (chosen at
``2 i``, rejected at ``2 i + 1``) and packed as one unit of their summed length, so a pair is never
split: its two sequences sit one after the other in the same pack, positions restarting.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from packtune.data.cache import DataCache, pack_key, tokenize_key
from packtune.data.errors import DataError
from packtune.data.formats import BadRow, to_sample
from packtune.data.report import DataReport
from packtune.data.sources import describe_dataset, iter_batches, parse_json_line, resolve
from packtune.data.templates import Segment, Template, get_template, tidy
from packtune.data.tokenize import _fast_backend, encode_segments
from packtune.data.tokenizer_loader import tokenizer_info
from packtune.data.turns import ReplyNotFound
from packtune.packing.chunks import IGNORE_INDEX
from packtune.packing.packs import PackLayout, TokenizedSamples
from packtune.packing.plan import plan_order

BATCH_SIZE = 1000


def is_preference_row(row: Any) -> bool:
    """Whether ``row`` has the fields of a preference pair (``chosen`` and ``rejected``)."""
    return isinstance(row, dict) and "chosen" in row and "rejected" in row


def _messages(value: Any, role: str = "assistant") -> list[dict] | None:
    """A completion or prompt as a message list: a string is one ``role`` message, a dict one
    message; ``None`` when it is neither a list nor one of those."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    return None


def _conversation(messages: list[dict]) -> Any:
    """Messages in either form through ``formats``' checks: a ``Conversation`` or a ``BadRow``."""
    sharegpt = bool(messages) and isinstance(messages[0], dict) and ("from" in messages[0] or "value" in messages[0])
    key, fmt = ("conversations", "sharegpt") if sharegpt else ("messages", "messages")
    return to_sample({key: messages}, fmt)


def to_pair(row: Any) -> tuple[list[dict], list[dict], list[dict], float] | BadRow:
    """``(prompt, chosen, rejected, margin)`` as normalised message lists, or why the row is bad.

    >>> p, c, r, m = to_pair({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    >>> p, c, r, m
    ([{'role': 'user', 'content': '2+2?'}], [{'role': 'assistant', 'content': '4'}], [{'role': 'assistant', 'content': '5'}], 0.0)
    >>> u = {"role": "user", "content": "2+2?"}
    >>> to_pair({"prompt": "2+2?", "chosen": [u, {"role": "assistant", "content": "4"}],
    ...          "rejected": [u, {"role": "assistant", "content": "5"}]})[:3] == (p, c, r)
    True
    """
    if not isinstance(row, dict):
        return BadRow("not_an_object", f"a {type(row).__name__}, not an object")
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            return BadRow("missing_field", f"no {key!r}")
    margin = row.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        return BadRow("non_string_content", f"'margin' is {margin!r}, not a finite number")
    prompt_value = row.get("prompt", row.get("conversations"))
    chosen, rejected = _messages(row["chosen"]), _messages(row["rejected"])
    if chosen is None or rejected is None:
        return BadRow("non_string_content", "'chosen'/'rejected' must be strings, messages or message lists")
    if prompt_value is None or (len(chosen) > 1 and len(rejected) > 1 and chosen[0] == rejected[0]):
        # Whole conversations: the prompt is their common prefix of messages (a `prompt` field
        # beside them repeats its text, as UltraFeedback binarized writes it).
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not prompt:
            return BadRow("no_prompt", "'chosen' and 'rejected' share no message before their replies")
    else:
        prompt = _messages(prompt_value, "user")
        if prompt is None:
            return BadRow("non_string_content", f"'prompt' is {type(prompt_value).__name__}")
    system = row.get("system")
    full = []
    for side in (chosen, rejected):
        conv = _conversation(prompt + side)
        if isinstance(conv, BadRow):
            return conv
        full.append(conv.messages)
    n = len(full[0]) - len(chosen)
    if n <= 0 or all(m["role"] == "system" for m in full[0][:n]):
        return BadRow("no_prompt", "the pair has no prompt before its replies")
    if full[0][n:] == full[1][n:]:
        return BadRow("identical_completions", "chosen and rejected are identical")
    if isinstance(system, str) and system and full[0][0]["role"] != "system":
        full = [[{"role": "system", "content": system}] + f for f in full]
        n += 1
    return full[0][:n], full[0][n:], full[1][n:], float(margin)


def _lcp(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pair_segments(template: Template, prompt: list[dict], completion: list[dict], system: str | None = None,
                  train_on_reasoning: bool = True) -> list[Segment]:
    """Segments of ``prompt + completion``: the completion's replies trained as in SFT, and
    nothing before the end of the prompt's generation prompt (its own replies are context)."""
    segs = template.render(prompt + completion, system, train_on_reasoning=train_on_reasoning)
    start = _lcp("".join(t for t, _ in segs), template.prompt(prompt, system))
    out: list[Segment] = []
    pos = 0
    for text, trained in segs:
        if trained and pos < start:
            cut = min(len(text), start - pos)
            out += [(text[:cut], False), (text[cut:], True)]
        else:
            out.append((text, trained))
        pos += len(text)
    return tidy(out)


class PairEncoder:
    """Rows to tokenized pairs with one template and tokenizer."""

    def __init__(self, tokenizer: Any, template: Template, system_prompt: str | None = None,
                 train_on_reasoning: bool = True) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.train_on_reasoning = train_on_reasoning
        self._backend = _fast_backend(tokenizer)

    def segments(self, row: Any) -> tuple[list[Segment], list[Segment], float] | BadRow:
        """The chosen and rejected sequences' segments and the margin, or why the row is bad."""
        pair = to_pair(row)
        if isinstance(pair, BadRow):
            return pair
        prompt, chosen, rejected, margin = pair
        try:
            out = [pair_segments(self.template, prompt, side, self.system_prompt, self.train_on_reasoning)
                   for side in (chosen, rejected)]
        except DataError:
            raise
        except ReplyNotFound as exc:
            return BadRow("reply_not_found", str(exc))
        except Exception as exc:  # a chat template that raises for this conversation
            return BadRow("template_error", f"{type(exc).__name__}: {exc}")
        for segs in out:
            if not any(trained and text.strip() for text, trained in segs):
                return BadRow("empty_completion", "a completion renders no trained text")
        return out[0], out[1], margin

    def encode(self, rows: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str, str]]]:
        """``(input_ids, labels, lengths (2 per pair), margins, bad)`` of ``rows``."""
        segs: list[list[Segment]] = []
        margins: list[float] = []
        bad: list[tuple[int, str, str]] = []
        kept: list[int] = []
        for i, row in enumerate(rows):
            out = self.segments(row)
            if isinstance(out, BadRow):
                bad.append((i, out.reason, out.detail))
                continue
            segs += [out[0], out[1]]
            margins.append(out[2])
            kept.append(i)
        ids, labels, lengths = encode_segments(self.tokenizer, segs, self._backend)
        return ids, labels, lengths, np.asarray(margins, np.float64), bad, kept


def _trained_after_first(labels: np.ndarray, start: int, length: int) -> int:
    return int((labels[start + 1:start + length] != IGNORE_INDEX).sum())


def truncate_pair(len_c: int, len_r: int, max_length: int) -> tuple[int, int]:
    """Lengths of a pair cut to ``max_length`` tokens in all: the completions lose their ends,
    the longer one first (neither is cut below half of ``max_length`` while the other is longer).

    >>> truncate_pair(10, 4, 12), truncate_pair(10, 10, 12), truncate_pair(3, 4, 12)
    ((8, 4), (6, 6), (3, 4))
    """
    if len_c + len_r <= max_length:
        return len_c, len_r
    half = max_length // 2
    c = min(len_c, max(max_length - len_r, half))
    return c, min(len_r, max_length - c)


class PairDataset:
    """Packs of pairs. ``ds[i]`` is pack ``i`` (``get_pack``'s dict) plus ``pair_ids`` (the
    global index of each pair in it, in order) and ``margins``; its documents are the pairs'
    sequences, chosen then rejected."""

    def __init__(self, samples: TokenizedSamples, layout: PackLayout, report: DataReport, margins: np.ndarray,
                 row_ids: np.ndarray, seed: int = 0, tokenizer_info: dict | None = None, template: str = "",
                 cache_key: str | None = None, cache_dir: str | None = None) -> None:
        self.samples = samples
        self.layout = layout
        self.report = report
        self.margins = margins
        self.row_ids = row_ids  # per pair
        self.seed = seed
        self.tokenizer_info = tokenizer_info or {}
        self.template = template
        self.cache_key = cache_key  # of the pairs and their layout; None: not cached (see build_preference_dataset)
        self.cache_dir = cache_dir
        self.ref_logps: np.ndarray | None = None  # (2 * pairs,), set by precompute_ref_log_probs

    def __len__(self) -> int:
        return len(self.layout)

    def pair_ids(self, p: int) -> np.ndarray:
        a, b = int(self.layout.pack_offsets[p]), int(self.layout.pack_offsets[p + 1])
        seq = np.searchsorted(self.samples.offsets, self.layout.doc_start[a:b:2], side="right") - 1
        return (seq // 2).astype(np.int64)

    def __getitem__(self, i: int) -> dict:
        from packtune.packing.packs import get_pack

        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"pack {i} out of range (0..{n - 1})")
        i %= n
        pack = get_pack(self.samples, self.layout, i)
        ids = self.pair_ids(i)
        pack["pair_ids"] = ids
        pack["margins"] = self.margins[ids]
        if self.ref_logps is not None:
            pack["ref_logps"] = self.ref_logps.reshape(-1, 2)[ids].reshape(-1)
        return pack

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The packs' order in ``epoch``: a permutation, fixed by ``(seed, epoch)``."""
        return np.random.default_rng([self.seed, epoch, 0x9ACC]).permutation(len(self))

    def pack_lengths(self) -> np.ndarray:
        return self.layout.pack_lengths()

    def row_of_document(self, doc: int) -> int:
        seq = int(np.searchsorted(self.samples.offsets, int(self.layout.doc_start[doc]), side="right")) - 1
        return int(self.row_ids[seq // 2])

    def document_role(self, doc: int) -> str:
        """``pair 3 chosen`` / ``pair 3 rejected``: what document ``doc`` of the layout is."""
        seq = int(np.searchsorted(self.samples.offsets, int(self.layout.doc_start[doc]), side="right")) - 1
        return f"pair {seq // 2} {'chosen' if seq % 2 == 0 else 'rejected'}"

    def __repr__(self) -> str:
        r = self.report
        return f"PairDataset({len(self)} packs of max {r.max_length} tokens, {r.packed} pairs)"


def layout_pairs(samples: TokenizedSamples, max_length: int, strategy: str, overflow: str,
                 order: np.ndarray | None) -> tuple[PackLayout, dict]:
    """Plan packs of whole pairs (``overflow`` applied per pair); the layout and the counts."""
    lengths = np.diff(samples.offsets).reshape(-1, 2)
    pairs = lengths.shape[0]
    idx = np.arange(pairs) if order is None else np.asarray(order)
    keep = np.ones(pairs, bool)
    cut = lengths.copy()
    dropped: dict[str, int] = {}
    truncated = truncated_tokens = trained = 0
    for i in range(pairs):
        lc, lr = int(lengths[i, 0]), int(lengths[i, 1])
        if lc + lr > max_length:
            if overflow == "error":
                raise DataError(f"pair {i} has {lc + lr} tokens, more than max_length={max_length} (overflow = 'error'); "
                                "use overflow = 'truncate' or 'drop'")
            if overflow == "drop":
                keep[i] = False
                dropped["too_long"] = dropped.get("too_long", 0) + 1
                continue
            cut[i] = truncate_pair(lc, lr, max_length)
        starts = samples.offsets[2 * i:2 * i + 2]
        t = [_trained_after_first(samples.labels, int(s), int(n)) for s, n in zip(starts, cut[i])]
        if min(t) == 0:
            keep[i] = False
            dropped["no_trainable_token"] = dropped.get("no_trainable_token", 0) + 1
            continue
        trained += sum(t)
        if lc + lr > max_length:
            truncated += 1
            truncated_tokens += lc + lr - int(cut[i].sum())
    sel = idx[keep[idx]]
    plan, offsets = plan_order(cut[sel].sum(axis=1), max_length, strategy)
    sel = sel[plan]
    starts = samples.offsets[:-1].reshape(-1, 2)[sel]
    doc_start = starts.reshape(-1).astype(np.int64)
    doc_end = (starts + cut[sel]).reshape(-1).astype(np.int64)
    layout = PackLayout(doc_start, doc_end, (offsets * 2).astype(np.int64), max_length)
    counts = {"dropped": dropped, "truncated": truncated, "truncated_tokens": truncated_tokens,
              "trained_tokens": trained, "packed": int(sel.size)}
    return layout, counts


TOK_ARRAYS = ("input_ids", "labels", "offsets", "margins", "row_ids")
PACK_ARRAYS = ("doc_start", "doc_end", "pack_offsets")


def build_preference_dataset(options: Any, tokenizer: Any) -> PairDataset:
    """Read, tokenize and pack (or reuse from the cache) the preference pairs of ``options``.

    Cached on disk like SFT data (``packtune.data.cache``), in two levels: ``pairtok-KEY`` (the
    tokenized pairs, their margins and rows; KEY hashes the data, tokenizer, template, system
    prompt, ``train_on_reasoning``, split and ``max_samples``) and ``pairpack-KEY`` (the layout
    and the report; KEY adds ``max_length``, strategy, overflow, ``shuffle_before_pack`` and
    ``seed``). The dataset's ``cache_key`` is the second KEY: precomputed reference log-probs
    are stored beside it (``packtune.preference.model.precompute_reference``).

    Bad rows are counted per reason (``on_bad_row = 'skip'``) or raise ``DataError`` naming
    the first (``'error'``); every pair is accounted for in the report: ``samples_read ==
    kept + skipped`` and ``kept == packed + dropped`` count pairs.
    """
    strategy = options.pack_strategy
    if strategy not in ("bfd", "sequential"):
        raise DataError(f"pack_strategy {strategy!r} splits samples; preference pairs pack with 'bfd' or 'sequential'")
    try:
        template = get_template(options.prompt_template, tokenizer)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    cache = DataCache(options.data_cache_dir)
    parts = resolve(options.dataset, options.dataset_split, streaming=options.dataset_streaming)
    data = cache.fingerprints(parts, "its pairs are not cached: every run tokenizes them again")
    tok_key = tokenize_key(data, tokenizer, template, options, kind="preference pairs")
    hit = cache.load("pairtok", tok_key, TOK_ARRAYS) if tok_key is not None else None
    tok_hit = hit is not None
    if hit is None:
        hit = _tokenize_pairs(parts, options, tokenizer, template)
        if tok_key is not None:
            cache.save("pairtok", tok_key, *hit)
    arrays, tok_meta = hit
    samples = TokenizedSamples(arrays["input_ids"], arrays["labels"], arrays["offsets"])
    layout_key = pack_key(tok_key, options, strategy)
    layout, report, pack_hit = cache.layout(
        "pairpack", layout_key, options.max_length, lambda: _pack_pairs(samples, tok_meta, options, tokenizer, strategy))
    report.tokenize_cache_hit = tok_hit
    report.cache_hit = tok_hit and pack_hit
    report.cache_dir = str(cache.dir)
    return PairDataset(samples, layout, report, arrays["margins"], arrays["row_ids"], seed=options.seed,
                       tokenizer_info=tokenizer_info(tokenizer), template=template.name,
                       cache_key=layout_key, cache_dir=options.data_cache_dir)


def _tokenize_pairs(parts: list, options: Any, tokenizer: Any, template: Template) -> tuple[dict[str, np.ndarray], dict]:
    """Every row of ``parts`` as tokenized pairs: the arrays of ``TOK_ARRAYS`` and the meta
    (rows read, bad rows per reason with an example each, time)."""
    t0 = time.perf_counter()
    encoder = PairEncoder(tokenizer, template, options.system_prompt, options.train_on_reasoning)
    ids, labels, lengths, margins, row_ids = [], [], [], [], []
    skipped: dict[str, int] = {}
    examples: dict[str, str] = {}
    read = 0
    for batch in iter_batches(parts, ["preference"] * len(parts), options.dataset_split, options.max_samples, BATCH_SIZE):
        rows = []
        for i, item in enumerate(batch.items):
            if batch.parse:
                try:
                    item = json.loads(item)
                except json.JSONDecodeError:
                    parse_json_line(item, batch.where, batch.lines[i])  # raises, naming file and line
            rows.append(item)
        b_ids, b_labels, b_lengths, b_margins, bad, kept = encoder.encode(rows)
        if bad and options.on_bad_row == "error":
            i, reason, detail = bad[0]
            raise DataError(f"{batch.location(i)}: bad row ({reason}: {detail}); "
                            "set on_bad_row = 'skip' to skip and count such rows")
        for i, reason, detail in bad:
            skipped[reason] = skipped.get(reason, 0) + 1
            examples.setdefault(reason, f"{batch.location(i)}: {detail}")
        ids.append(b_ids)
        labels.append(b_labels)
        lengths.append(b_lengths)
        margins.append(b_margins)
        row_ids.append(batch.start + np.asarray(kept, np.int64))
        read += len(rows)
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    all_lengths = cat(lengths, np.int64)
    seconds = time.perf_counter() - t0
    arrays = {"input_ids": cat(ids, np.int32), "labels": cat(labels, np.int32),
              "offsets": np.concatenate([[0], np.cumsum(all_lengths)]).astype(np.int64),
              "margins": cat(margins, np.float64), "row_ids": cat(row_ids, np.int64)}
    meta = {"read": read, "skipped": skipped, "examples": examples, "seconds": seconds,
            "tokens_per_s": float(all_lengths.sum()) / max(seconds, 1e-9), "template": template.name}
    return arrays, meta


def _pack_pairs(samples: TokenizedSamples, tok_meta: dict, options: Any, tokenizer: Any,
                strategy: str) -> tuple[PackLayout, DataReport]:
    """The layout of whole pairs (``layout_pairs``) and the data report."""
    pairs = len(samples) // 2
    order = np.random.default_rng(options.seed).permutation(pairs) if options.shuffle_before_pack else None
    layout, counts = layout_pairs(samples, options.max_length, strategy, options.overflow, order)
    all_lengths = np.diff(np.asarray(samples.offsets))
    pair_len = all_lengths.reshape(-1, 2).sum(axis=1) if pairs else np.zeros(0, np.int64)
    tokens_packed = int((layout.doc_end - layout.doc_start).sum())
    report = DataReport(
        kept=pairs,
        tokens=int(all_lengths.sum()), trained_tokens=counts["trained_tokens"], truncated=counts["truncated"],
        truncated_tokens=counts["truncated_tokens"], dropped=counts["dropped"], packed=counts["packed"],
        documents=2 * counts["packed"], packs=len(layout), packed_tokens=tokens_packed, max_length=options.max_length,
        strategy=f"{strategy} (whole pairs)",
        utilization=round(tokens_packed / (len(layout) * options.max_length), 6) if len(layout) else 0.0,
        docs_per_pack=round(2 * counts["packed"] / len(layout), 4) if len(layout) else 0.0,
        min_packs=-(-tokens_packed // options.max_length),
        length_min=int(pair_len.min()) if pairs else 0, length_mean=round(float(pair_len.mean()), 2) if pairs else 0.0,
        length_max=int(pair_len.max()) if pairs else 0,
    ).add_reading({**tok_meta, "formats": {"preference": tok_meta["read"]}}, tokenizer,
                  describe_dataset(options.dataset, options.dataset_split))
    return layout, report


def dataset_builder(method: str) -> Callable[[Any, Any], Any]:
    """The builder of a run's data, ``builder(options, tokenizer)``: packs of samples for
    ``method = 'sft'`` (``packtune.data.build_dataset``), packs of whole pairs for the others."""
    if method == "sft":
        from packtune.data import build_dataset

        return build_dataset
    return build_preference_dataset
