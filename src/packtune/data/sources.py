"""Where rows come from: local files or a Hugging Face dataset, streamed in batches.

``dataset`` is one entry or a list of them; each entry is

* a local ``.json`` (a JSON array, or JSON Lines), ``.jsonl``, ``.parquet`` or ``.txt`` file
  (one sample per non-blank line), optionally gzipped (``.gz``); a directory (its files of
  those kinds, sorted); or a glob pattern (``data/*.jsonl``);
* ``packtune://NAME``: the file ``NAME`` shipped in ``packtune/assets``;
* anything else: a Hugging Face dataset id, loaded with ``datasets.load_dataset(id, split=...)``,
  or with ``streaming=True`` under ``dataset_streaming = True``: the rows then arrive as
  tokenization asks for them, and nothing is downloaded or materialised first;
* from Python, a ``datasets.Dataset`` or ``datasets.IterableDataset`` object (the split is
  the object's own: ``dataset_split`` must stay ``"train"``).

Rows are never all held as Python objects: files are read as streams and handed on in
batches (``RawBatch``); JSON Lines are even parsed later, by the tokenizing workers. A line
that is not valid JSON is an error naming the file and the line (``DataError``).

``dataset_split`` picks the split of a hub dataset (any ``datasets`` split expression, such
as ``"train[:10%]"``). Local files form the single split ``train``; ``train[A:B]`` slices
their rows by index.

>>> parse_split("train[10:20]")
('train', 10, 20)
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packtune.data.errors import DataError
from packtune.data.tokenizer_loader import BUNDLED_SCHEME
LOCAL_KINDS = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt"}
DETECT_ROWS = 100
MAX_ELEMENT = 64 << 20  # largest element of a JSON array file, in characters
_SPLIT = re.compile(r"^\s*([\w.\-]+)\s*(?:\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\])?\s*$")


@dataclass
class RawBatch:
    """Rows of one part, on their way to tokenization.

    ``items`` are JSON text lines (``parse=True``) or rows; ``lines[i]`` is where item ``i``
    is in its part (1-based line or row number), for error messages; ``start`` is the number
    of rows read before this batch.
    """

    where: str
    unit: str
    fmt: str
    start: int
    lines: list[int]
    items: list[Any]
    parse: bool = False

    def location(self, i: int) -> str:
        return f"{self.where}, {self.unit} {self.lines[i]}"


def parse_split(split: str) -> tuple[str, int | None, int | None]:
    """``"train[A:B]"`` -> ``("train", A, B)`` (``None`` where a bound is left out)."""
    m = _SPLIT.match(split or "train")
    if not m:
        raise DataError(f"dataset_split {split!r} is not NAME or NAME[START:STOP]")
    to_int = lambda s: int(s) if s not in (None, "") else None  # noqa: E731
    return m.group(1), to_int(m.group(2)), to_int(m.group(3))


def assets_dir() -> Path:
    """``packtune/assets``, where ``packtune://NAME`` files live."""
    return Path(__file__).resolve().parent.parent / "assets"


def _kind(path: Path) -> str | None:
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return LOCAL_KINDS.get(suffixes[0].lower() if suffixes else "")


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


class Part:
    """One file or hub dataset."""

    name: str
    unit = "row"

    def fingerprint(self, digest: Any = None) -> str:
        raise NotImplementedError

    def head(self, n: int = DETECT_ROWS) -> list[Any]:
        """The first ``n`` rows, parsed (for format detection)."""
        raise NotImplementedError

    def chunks(self, size: int) -> Iterator[tuple[list[int], list[Any], bool]]:
        """``(positions, items, needs_parse)`` in order, at most ``size`` items each."""
        raise NotImplementedError


