"""Causal depthwise convolution over packed rows: no tap reaches into the previous document."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from packtune.layers.segments import Segments


@functools.lru_cache(maxsize=1)
def _cuda_kernel():
    """``causal_conv1d_fn`` from the causal-conv1d package (CUDA only), or ``None``."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return None
    return causal_conv1d_fn


def _activate(out: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return out
    if activation in ("silu", "swish"):
        return F.silu(out)
    from transformers.activations import ACT2FN

    return ACT2FN[activation](out)


def varlen_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seg: Segments,
    activation: str | None = None,
) -> torch.Tensor:
    """``(rows, channels, length)`` in and out: each channel convolved with its ``kernel`` taps
    causally, every document starting from zeros as if it were alone.

    ``weight`` is ``(channels, kernel)`` (a depthwise ``nn.Conv1d``'s weight squeezed), tap
    ``kernel - 1`` being the current token, as in ``F.conv1d`` with ``kernel - 1`` left padding.
    On CUDA with the causal-conv1d package, its kernel runs with ``seq_idx``; elsewhere each tap
    ``s`` tokens back is masked where the token is fewer than ``s`` tokens into its document.

    >>> import torch
    >>> from packtune.attention.varlen import CuSeqlens
    >>> seg = Segments.build(CuSeqlens.validate("cu", torch.tensor([0, 2, 4])), rows=1, length=4)
    >>> x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    >>> varlen_causal_conv1d(x, torch.tensor([[1.0, 10.0]]), None, seg).tolist()  # 10*x[t] + x[t-1]
    [[[10.0, 21.0, 30.0, 43.0]]]
    """
    rows, channels, length = x.shape
    kernel = weight.shape[-1]
    kernel_fn = _cuda_kernel() if x.is_cuda else None
    if kernel_fn is not None and activation in (None, "silu", "swish"):
        # The kernel reads seq_idx only with channel-last strides.
        x_cl = x.transpose(1, 2).contiguous().transpose(1, 2)
        return kernel_fn(x_cl, weight, bias, seq_idx=seg.seq_idx, activation=activation)
    dtype = x.dtype
    x = x.to(weight.dtype)
    out = x * weight[:, kernel - 1].view(1, channels, 1)
    for lag in range(1, min(kernel, length + 1)):
        shifted = F.pad(x, (lag, 0))[..., :length]
        valid = (seg.pos >= lag).unsqueeze(1).to(x.dtype)
        out = out + shifted * valid * weight[:, kernel - 1 - lag].view(1, channels, 1)
    if bias is not None:
        out = out + bias.view(1, channels, 1)
    return _activate(out, activation).to(dtype)
