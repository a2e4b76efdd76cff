"""On-disk cache of tokenized samples and pack layouts, keyed by content and settings.

Two levels, so that changing only a packing setting re-packs without re-tokenizing:

* ``tok-KEY/``: ``input_ids``, ``labels``, ``offsets``, ``row_ids`` (``.npy``) and
  ``meta.json``. KEY hashes the data's content (file bytes, or a hub dataset's fingerprint),
  the tokenizer (``tokenizer_fingerprint``), format, template and its stop tokens, system
  prompt, ``train_on_reasoning``, split and ``max_samples``.
* ``pack-KEY/``: ``doc_start``, ``doc_end``, ``pack_offsets`` and ``meta.json``. KEY adds
  ``max_length``, strategy, overflow, ``shuffle_before_pack`` and ``seed`` to the above.

Entries are written to a temporary folder (``begin``) and renamed into place (``commit``), so
a crash never leaves a half-written entry, and loaded memory-mapped, so a hit costs almost no
memory or time. Tokenized arrays are streamed into that folder batch by batch
(``NpyAppender``): a dataset never has to fit in memory to be cached. ``num_proc`` and
``on_bad_row`` are not in the keys: they do not change the result.

>>> key = cache_key({"max_length": 2048, "data": "abc"})
>>> len(key), key == cache_key({"data": "abc", "max_length": 2048})
(24, True)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packtune.data.errors import DataError
from packtune.data.report import DataReport
from packtune.data.sources import LocalFile, Part, file_digest
from packtune.data.tokenizer_loader import default_cache_dir, tokenizer_fingerprint
from packtune.packing.packs import PackLayout

if TYPE_CHECKING:
    from packtune.data.options import DataOptions
    from packtune.data.templates import Template

#: Bump when the pipeline's output changes for the same inputs: old entries are then unused.
PIPELINE_VERSION = 3


#: The arrays of a ``pack-KEY`` entry: the layout (``PackLayout``) of the packs.
PACK_ARRAYS = ("doc_start", "doc_end", "pack_offsets")


def cache_key(parts: dict[str, Any]) -> str:
    """A short hash of ``parts`` (JSON-serializable), independent of key order."""
    text = json.dumps({"version": PIPELINE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def tokenize_key(data: list[str] | None, tokenizer: Any, template: Template, options: DataOptions,
                 **fields: Any) -> str | None:
    """The key of tokenized rows: ``data`` (``DataCache.fingerprints``), the tokenizer, the
    template and its stop tokens, ``system_prompt``, ``train_on_reasoning``, split and
    ``max_samples``, plus ``fields`` (what else the tokenizing depends on); ``None`` (not
    cached) when ``data`` is."""
    if data is None:
        return None
    return cache_key({
        "data": data, "tokenizer": tokenizer_fingerprint(tokenizer), "template": template.name,
        "stop": list(template.stop), "system_prompt": options.system_prompt,
        "train_on_reasoning": options.train_on_reasoning, "split": options.dataset_split,
        "max_samples": options.max_samples, **fields,
    })


def pack_key(tokenized: str | None, options: DataOptions, strategy: str) -> str | None:
    """The key of a layout of the ``tokenized`` entry's samples: it adds ``max_length``, the
    strategy, overflow, ``shuffle_before_pack`` and ``seed``; ``None`` when ``tokenized`` is."""
    if tokenized is None:
        return None
    return cache_key({"tokenized": tokenized, "max_length": options.max_length, "strategy": strategy,
                      "overflow": options.overflow, "shuffle": options.shuffle_before_pack, "seed": options.seed})


class NpyAppender:
    """A 1-D ``.npy`` file written piece by piece, never held in memory as a whole.

    The header is written for length 0 and rewritten with the final length by ``close``:
    numpy pads a header so that its length does not change as the shape grows.

    >>> with tempfile.TemporaryDirectory() as folder:
    ...     f = NpyAppender(Path(folder) / "x.npy", np.int32)
    ...     f.append(np.array([1, 2])); f.append(np.array([3])); f.close()
    ...     np.load(Path(folder) / "x.npy").tolist()
    [1, 2, 3]
    """

    def __init__(self, path: str | Path, dtype: Any) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.size = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._header_bytes = self._write_header()

    def _write_header(self) -> int:
        self._file.seek(0)
        np.lib.format.write_array_header_1_0(self._file, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.size,)})
        return self._file.tell()

    def append(self, values: np.ndarray) -> None:
        """Write ``values`` (cast to the file's dtype) at the end."""
        arr = np.ascontiguousarray(values, dtype=self.dtype).reshape(-1)
        try:
            self._file.write(memoryview(arr).cast("B"))
        except OSError as exc:
            raise DataError(f"could not write {self.path}: {exc.strerror or exc}; free disk space there or set "
                            "data_cache_dir to a folder with room") from exc
        self.size += arr.size

    def close(self) -> None:
        """Finish the file: its header now says how many values it holds."""
        if self._file.closed:
            return
        try:
            end = self._file.tell()
            if self._write_header() != self._header_bytes:  # cannot happen with numpy's padding
                raise RuntimeError(f"{self.path}: the .npy header changed length")
            self._file.seek(end)
        finally:
            self._file.close()


class DataCache:
    """The cache folder ``root/data`` (``root`` defaults to ``default_cache_dir()``)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_cache_dir()
        self.dir = self.root / "data"
        self._private: set[Path] = set()

    def path(self, kind: str, key: str) -> Path:
        return self.dir / f"{kind}-{key}"

    def fingerprints(self, parts: list[Part], not_cached: str) -> list[str] | None:
        """The content fingerprints of ``parts``, for ``tokenize_key``; ``None``, with a warning
        that ends in ``not_cached``, when a dataset object has none."""
        data = [p.fingerprint(self.file_digest if isinstance(p, LocalFile) else None) for p in parts]
        if None in data:
            warnings.warn("a dataset object cannot be fingerprinted (see packtune.data.sources.dataset_fingerprint), "
                          f"so {not_cached}", stacklevel=3)
            return None
        return data

    def layout(self, kind: str, key: str | None, max_length: int,
               build: Callable[[], tuple[PackLayout, DataReport]]) -> tuple[PackLayout, DataReport, bool]:
        """The packs' layout and report from entry ``kind-key``, or ``build()`` them (the report
        checked, then saved under ``key`` unless it is ``None``); ``(layout, report, hit)``."""
        hit = self.load(kind, key, PACK_ARRAYS) if key is not None else None
        if hit is not None:
            arrays, meta = hit
            layout = PackLayout(arrays["doc_start"], arrays["doc_end"], arrays["pack_offsets"], max_length)
            return layout, DataReport.from_dict(meta), True
        layout, report = build()
        report.check()
        if key is not None:
            self.save(kind, key, {name: getattr(layout, name) for name in PACK_ARRAYS}, report.as_dict())
        return layout, report, False

    def load(self, kind: str, key: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict] | None:
        """The arrays (memory-mapped) and meta of an entry, or ``None`` when absent or broken."""
        return self.load_folder(self.path(kind, key), names)

    @staticmethod
    def load_folder(folder: Path, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict] | None:
        """``load`` for any folder holding an entry's files."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
            arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}
        except (OSError, ValueError):
            return None
        return arrays, meta

    def _mkdtemp(self, kind: str, key: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        prefix = f".{kind}-{key}-"
        self._sweep(prefix)
        return Path(tempfile.mkdtemp(prefix=f"{prefix}{socket.gethostname()}-{os.getpid()}-", dir=self.dir))

    def _sweep(self, prefix: str) -> None:
        """Remove the unfinished folders a killed build of this entry left on this host (their
        process is gone): a killed billion-token build would otherwise leave gigabytes behind."""
        if os.name != "posix":  # pragma: no cover - os.kill(pid, 0) is a liveness probe only on POSIX
            return
        here = f"{prefix}{socket.gethostname()}-"
        for folder in self.dir.glob(f"{prefix}*"):
            pid = folder.name[len(here):].split("-", 1)[0] if folder.name.startswith(here) else ""
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(folder, ignore_errors=True)
            except OSError:  # alive, another user's
                pass

    def _place(self, tmp: Path, kind: str, key: str) -> Path:
        folder = self.path(kind, key)
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process wrote the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def _warn(self, exc: OSError) -> None:
        warnings.warn(f"could not write the data cache in {self.dir} ({exc}); continuing without it", stacklevel=3)

    def begin(self, kind: str, key: str | None) -> Path:
        """A new empty folder to write an entry in, for ``commit`` (or ``discard`` on failure).

        It is hidden in the cache folder, so it is never loaded as an entry. When the cache
        folder cannot be written, or ``key`` is ``None`` (data that cannot be fingerprinted),
        it is a private folder in the system's temporary folder: the build goes on but is not
        cached, and ``release`` removes the folder once its arrays are mapped.
        """
        if key is not None:
            try:
                return self._mkdtemp(kind, key)
            except OSError as exc:
                self._warn(exc)
        tmp = Path(tempfile.mkdtemp(prefix=f"packtune-{kind}-"))
        self._private.add(tmp)
        return tmp

    def commit(self, tmp: Path, kind: str, key: str | None, meta: dict) -> Path:
        """Write ``meta.json`` into ``tmp`` and rename it into place: the entry's folder (a
        private folder from ``begin`` stays where it is)."""
        try:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        except OSError as exc:
            self.discard(tmp)
            raise DataError(f"could not write {tmp / 'meta.json'}: {exc}") from exc
        if tmp in self._private or key is None:
            return tmp
        return self._place(tmp, kind, key)

    def discard(self, tmp: Path) -> None:
        """Remove an unfinished entry (a build that failed or was interrupted)."""
        shutil.rmtree(tmp, ignore_errors=True)
        self._private.discard(tmp)

    def release(self, folder: Path) -> None:
        """Remove ``folder`` if it is private, once its arrays are mapped (POSIX keeps a removed
        file's data for as long as it is mapped; elsewhere it is removed at exit)."""
        if folder not in self._private:
            return
        self._private.discard(folder)
        if os.name == "posix":
            shutil.rmtree(folder, ignore_errors=True)
        else:  # pragma: no cover - a mapped file cannot be removed on Windows
            import atexit

            atexit.register(shutil.rmtree, folder, True)

    def save(self, kind: str, key: str, arrays: dict[str, np.ndarray], meta: dict) -> Path | None:
        """Write an entry atomically; warn (and return ``None``) when the folder is not writable."""
        tmp = None
        try:
            tmp = self._mkdtemp(kind, key)
            for name, arr in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            return self._place(tmp, kind, key)
        except OSError as exc:
            if tmp is not None:  # a disk that filled up mid-write: leave no partial entry behind
                shutil.rmtree(tmp, ignore_errors=True)
            self._warn(exc)
            return None

    def file_digest(self, path: str | Path) -> str:
        """``file_digest(path)``, remembered by (path, size, mtime) so a hit skips re-reading."""
        path = Path(path).resolve()
        st = path.stat()
        memo = self.dir / "digests" / (hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".json")
        stamp = [st.st_size, st.st_mtime_ns]
        try:
            saved = json.loads(memo.read_text())
            if saved.get("stamp") == stamp:
                return saved["digest"]
        except (OSError, ValueError):
            pass
        digest = file_digest(path)
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"path": str(path), "stamp": stamp, "digest": digest}))
            os.replace(tmp, memo)
        except OSError:
            pass
        return digest