@dataclass
class LocalFile(Part):
    path: Path
    kind: str

    def __post_init__(self) -> None:
        self.name = str(self.path)
        self.unit = "row" if self.kind == "parquet" else "line"

    def fingerprint(self, digest: Any = None) -> str:
        return f"{self.kind}:{(digest or file_digest)(self.path)}"

    def head(self, n: int = DETECT_ROWS) -> list[Any]:
        out: list[Any] = []
        for lines, items, parse in self.chunks(n):
            for line, item in zip(lines, items):
                out.append(parse_json_line(item, self.name, line) if parse else item)
            break
        return out[:n]

    def chunks(self, size: int) -> Iterator[tuple[list[int], list[Any], bool]]:
        if self.kind == "parquet":
            yield from self._parquet(size)
            return
        if self.kind == "json" and self._is_array():
            yield from _batched(_iter_json_array(self.path), size, parse=False)
            return
        parse = self.kind != "txt"
        with _open_text(self.path) as f:
            numbered = ((i, line.rstrip("\r\n")) for i, line in enumerate(f, 1))
            yield from _batched(((i, s) for i, s in numbered if s.strip()), size, parse=parse)

    def _is_array(self) -> bool:
        with _open_text(self.path) as f:
            while True:
                ch = f.read(1)
                if not ch or not ch.isspace():
                    return ch == "["

    def _parquet(self, size: int) -> Iterator[tuple[list[int], list[Any], bool]]:
        import pyarrow.parquet as pq

        pos = 1
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=size):
            rows = batch.to_pylist()
            yield list(range(pos, pos + len(rows))), rows, False
            pos += len(rows)


def dataset_fingerprint(ds: Any) -> str | None:
    """What ``datasets`` identifies a dataset by, or ``None`` when it cannot be hashed.

    A ``Dataset``'s own fingerprint; for an ``IterableDataset``, the hash of its source of
    examples, as ``datasets`` hashes it for its own cache: the files (on the hub, with their
    revision) or the generator's code and arguments, with every ``map``/``filter``/``shuffle``
    on them. A local file changed in place under the same name keeps its hash: read local
    files by path (content-hashed) rather than through ``datasets``.
    """
    fp = getattr(ds, "_fingerprint", None)
    if fp is not None:
        return str(fp)
    try:
        from datasets.fingerprint import Hasher
        from datasets.iterable_dataset import _BaseExamplesIterable

        def source(obj: Any) -> Any:
            # Iterating moves each examples iterable's _state_dict (where to resume): not content.
            if isinstance(obj, _BaseExamplesIterable):
                return type(obj).__qualname__, {k: source(v) for k, v in vars(obj).items() if k != "_state_dict"}
            return [source(v) for v in obj] if isinstance(obj, (list, tuple)) else obj

        return Hasher.hash(source(ds._ex_iterable))
    except Exception:  # noqa: BLE001 - not picklable (a generator holding an open file, ...): not cacheable
        return None


@dataclass
class HubDataset(Part):
    """A dataset on the Hugging Face hub (or in its local cache), streamed when ``streaming``."""

    dataset_id: str
    split: str
    streaming: bool = False
    _ds: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.name = self.dataset_id

    def dataset(self) -> Any:
        if self._ds is None:
            try:
                import datasets
            except ImportError as exc:  # pragma: no cover - datasets is a dependency
                raise DataError("loading a hub dataset needs the 'datasets' package: pip install datasets") from exc
            try:
                ds = datasets.load_dataset(self.dataset_id, split=self.split, streaming=self.streaming)
            except Exception as exc:  # not found, offline, bad split: all end here
                raise DataError(f"dataset {self.dataset_id!r} (split {self.split!r}) is not a local file and "
                                f"could not be loaded from the hub: {type(exc).__name__}: {exc}") from exc
            if isinstance(ds, dict):  # a DatasetDict
                raise DataError(f"dataset {self.dataset_id!r}: choose a split ({', '.join(ds)})")
            self._ds = ds
        return self._ds

    def fingerprint(self, digest: Any = None) -> str | None:
        fp = dataset_fingerprint(self.dataset())
        return None if fp is None else f"hub:{self.dataset_id}:{self.split}:{fp}"

    def head(self, n: int = DETECT_ROWS) -> list[Any]:
        for _, rows, _ in self.chunks(n):
            return rows[:n]
        return []

    def chunks(self, size: int) -> Iterator[tuple[list[int], list[Any], bool]]:
        pos = 1
        for cols in self.dataset().iter(batch_size=size):
            names = list(cols)
            rows = [dict(zip(names, values)) for values in zip(*(cols[k] for k in names))]
            yield list(range(pos, pos + len(rows))), rows, False
            pos += len(rows)


