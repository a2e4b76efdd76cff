"""Varlen forms of layers with state: recurrent scans and causal convolutions restart at every
document start of a packed row, exactly as if each document were alone.

Attention honours packing boundaries through ``AttentionInterface``; layers that carry state from
token to token (Mamba, Gated DeltaNet, short convolutions, lightning attention, ...) do not go
through it, so on a packed row their state would flow from one document into the next.
``enable_varlen`` therefore walks the model and, for every layer whose class is in
``VARLEN_LAYERS``, sets that layer instance's ``forward`` to packtune's varlen form (never the
class's: other models in the process are untouched). A layer that looks stateful but has no
entry is refused by name before anything trains (``StatefulLayerError``).

A varlen form is a function ``forward(module, *args, **kwargs)`` with the layer's own signature.
It finds the forward's validated boundaries where attention finds them, in
``kwargs["packtune_boundaries"]`` (set once per forward by ``enable_varlen``'s boundary hook), and
calls the class's own forward when there are none (decoding with a cache, padded batches).
"""

from __future__ import annotations

from packtune.layers.registry import (
    REFUSED_LAYERS,
    VARLEN_LAYERS,
    StatefulLayerError,
    UnsupportedLayerError,
    install_varlen_layers,
    looks_stateful,
)
from packtune.layers.segments import Segments, segments_of

__all__ = [
    "REFUSED_LAYERS",
    "VARLEN_LAYERS",
    "Segments",
    "StatefulLayerError",
    "UnsupportedLayerError",
    "install_varlen_layers",
    "looks_stateful",
    "segments_of",
]
