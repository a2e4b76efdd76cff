"""Attention layers whose own code reads the attention mask: hand them the documents' mask.

packtune's mask function gives ``None`` on a packed row (the varlen kernels take the boundaries
instead). A few layers compute something from the mask themselves before attention runs:

* DeepSeek sparse attention (``deepseek_v32``, ``glm_moe_dsa``): the indexer scores every key
  and keeps the top-k allowed by the mask (``attention_mask[:, 0]``: ``None`` is a TypeError);
* Doge's dynamic mask adds a learned bias to the mask and keeps the top-k keys of it.

Their varlen form replaces a ``None`` mask with the block-diagonal causal mask of the packed
row's documents, ``(rows, 1, len, len)`` booleans, built from the forward's validated boundaries,
and calls the layer's own forward: the indexer's top-k is then taken over each document's own
keys, exactly as for the document alone, and packtune's attention receives that mask (and the
indexer's ``indices``) on its dense path. Memory is that of the layer's own dense scores.
"""

from __future__ import annotations

import functools
import inspect

import torch

from packtune.layers.segments import segments_of


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def document_causal_mask(kwargs: dict, rows: int, length: int, device: torch.device) -> torch.Tensor:
    """``(rows, 1, length, length)`` booleans: key ``j`` is visible to query ``i`` when it is not
    later and lies in the same document (one document per row when there are no boundaries)."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    seg = segments_of(kwargs, rows, length)
    if seg is None:
        return causal.expand(rows, 1, length, length)
    same = seg.seq_idx.unsqueeze(-1) == seg.seq_idx.unsqueeze(-2)
    return (same & causal).unsqueeze(1)


def mask_reading_attention_forward(module: torch.nn.Module, *args, **kwargs):
    """Varlen form of an attention layer that reads its mask: the class's own forward, with the
    documents' causal mask where the model handed it ``None``."""
    bound = _signature(type(module)).bind(module, *args, **kwargs)
    if bound.arguments.get("attention_mask") is None:
        hidden = bound.arguments["hidden_states"]
        rows, length = hidden.shape[:2]
        bound.arguments["attention_mask"] = document_causal_mask(kwargs, rows, length, hidden.device)
    return type(module).forward(*bound.args, **bound.kwargs)
