"""Passes over arrays bigger than memory: a piece at a time, memory-mapped pages handed back.

The tokenized data of a big dataset lives in memory-mapped files (``data.cache``). A page of
a mapped file that has been read stays in the process's resident set until it is released,
so one ``labels != -100`` over a billion tokens would count 4 GB against the process (and
its int64 cumulative sum 8 GB more). These helpers read such arrays in pieces of
``CHUNK_TOKENS`` and release the pages of each piece once it is read, so planning the packs
of a billion tokens holds only small per-sample arrays.

>>> [(a, c.tolist()) for a, c in iter_chunks(np.arange(5), 2)]
[(0, [0, 1]), (2, [2, 3]), (4, [4])]
>>> sample_lengths(np.array([0, 3, 3, 7])).tolist()
[3, 0, 4]
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np

IGNORE_INDEX = -100
#: Values per piece in a pass over a whole array (4 MB of int32).
CHUNK_TOKENS = 1 << 20


def _mapping(arr: np.ndarray) -> mmap.mmap | None:
    """The ``mmap`` under a read-only ``arr`` (a file mapped read-only, or a view of one), else
    ``None``. A writable mapping is left alone: dropping the pages of a copy-on-write mapping
    would drop its changes."""
    if getattr(arr, "flags", None) is None or arr.flags.writeable:
        return None
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


def release(arr: np.ndarray) -> None:
    """Hand the pages of the file under ``arr`` back to the OS (no-op for in-memory arrays).

    Mapped read-only file pages are dropped from this process and read again on need.
    """
    mapped = _mapping(arr)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)


def iter_chunks(arr: np.ndarray, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, arr[start:start + size])`` over a 1-D array, piece by piece; a memory-mapped
    array's pieces are copies, and its pages are released once each is read."""
    size = size or CHUNK_TOKENS
    mapped = _mapping(arr) is not None
    for a in range(0, arr.shape[0], size):
        if not mapped:
            yield a, arr[a:a + size]
            continue
        piece = np.array(arr[a:a + size])
        release(arr)
        yield a, piece


def gather(arr: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``arr[index]``, releasing the pages the gather read when ``arr`` is memory-mapped."""
    out = np.asarray(arr)[index]
    release(arr)
    return out


def sample_lengths(offsets: np.ndarray) -> np.ndarray:
    """``np.diff(offsets)`` as int32 (4 bytes a sample), computed a piece at a time."""
    n = max(offsets.shape[0] - 1, 0)
    out = np.empty(n, dtype=np.int32)
    prev = None
    for a, piece in iter_chunks(offsets):
        if a:
            out[a - 1] = piece[0] - prev
        out[a:a + piece.size - 1] = np.diff(piece)
        prev = piece[-1]
    return out


def non_decreasing(arr: np.ndarray) -> bool:
    """Whether ``arr`` never decreases, checked a piece at a time."""
    prev = None
    for _, piece in iter_chunks(arr):
        if (prev is not None and piece[0] < prev) or np.any(piece[1:] < piece[:-1]):
            return False
        prev = piece[-1]
    return True


def trained_before(labels: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """For every position ``p``: how many of ``labels[:p]`` are trained (not ``IGNORE_INDEX``).

    One pass over ``labels`` in pieces: memory grows with the positions, never with the
    tokens.

    >>> trained_before(np.array([-100, 5, 6, -100, 7]), np.array([5, 0, 2, 3])).tolist()
    [3, 0, 1, 2]
    """
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    order = None
    if pos.size > 1 and np.any(pos[1:] < pos[:-1]):
        order = np.argsort(pos, kind="stable")
        pos = pos[order]
    out = np.empty(pos.size, dtype=np.int64)
    i, before = 0, 0
    for a, piece in iter_chunks(labels):
        trained = piece != IGNORE_INDEX
        j = int(np.searchsorted(pos, a + piece.size, side="left"))  # pos[i:j] lie in this piece
        if j > i:
            cum = np.zeros(piece.size + 1, dtype=np.int32)  # a piece is far below 2**31 tokens
            np.cumsum(trained, out=cum[1:])
            out[i:j] = before + cum[pos[i:j] - a]
            i = j
        before += int(np.count_nonzero(trained))
    out[i:] = before  # positions at the end
    if order is None:
        return out
    result = np.empty_like(out)
    result[order] = out
    return result


def trained_after_first(labels: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                        block: int = 1 << 16) -> np.ndarray:
    """Trained labels of every sample after its first token, within its first ``lengths[i]``
    tokens (the first label of a document is masked in its pack), as int32.

    Sample ``i`` is ``labels[offsets[i]:offsets[i + 1]]``. A block of samples is counted at a
    time, each block reading only its own tokens: one pass over ``labels`` in all, with
    temporaries the size of a block.

    >>> trained_after_first(np.array([5, 6, -100, 7, 8]), np.array([0, 2, 5]), np.array([2, 1])).tolist()
    [1, 0]
    """
    n = lengths.shape[0]
    out = np.empty(n, dtype=np.int32)
    for a in range(0, n, block):
        ln = lengths[a:a + block]
        s = np.array(offsets[a:a + ln.size], dtype=np.int64)
        release(offsets)
        lo = int(s[0])
        bounds = np.empty((s.size, 2), dtype=np.int64)
        bounds[:, 1] = s - lo + ln
        bounds[:, 0] = np.minimum(s - lo + 1, bounds[:, 1])
        cum = trained_before(labels[lo:int(bounds[:, 1].max()) + lo], bounds.reshape(-1)).reshape(-1, 2)
        out[a:a + block] = cum[:, 1] - cum[:, 0]
    return out
