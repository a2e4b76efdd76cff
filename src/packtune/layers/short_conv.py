"""LFM2's gated short convolution (``Lfm2ShortConv`` and its MoE / LFM3 twins) over packed rows.

The layer is ``out_proj(C * conv(B * x))`` with ``B, C, x`` from one input projection and a
causal depthwise ``conv``. Only the convolution mixes tokens; its taps stop at the document start
(``varlen_causal_conv1d``), so each document sees zeros before it, as when it is alone.
"""

from __future__ import annotations

import torch

from packtune.layers.common import mask_padding, packed_segments
from packtune.layers.conv import varlen_causal_conv1d


def lfm2_short_conv_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Varlen form of ``Lfm2ShortConv.forward`` (same signature and result per document)."""
    rows, length, _ = hidden_states.shape
    seg = packed_segments(module, rows, length, cache, kwargs)
    if seg is None:
        return type(module).forward(module, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    hidden_states = mask_padding(module, hidden_states, attention_mask)
    b, c, x = module.in_proj(hidden_states).transpose(-1, -2).chunk(3, dim=-2)
    conv = module.conv
    mixed = varlen_causal_conv1d(b * x, conv.weight.squeeze(1), conv.bias, seg)
    return module.out_proj((c * mixed).transpose(-1, -2).contiguous())
