"""Rows to ``TokenizedSamples``: batched, in parallel, into flat arrays.

Each batch of rows becomes samples: row -> conversation (``formats``) -> segments
(``templates``) -> one string per sample -> token ids. The whole string of a sample is
tokenized at once (exactly what the model sees at inference), and a token is trained when
its last character lies in a trainable segment (``label_tokens``). This needs a fast
(Rust) tokenizer's character offsets; a slow tokenizer is tokenized segment by segment.

Batches are tokenized with the fast tokenizer's batch encoder (itself multi-threaded) and,
when there is more than one batch and ``num_proc`` allows, in worker processes, a few
batches in flight at a time so memory stays bounded. Each batch's arrays are appended to
``.npy`` files on disk as they arrive (``tokenize_batches``): the result is flat arrays
(ids, labels, offsets) mapped from those files, never a list of lists nor one concatenation
in memory, so a billion tokens are tokenized in the memory of a few batches.

>>> from packtune.data.tokenizer_loader import load_tokenizer      # doctest: +SKIP
>>> tok = load_tokenizer("packtune://mistral-v1")           # doctest: +SKIP
>>> segments = [("<s>[INST] Hi [/INST]", False), (" Yo</s>", True)]  # doctest: +SKIP
>>> ids, labels, lengths = encode_segments(tok, [segments])  # doctest: +SKIP
>>> labels.tolist()                                          # doctest: +SKIP
[-100, -100, -100, -100, -100, -100, -100, -100, -100, 627, 2]
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packtune.config.settings import BAD_ROW_POLICIES
from packtune.data.cache import NpyAppender
from packtune.data.errors import DataError
from packtune.data.formats import BadRow, to_sample
from packtune.data.sources import RawBatch, parse_json_line
from packtune.data.templates import Segment, Template
from packtune.data.tokenizer_loader import _backend
from packtune.data.turns import ReplyNotFound, ReplyNotRendered
from packtune.packing.packs import IGNORE_INDEX, TokenizedSamples

MAX_WORKERS = 8
#: Fewer batches than this are tokenized in this process (starting workers would cost more).
POOL_MIN_BATCHES = 4
#: The files ``tokenize_batches`` writes, and their dtypes.
SAMPLE_ARRAYS = {"input_ids": np.int32, "labels": np.int32, "offsets": np.int64, "row_ids": np.int64}


@dataclass
class EncodedBatch:
    """One batch tokenized: flat ids/labels, the length and row number of every kept sample,
    and the skipped rows as ``(index in batch, reason, detail)``."""

    input_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    row_ids: np.ndarray
    bad: list[tuple[int, str, str]]
    rows: int
    fmt: str


@dataclass
class TokenizeResult:
    """All rows tokenized, and the counts of what happened to them."""

    samples: TokenizedSamples
    row_ids: np.ndarray
    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    #: The first skipped row of each reason: where it is and why (a template's own message).
    examples: dict[str, str] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    num_proc: int = 1

    @property
    def tokens_per_s(self) -> float:
        return self.samples.input_ids.size / self.seconds if self.seconds > 0 else 0.0


def _fast_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer, with truncation and padding off (copied if they were on)."""
    backend = _backend(tokenizer)
    if backend is None:
        return None
    if backend.truncation is not None or backend.padding is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return backend


def label_tokens(ids: np.ndarray, offsets: np.ndarray, span_start: np.ndarray, span_end: np.ndarray) -> np.ndarray:
    """Labels: ``ids`` where a token's last character is in a span ``[start, end)``, else -100.

    ``offsets`` are ``(start, end)`` character offsets of the tokens; spans are sorted and
    disjoint, in the same character coordinates.

    >>> label_tokens(np.array([7, 8, 9]), np.array([[0, 2], [2, 5], [5, 6]]), np.array([3]), np.array([6])).tolist()
    [-100, 8, 9]
    """
    probe = np.maximum(offsets[:, 1] - 1, offsets[:, 0])
    k = np.searchsorted(span_start, probe, side="right") - 1
    inside = (k >= 0) & (probe < span_end[np.maximum(k, 0)]) if span_end.size else np.zeros(probe.shape, bool)
    return np.where(inside, ids, IGNORE_INDEX)