@dataclass
class DatasetObject(HubDataset):
    """A ``datasets.Dataset`` or ``IterableDataset`` given as it is (from Python)."""

    def fingerprint(self, digest: Any = None) -> str | None:
        fp = dataset_fingerprint(self._ds)
        return None if fp is None else f"object:{type(self._ds).__name__}:{fp}"


def _is_datasets_object(entry: Any) -> bool:
    # Such an object exists only once ``datasets`` is imported: checking never imports it (a
    # second or so), so a list of paths or hub ids costs nothing here.
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(entry, (datasets.Dataset, datasets.IterableDataset))


def entry_name(entry: Any) -> str:
    """How a ``dataset`` entry is named in reports: itself, or a dataset object's kind and name."""
    if isinstance(entry, str):
        return entry
    info = getattr(entry, "info", None)
    name = getattr(info, "dataset_name", None)
    return f"{type(entry).__name__}({name})" if name else type(entry).__name__


def describe_dataset(dataset: Any, split: str) -> str:
    """The ``dataset`` setting (an entry or a list of entries) as reports name it, with its
    split when that is not ``train``."""
    names = [dataset] if isinstance(dataset, str) or not isinstance(dataset, (list, tuple)) else list(dataset)
    return ", ".join(map(entry_name, names)) + (f" [{split}]" if split != "train" else "")


def _batched(numbered: Iterator[tuple[int, Any]], size: int,
             parse: bool) -> Iterator[tuple[list[int], list[Any], bool]]:
    lines: list[int] = []
    items: list[Any] = []
    for line, item in numbered:
        lines.append(line)
        items.append(item)
        if len(items) == size:
            yield lines, items, parse
            lines, items = [], []
    if items:
        yield lines, items, parse


