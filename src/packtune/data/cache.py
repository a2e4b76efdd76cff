"""On-disk cache of tokenized samples and pack layouts, keyed by content and settings.

Two levels, so that changing only a packing setting re-packs without re-tokenizing:

* ``tok-KEY/``: ``input_ids``, ``labels``, ``offsets``, ``row_ids`` (``.npy``) and
  ``meta.json``. KEY hashes the data's content (file bytes, or a hub dataset's fingerprint),
  the tokenizer (``tokenizer_fingerprint``), format, template and its stop tokens, system
  prompt, ``train_on_reasoning``, split and ``max_samples``.
* ``pack-KEY/``: ``doc_start``, ``doc_end``, ``pack_offsets`` and ``meta.json``. KEY adds
  ``max_length``, strategy, overflow, ``shuffle_before_pack`` and ``seed`` to the above.

Entries are written to a temporary folder and renamed into place, so a crash never leaves a
half-written entry, and loaded memory-mapped, so a hit costs almost no memory or time.
``num_proc`` and ``on_bad_row`` are not in the keys: they do not change the result.

>>> key = cache_key({"max_length": 2048, "data": "abc"})
>>> len(key), key == cache_key({"data": "abc", "max_length": 2048})
(24, True)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from packtune.data.sources import file_digest
from packtune.data.tokenizer import default_cache_dir

#: Bump when the pipeline's output changes for the same inputs: old entries are then unused.
PIPELINE_VERSION = 2


def cache_key(parts: dict[str, Any]) -> str:
    """A short hash of ``parts`` (JSON-serializable), independent of key order."""
    text = json.dumps({"version": PIPELINE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class DataCache:
    """The cache folder ``root/data`` (``root`` defaults to ``default_cache_dir()``)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_cache_dir()
        self.dir = self.root / "data"

    def path(self, kind: str, key: str) -> Path:
        return self.dir / f"{kind}-{key}"

    def load(self, kind: str, key: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict] | None:
        """The arrays (memory-mapped) and meta of an entry, or ``None`` when absent or broken."""
        folder = self.path(kind, key)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}
        except (OSError, ValueError):
            return None
        return arrays, meta

    def save(self, kind: str, key: str, arrays: dict[str, np.ndarray], meta: dict) -> Path | None:
        """Write an entry atomically; warn (and return ``None``) when the folder is not writable."""
        folder = self.path(kind, key)
        tmp = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-{key}-", dir=self.dir))
            for name, arr in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process wrote the same entry first
                shutil.rmtree(tmp, ignore_errors=True)
            return folder
        except OSError as exc:
            if tmp is not None:  # a disk that filled up mid-write: leave no partial entry behind
                shutil.rmtree(tmp, ignore_errors=True)
            warnings.warn(f"could not write the data cache in {self.dir} ({exc}); continuing without it", stacklevel=2)
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
