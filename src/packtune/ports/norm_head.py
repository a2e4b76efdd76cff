"""Baichuan2's NormHead: the output layer's effective weight is its rows normalised to unit length.

The original normalises in place on its first eval forward, but checkpoints (and training)
hold the raw rows. Here the normalisation is part of every forward pass, so the raw rows stay
the trained parameter, gradients flow to them through ``F.normalize`` exactly as in the
original's training mode, and the head is still an ``nn.Linear`` (PEFT, ``logits_to_keep``,
DeepSpeed and FSDP treat it as one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NormHead(nn.Linear):
    """``nn.Linear`` whose forward uses ``F.normalize(weight, dim=-1)``; ``weight`` holds the raw rows."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, F.normalize(self.weight, dim=-1), self.bias)


def install_norm_head(model: nn.Module) -> nn.Module:
    """Make ``model``'s output layer a ``NormHead`` sharing the same weight (idempotent)."""
    head = model.get_output_embeddings()
    if isinstance(head, NormHead):
        return model
    if type(head) is not nn.Linear:
        raise TypeError(f"NormHead replaces an nn.Linear output layer, got {type(head).__name__}")
    new = NormHead(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    new.weight = head.weight
    if head.bias is not None:
        new.bias = head.bias
    model.set_output_embeddings(new)
    return model


def normalized_head(weight: torch.Tensor) -> torch.Tensor:
    """The effective head a model without NormHead must hold (the native layout)."""
    return F.normalize(weight.float(), dim=-1).to(weight.dtype)
