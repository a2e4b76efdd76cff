"""Attention layers whose own code reads the attention mask: hand them the documents' mask.

packtune's mask function gives ``None`` on a packed row (the varlen kernels take the boundaries
instead). A few layers compute something from the mask themselves before attention runs:

* DeepSeek sparse attention (``deepseek_v32``, ``glm_moe_dsa``): the indexer scores every key
  and keeps the top-k allowed by the mask (``attention_mask[:, 0]``: ``None`` is a TypeError);
* Kolibri 1.1's indexer picks a pool of key blocks and then keys, counted from each query's first
  visible key (its document's start), and refuses a ``None`` mask;
* Doge's dynamic mask adds a learned bias to the mask and keeps the top-k keys of it;
* PhiMoE's sliding window lives only in the mask its model builds (its attention passes no
  ``sliding_window``): ``config_window_attention_forward`` hands the window to packtune's
  attention instead.

Their varlen form replaces a ``None`` mask with the block-diagonal causal mask of the packed
row's documents (and the layer's sliding window, as transformers' mask would have it),
``(rows, 1, len, len)`` booleans, built from the forward's validated boundaries,
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


def layer_window(module: torch.nn.Module) -> int | None:
    """The sliding window of the mask transformers would hand ``module``: with ``layer_types``,
    the window of a ``"sliding_attention"`` layer and none for any other; without, the layer's own
    ``sliding_window`` where it keeps one, else the config's (Doge builds one sliding-window mask
    for all its layers when the config sets a window)."""
    cfg = module.config
    window = getattr(module, "sliding_window", getattr(cfg, "sliding_window", None))
    kinds, index = getattr(cfg, "layer_types", None), getattr(module, "layer_idx", None)
    if kinds is not None and index is not None:
        return window if kinds[index] == "sliding_attention" else None
    return window


def document_causal_mask(
    kwargs: dict, rows: int, length: int, device: torch.device, window: int | None = None
) -> torch.Tensor:
    """``(rows, 1, length, length)`` booleans: key ``j`` is visible to query ``i`` when it is not
    later, lies in the same document (one document per row when there are no boundaries) and,
    with a ``window``, within the last ``window`` tokens (the query itself counted, as in
    transformers' sliding-window masks)."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if window:
        causal = causal.triu(-(window - 1))
    seg = segments_of(kwargs, rows, length)
    if seg is None:
        return causal.expand(rows, 1, length, length)
    same = seg.seq_idx.unsqueeze(-1) == seg.seq_idx.unsqueeze(-2)
    return (same & causal).unsqueeze(1)


def mask_reading_attention_forward(module: torch.nn.Module, *args, **kwargs):
    """Varlen form of an attention layer that reads its mask: the class's own forward, with the
    documents' causal mask where the model handed it ``None``."""
    bound = _signature(type(module)).bind(module, *args, **kwargs)
    # A sliding layer without an indexer (Kolibri 1.1's) reads no mask: the varlen kernels take it.
    plain = getattr(module, "is_sliding", False) and getattr(module, "indexer", True) is None
    if bound.arguments.get("attention_mask") is None and not plain:
        hidden = bound.arguments["hidden_states"]
        rows, length = hidden.shape[:2]
        bound.arguments["attention_mask"] = document_causal_mask(
            kwargs, rows, length, hidden.device, layer_window(module)
        )
    return type(module).forward(*bound.args, **bound.kwargs)


def config_window_attention_forward(module: torch.nn.Module, *args, **kwargs):
    """Varlen form of an attention layer whose sliding window lives only in the mask its model
    builds from ``config.sliding_window`` (PhiMoE): on a packed row packtune's mask is ``None``,
    so the layer's window is handed to packtune's attention as ``sliding_window``, which the
    varlen kernels apply within each document."""
    window = layer_window(module)
    if window and kwargs.get("sliding_window") is None:
        kwargs["sliding_window"] = window
    return type(module).forward(module, *args, **kwargs)