def encode_segments(tokenizer: Any, samples: Sequence[Sequence[Segment]],
                    backend: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize samples given as segments: ``(input_ids, labels, lengths)``, flat int arrays."""
    texts: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    base = 0
    for segs in samples:
        pos = base
        for text, trained in segs:
            if trained and text:
                if ends and ends[-1] == pos:
                    ends[-1] = pos + len(text)  # merge touching spans
                else:
                    starts.append(pos)
                    ends.append(pos + len(text))
            pos += len(text)
        texts.append("".join(t for t, _ in segs))
        base = pos
    if not texts:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64)
    backend = backend if backend is not None else _fast_backend(tokenizer)
    if backend is None:
        return _encode_slow(tokenizer, samples)
    encs = backend.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encs), np.int64, len(encs))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), np.int64, total)
    offsets = np.fromiter(itertools.chain.from_iterable(e.offsets for e in encs), np.dtype((np.int64, 2)), total)
    text_base = np.cumsum([0] + [len(t) for t in texts[:-1]], dtype=np.int64)
    offsets = offsets.reshape(total, 2) + np.repeat(text_base, lengths)[:, None]
    labels = label_tokens(ids, offsets, np.asarray(starts, np.int64), np.asarray(ends, np.int64))
    return ids.astype(np.int32), labels.astype(np.int32), lengths


def _encode_slow(tokenizer: Any, samples: Sequence[Sequence[Segment]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment by segment, for tokenizers without character offsets."""
    ids: list[int] = []
    labels: list[int] = []
    lengths = []
    for segs in samples:
        n = 0
        for text, trained in segs:
            if not text:
                continue
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
            n += len(piece)
        lengths.append(n)
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32), np.asarray(lengths, np.int64)


@dataclass
class Encoder:
    """Everything a worker needs to tokenize a ``RawBatch``. ``train_on_reasoning=False``:
    the replies' reasoning is context (label -100)."""

    tokenizer: Any
    template: Template
    system_prompt: str | None = None
    train_on_reasoning: bool = True
    _backend: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._backend = _fast_backend(self.tokenizer)
        self._bos = getattr(self.tokenizer, "bos_token", None) or ""
        self._eos = getattr(self.tokenizer, "eos_token", None) or ""

    def segments(self, row: Any, fmt: str) -> list[Segment] | BadRow:
        """The segments of one row, or why it is bad."""
        sample = to_sample(row, fmt)
        if isinstance(sample, BadRow):
            return sample
        if isinstance(sample, str):
            return [(self._bos, False), (sample + self._eos, True)]
        try:
            return self.template.render(sample.messages, self.system_prompt, sample.tools,
                                        train_on_reasoning=self.train_on_reasoning)
        except DataError:  # a setting is wrong, not this row
            raise
        except ReplyNotFound as exc:
            return BadRow("reply_not_found", str(exc))
        except ReplyNotRendered as exc:
            return BadRow("reply_not_rendered", str(exc))
        except Exception as exc:  # a chat template that raises for this conversation
            return BadRow("template_error", f"{type(exc).__name__}: {exc}")

    def __call__(self, batch: RawBatch) -> EncodedBatch:
        kept: list[list[Segment]] = []
        row_ids: list[int] = []
        bad: list[tuple[int, str, str]] = []
        loads = json.loads
        for i, item in enumerate(batch.items):
            if batch.parse:
                try:
                    row = loads(item)
                except json.JSONDecodeError:
                    parse_json_line(item, batch.where, batch.lines[i])  # raises, naming file and line
            else:
                row = item
            segs = self.segments(row, batch.fmt)
            if isinstance(segs, BadRow):
                bad.append((i, segs.reason, segs.detail))
            else:
                kept.append(segs)
                row_ids.append(batch.start + i)
        ids, labels, lengths = encode_segments(self.tokenizer, kept, self._backend)
        return EncodedBatch(ids, labels, lengths, np.asarray(row_ids, np.int64), bad, len(batch.items), batch.fmt)


_WORKER: Encoder | None = None


def _work(batch: RawBatch) -> EncodedBatch:
    assert _WORKER is not None
    return _WORKER(batch)


