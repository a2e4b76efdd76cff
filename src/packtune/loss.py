"""A loss that does not depend on how samples were packed.

Every trained target gets a weight, and the loss of an optimizer step is

    sum over all targets of the step (every micro-batch, every rank) of  weight * cross_entropy
    ---------------------------------------------------------------------------------------
    sum of the same weights

``loss_reduction`` picks the weight of a target in a sample with ``n`` trained targets:

* ``"token"``: 1. The mean over all trained tokens of the global batch; long samples weigh more.
* ``"sample"``: ``1 / n``. Every sample weighs the same, whatever its length.
* ``"square"``: ``1 / sqrt(n)``. Between the two.

Both numerator and denominator are sums over samples, so the result is the same however the
samples were grouped into packs, rows, micro-batches or ranks. The denominator is known from
the labels alone (the sum of ``target_weights``), before any forward pass, which is what lets a training
step normalise every micro-batch by the *global* total (see ``recipe``).

Targets are the labels shifted by one inside each row (position ``t`` predicts label
``t + 1``), as transformers' own loss does. ``get_pack`` masks the first label of every
document, so no target crosses a document boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from packtune.config.settings import LOSS_REDUCTIONS as REDUCTIONS
from packtune.packing.packs import IGNORE_INDEX


def target_weights(labels: torch.Tensor, cu_seqlens: torch.Tensor, reduction: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted targets ``(rows * length,)`` and their float32 weights (0 where untrained).

    ``cu_seqlens`` gives the documents over the flattened tokens; a document is a sample.

    >>> labels = torch.tensor([[-100, 6, 7, -100, 9]])
    >>> t, w = target_weights(labels, torch.tensor([0, 3, 5]), "sample")
    >>> t.tolist(), w.tolist()
    ([6, 7, -100, 9, -100], [0.5, 0.5, 0.0, 1.0, 0.0])
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown loss_reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    rows, length = labels.shape
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    targets = targets.reshape(-1)
    valid = targets != IGNORE_INDEX
    weights = valid.to(torch.float32)
    if reduction == "token":
        return targets, weights
    # Target i is label i + 1, which belongs to the document containing token i + 1.
    cu = cu_seqlens.to(device=labels.device, dtype=torch.int64)
    doc = torch.searchsorted(cu, torch.arange(1, rows * length + 1, device=labels.device), right=True) - 1
    doc = doc.clamp(max=cu.numel() - 2)
    counts = torch.zeros(cu.numel() - 1, device=labels.device, dtype=torch.float32)
    counts.index_add_(0, doc[valid], torch.ones_like(doc[valid], dtype=torch.float32))
    per_doc = 1.0 / counts.clamp(min=1.0)
    if reduction == "square":
        per_doc = per_doc.sqrt()
    return targets, weights * per_doc[doc]


def weighted_loss_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(weight * cross_entropy)`` over the flattened targets, computed in float32."""
    flat = logits.reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(flat.float(), targets, reduction="none", ignore_index=IGNORE_INDEX)
    return (ce * weights).sum()
