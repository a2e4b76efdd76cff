"""What the state-space mixers (Mamba1 and Mamba2 forms) share: when the class's own forward is
exact, and the refusal of a packed row that would fill a recurrent-state cache."""

from __future__ import annotations

import torch

from packtune.layers.segments import Segments


def own_forward_is_exact(seg: Segments | None, rows: int, cache) -> bool:
    """Whether the layer's own forward gives the varlen result: no boundaries (decoding, padded
    batches), or every row is one whole document. Raises when a packed row would fill a cache:
    its final recurrent state would belong to the last document only, and decoding from it would
    continue the wrong text."""
    if seg is None or seg.documents == rows:
        return True
    if cache is not None:
        raise NotImplementedError(
            "packed rows cannot fill a state-space layer's cache (its state belongs to one document): "
            "pass use_cache=False when training on packed rows"
        )
    return False


def mask_padding(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """transformers' ``apply_mask_to_padding_states``: zero the states of padding tokens (a packed
    row has none, so this keeps the layer's arithmetic when it is given an all-ones mask)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return hidden_states
    return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