def resolve_num_proc(num_proc: int | None) -> int:
    """``num_proc``, or (``None``) the CPUs this process may use, at most ``MAX_WORKERS``."""
    if num_proc is not None:
        if num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {num_proc}")
        return num_proc
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _run(encoder: Encoder, batches: Iterator[RawBatch], num_proc: int,
         used: list[int]) -> Iterator[tuple[RawBatch, EncodedBatch]]:
    """Encode every batch, in order: in this process, or in ``num_proc`` forked workers
    (``used`` gets the number of processes that did)."""
    used.append(1)
    head = list(itertools.islice(batches, POOL_MIN_BATCHES))
    if len(head) < POOL_MIN_BATCHES or num_proc <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        for b in itertools.chain(head, batches):
            yield b, encoder(b)
        return
    global _WORKER
    _WORKER = encoder
    used[0] = num_proc
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; no fork warning
    try:
        pool = multiprocessing.get_context("fork").Pool(num_proc)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        inflight: deque = deque()
        for b in itertools.chain(head, batches):
            inflight.append((b, pool.apply_async(_work, (b,))))
            if len(inflight) >= 2 * num_proc:
                done, result = inflight.popleft()
                yield done, result.get()
        while inflight:
            done, result = inflight.popleft()
            yield done, result.get()
    finally:
        pool.terminate()
        pool.join()
        _WORKER = None


def tokenize_batches(encoder: Encoder, batches: Iterator[RawBatch], num_proc: int | None = None,
                     on_bad_row: str = "skip", out_dir: str | Path | None = None) -> TokenizeResult:
    """Tokenize all batches into one ``TokenizeResult``.

    Every batch is appended, as it arrives, to ``input_ids.npy``, ``labels.npy``,
    ``offsets.npy`` and ``row_ids.npy`` in ``out_dir`` (``SAMPLE_ARRAYS``), and the result
    maps those files: memory holds the batches in flight, not the dataset. Without
    ``out_dir`` the files go to a temporary folder and the result is read into memory (for
    small data). ``on_bad_row="error"`` raises ``DataError`` naming the first bad row (file
    and line); ``"skip"`` counts it under its reason.
    """
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"unknown on_bad_row {on_bad_row!r}; choose one of {', '.join(BAD_ROW_POLICIES)}")
    n_proc = resolve_num_proc(num_proc)
    t0 = time.perf_counter()
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="packtune-tok-"))
    skipped: dict[str, int] = {}
    examples: dict[str, str] = {}
    formats: dict[str, int] = {}
    read = 0
    used: list[int] = []
    try:
        with contextlib.ExitStack() as stack:
            files = {name: stack.enter_context(contextlib.closing(NpyAppender(folder / f"{name}.npy", dtype)))
                     for name, dtype in SAMPLE_ARRAYS.items()}
            # closing(): an error mid-way stops the worker pool now, not when the traceback dies.
            results = stack.enter_context(contextlib.closing(_run(encoder, batches, n_proc, used)))
            files["offsets"].append(np.zeros(1, np.int64))
            total = 0
            for batch, enc in results:
                if enc.bad and on_bad_row == "error":
                    i, reason, detail = enc.bad[0]
                    raise DataError(f"{batch.location(i)}: bad row ({reason}: {detail}); "
                                    "set on_bad_row = 'skip' to skip and count such rows")
                for i, reason, detail in enc.bad:
                    skipped[reason] = skipped.get(reason, 0) + 1
                    examples.setdefault(reason, f"{batch.location(i)}: {detail}")
                formats[enc.fmt] = formats.get(enc.fmt, 0) + enc.rows
                read += enc.rows
                files["input_ids"].append(enc.input_ids)
                files["labels"].append(enc.labels)
                files["offsets"].append(total + np.cumsum(enc.lengths, dtype=np.int64))
                files["row_ids"].append(enc.row_ids)
                total += int(enc.lengths.sum())
        mode = "r" if out_dir is not None else None
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode=mode) for name in SAMPLE_ARRAYS}
    finally:
        if out_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    samples = TokenizedSamples(arrays["input_ids"], arrays["labels"], arrays["offsets"])
    return TokenizeResult(samples, arrays["row_ids"], read, skipped, examples, formats,
                          time.perf_counter() - t0, used[0] if used else 1)