def parse_json_line(text: str, where: str, line: int) -> Any:
    """``json.loads`` that names the file and line when the text is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}, line {line}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def _iter_json_array(path: Path, chunk: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """The elements of a JSON array file, one at a time, with the line each starts on."""
    decoder = json.JSONDecoder()
    with _open_text(path) as f:
        buf, pos, line, eof = "", 0, 1, False

        def more() -> bool:
            nonlocal buf, pos, eof
            data = f.read(chunk)
            if not data:
                eof = True
                return False
            buf = buf[pos:] + data
            pos = 0
            return True

        def skip_ws() -> None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or not more():
                    return

        def fail(msg: str, at: int) -> DataError:
            return DataError(f"{path}, line {line + buf.count(chr(10), pos, at)}: not valid JSON ({msg})")

        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            raise fail("expected '['", pos)
        pos += 1
        first = True
        while True:
            skip_ws()
            if pos >= len(buf):
                raise fail("the array is not closed", pos)
            if buf[pos] == "]":
                return
            if not first:
                if buf[pos] != ",":
                    raise fail("expected ',' or ']'", pos)
                pos += 1
                skip_ws()
            first = False
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    # A number or literal cut by the chunk end parses short: be sure it ended.
                    if end == len(buf) and not eof and more():
                        continue
                    break
                except json.JSONDecodeError as exc:
                    # Maybe cut by the chunk end: read on, up to a limit (then it is an error).
                    if not eof and len(buf) - pos < MAX_ELEMENT and more():
                        continue
                    raise fail(f"{exc.msg}", exc.pos) from None
            yield line, obj
            line += buf.count("\n", pos, end)
            pos = end


def resolve(dataset: Any, split: str = "train", streaming: bool = False) -> list[Part]:
    """The parts of ``dataset`` (see the module docstring), in order; ``streaming`` reads hub
    datasets as streams.

    Raises ``DataError`` for a local path that does not exist, a directory with no data
    file, an unsupported file type, or an entry that is neither a string nor a dataset.
    """
    if isinstance(dataset, str) or _is_datasets_object(dataset):
        entries = [dataset]
    else:
        entries = list(dataset)
    if not entries:
        raise DataError("no dataset given")
    parts: list[Part] = []
    name, lo, hi = parse_split(split)
    for entry in entries:
        if not isinstance(entry, str):
            if not _is_datasets_object(entry):
                raise DataError(f"a dataset entry is a path, a hub id or a datasets.Dataset/IterableDataset, "
                                f"not {type(entry).__name__}")
            if (name, lo, hi) != ("train", None, None):
                raise DataError(f"dataset_split {split!r} does not apply to a {type(entry).__name__} object, which "
                                "is one split already; slice it first (.select, .take) and leave dataset_split")
            parts.append(DatasetObject(entry_name(entry), split, _ds=entry))
            continue
        if entry.startswith(BUNDLED_SCHEME):
            asset = entry[len(BUNDLED_SCHEME):].strip("/")
            path = assets_dir() / asset
            if not path.is_file():
                known = sorted(p.name for p in assets_dir().glob("*") if p.is_file()) if assets_dir().is_dir() else []
                raise DataError(f"no bundled dataset {asset!r}; known: {', '.join(known) or 'none'}")
            parts.append(_local(path))
            continue
        path = Path(os.path.expanduser(entry))
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
            if not files:
                raise DataError(f"{entry}: no .json, .jsonl, .parquet or .txt file in this directory")
            parts += [_local(p) for p in files]
        elif path.is_file():
            parts.append(_local(path))
        elif glob.has_magic(entry):
            files = sorted(Path(p) for p in glob.glob(os.path.expanduser(entry), recursive=True) if Path(p).is_file())
            if not files:
                raise DataError(f"{entry}: no file matches this pattern")
            parts += [_local(p) for p in files]
        elif _kind(path) or entry.startswith((".", "/", "~")) or os.sep in entry.strip("/").replace("/", "", 1):
            raise DataError(f"{entry}: no such file or directory")
        else:
            parts.append(HubDataset(entry, split, streaming))
    if any(isinstance(p, LocalFile) for p in parts) and name != "train":
        raise DataError(f"local files have only the split 'train' (optionally sliced, train[A:B]), not {split!r}")
    return parts


def _local(path: Path) -> LocalFile:
    kind = _kind(path)
    if kind is None:
        raise DataError(f"{path}: unsupported file type; use .json, .jsonl, .parquet or .txt")
    return LocalFile(path, kind)


def file_digest(path: Path) -> str:
    """BLAKE2b of the file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def iter_batches(parts: list[Part], formats: list[str], split: str, max_samples: int | None,
                 batch_size: int = 1000) -> Iterator[RawBatch]:
    """Batches of rows over all parts, honouring a local ``train[A:B]`` slice and ``max_samples``."""
    _, lo, hi = parse_split(split)
    local = any(isinstance(p, LocalFile) for p in parts)
    if not local:
        lo = hi = None  # a hub split expression was already applied by load_dataset
    if (lo is not None and lo < 0) or (hi is not None and hi < 0):
        raise DataError(f"dataset_split {split!r}: negative bounds are not supported for local files")
    index = 0  # rows seen (before slicing)
    read = 0  # rows handed on
    for part, fmt in zip(parts, formats):
        for lines, items, parse in part.chunks(batch_size):
            n = len(items)
            a = 0 if lo is None else min(max(lo - index, 0), n)
            b = n if hi is None else min(max(hi - index, 0), n)
            index += n
            if max_samples is not None:
                b = min(b, a + max_samples - read)
            if b > a:
                yield RawBatch(part.name, part.unit, fmt, read, lines[a:b], items[a:b], parse)
                read += b - a
            if (max_samples is not None and read >= max_samples) or (hi is not None and index >= hi):
                return
