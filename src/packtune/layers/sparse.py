"""Sparse attention layers packtune cannot make exact yet, and why (``REFUSED_LAYERS``).

DeepSeek sparse attention (``deepseek_v32``, ``glm_moe_dsa`` and the layers that share its
indexer) is exact: its varlen form (``packtune.layers.masked``) hands the indexer the documents'
mask, so its top-k runs over each document's own keys. The layers below select or pool keys by
their absolute slot in the row, which a mask cannot fix; each reason is one clause of
``enable_varlen``'s refusal.
"""

from __future__ import annotations

import torch


def minimax_m3_reason(module: torch.nn.Module) -> str | None:
    """MiniMax-M3's block-sparse layers (those with an indexer) pick key blocks anchored to absolute
    key slots of the row and compare them with ``position_ids``: on a packed row the blocks and the
    causal test cross documents. Its dense layers are plain attention (exact)."""
    if getattr(module, "indexer", None) is None:
        return None
    return ("is block-sparse attention whose indexer picks key blocks by absolute slot in the row, "
            "not per document (packtune has no varlen form of it)")


def deepseek_v4_reason(module: torch.nn.Module) -> str | None:
    """DeepSeek-V4's compressed layers append keys pooled by a compressor over the whole row (and
    picked by an indexer): those pooled keys mix documents. Its sliding-only layers are exact."""
    if getattr(module, "compressor", None) is None:
        return None
    return ("appends compressed keys pooled over the whole row (compressed sparse attention), which "
            "mix documents (packtune has no varlen form of it)")
