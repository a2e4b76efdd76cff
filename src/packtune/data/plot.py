"""A picture of what packing did: ``plot_packs(dataset, "packs.png")``.

Four panels:

1. the document layout of the first packs: one bar per pack, one colour per document,
   trained tokens solid and masked tokens (prompts, system, tool results) faded, unused
   room left blank;
2. a histogram of the sample lengths, with ``max_length`` marked;
3. the full causal mask of one pack, as a model without varlen attention would use on the
   packed row: everything shaded red is attention *across* documents, a leak;
4. the block-diagonal causal mask that varlen attention uses instead: each document attends
   only to itself, exactly as if it were alone (the classic varlen picture).

Drawn with matplotlib's object API (no pyplot state), so it works headless.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from packtune.packing.packs import IGNORE_INDEX

MAX_MASK_PIXELS = 1024
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]


def _doc_index(cu: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(cu) - 1), np.diff(cu))


def _pick_pack(dataset: Any) -> int:
    """A telling pack for the mask panels: 3 to 8 documents, the shortest as long as
    possible (so every block shows), full rows first; else the one with the most documents."""
    layout = dataset.layout
    offsets = np.asarray(layout.pack_offsets)
    if offsets.size < 2:
        return 0
    docs = np.diff(offsets)
    lengths = np.asarray(layout.doc_end) - np.asarray(layout.doc_start)
    shortest = np.minimum.reduceat(lengths, offsets[:-1]) if lengths.size else np.zeros(docs.size)
    ok = (docs >= 3) & (docs <= 8)
    if not ok.any():
        return int(np.argmax(docs))
    score = np.where(ok, shortest.astype(np.float64) + layout.pack_lengths() / (4.0 * layout.max_length) * shortest, -1)
    return int(np.argmax(score))


def _masks(cu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(causal, varlen)`` images of a pack, downsampled to at most ``MAX_MASK_PIXELS``.

    Values: 0 = no attention, 1 = allowed, 2 = allowed by the causal mask but across documents.
    The varlen image holds ``1 + document index % len(PALETTE)`` where attention is allowed.
    """
    t = int(cu[-1])
    step = max(1, -(-t // MAX_MASK_PIXELS))
    pos = np.arange(0, t, step)
    doc = _doc_index(cu)[pos]
    q, k = pos[:, None], pos[None, :]
    causal = k <= q
    same = doc[:, None] == doc[None, :]
    causal_img = np.where(causal, np.where(same, 1, 2), 0)
    varlen_img = np.where(causal & same, 1 + doc[:, None] % len(PALETTE), 0)
    return causal_img, varlen_img


def plot_packs(dataset: Any, path: str | Path, n_packs: int = 24, dpi: int = 100) -> Path:
    """Write the PNG described in the module docstring to ``path``; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    path = Path(path)
    n = min(n_packs, len(dataset))
    max_length = int(dataset.layout.max_length)
    fig = Figure(figsize=(15, 12), dpi=dpi)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=[1.0, 1.05], hspace=0.3, wspace=0.22)
    palette = PALETTE

    # 1. Document layout of the first packs.
    ax = fig.add_subplot(grid[0, 0])
    for p in range(n):
        pack = dataset[p]
        cu = pack["cu_seqlens"]
        trained = pack["labels"] != IGNORE_INDEX
        for d in range(len(cu) - 1):
            a, b = int(cu[d]), int(cu[d + 1])
            color = palette[d % len(palette)]
            ax.broken_barh([(a, b - a)], (p - 0.4, 0.8), facecolors=color, alpha=0.4, linewidth=0)
            t = trained[a:b].astype(np.int8)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], t, [0]])))
            runs = [(a + int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2])]
            if runs:
                ax.broken_barh(runs, (p - 0.4, 0.8), facecolors=color, alpha=1.0, linewidth=0)
        ax.vlines(cu[1:-1], p - 0.45, p + 0.45, colors="black", linewidth=0.8)
    ax.set_xlim(0, max_length)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel("token position in the packed row")
    ax.set_ylabel("pack")
    r = dataset.report
    ax.set_title(f"First {n} of {len(dataset):,} packs: one colour per document "
                 f"(solid = trained, faded = masked, | = document boundary)\nutilization {r.utilization:.2%}, "
                 f"{r.docs_per_pack:.2f} documents per pack, strategy {r.strategy}", fontsize=10)

    # 2. Histogram of sample lengths.
    ax = fig.add_subplot(grid[0, 1])
    lengths = np.asarray(dataset.samples.lengths())
    if lengths.size:
        bins = np.linspace(0, max(int(lengths.max()), max_length) + 1, 60)
        counts, _, _ = ax.hist(lengths, bins=bins, color="#4e79a7", edgecolor="white")
        if counts.max() > 50:  # a long tail stays visible
            ax.set_yscale("log")
    ax.axvline(max_length, color="#e15759", linestyle="--", label=f"max_length = {max_length:,}")
    ax.set_xlabel("sample length (tokens)")
    ax.set_ylabel("samples")
    ax.legend(loc="upper right")
    ax.set_title(f"Sample lengths: {lengths.size:,} samples, mean {lengths.mean() if lengths.size else 0:,.0f}, "
                 f"{int((lengths > max_length).sum()):,} over max_length", fontsize=10)

    # 3 and 4. The causal mask of one pack beside the block-diagonal varlen mask.
    if n:
        p = _pick_pack(dataset)
        cu = dataset[p]["cu_seqlens"]
        causal, varlen = _masks(cu)
        t = int(cu[-1])
        ext = (0, t, t, 0)
        ax = fig.add_subplot(grid[1, 0])
        ax.imshow(causal, cmap=ListedColormap(["white", "#4e79a7", "#e15759"]), vmin=0, vmax=2,
                  extent=ext, interpolation="nearest")
        for c in cu[1:-1]:
            ax.axhline(c, color="#999999", linewidth=0.4)
            ax.axvline(c, color="#999999", linewidth=0.4)
        ax.set_title(f"Full causal mask of pack {p} ({len(cu) - 1} documents, {t:,} tokens):\n"
                     "red = attention across documents (a leak without varlen)", fontsize=10)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        ax = fig.add_subplot(grid[1, 1])
        ax.imshow(varlen, cmap=ListedColormap(["white", *palette]), vmin=0, vmax=len(palette),
                  extent=ext, interpolation="nearest")
        for c in cu[1:-1]:
            ax.axhline(c, color="#999999", linewidth=0.4)
            ax.axvline(c, color="#999999", linewidth=0.4)
        ax.set_title(f"Varlen block-diagonal mask of pack {p}: cu_seqlens = "
                     f"{_short(cu)}\neach document attends only to itself", fontsize=10)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.suptitle(f"packtune: {r.dataset} ({r.packs:,} packs of {max_length:,} tokens)", fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _short(cu: np.ndarray, k: int = 6) -> str:
    vals = [int(x) for x in cu]
    return "[" + ", ".join(map(str, vals)) + "]" if len(vals) <= k else \
        "[" + ", ".join(map(str, vals[: k - 1])) + f", ..., {vals[-1]}]"
