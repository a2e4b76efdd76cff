"""Mamba2 (state space duality) mixers over packed rows: every document starts from a zero state.

One varlen form serves every Mamba2 mixer transformers ships (``BambaMixer``,
``GraniteMoeHybridMambaLayer``, ``NemotronHMamba2Mixer``, ``Zamba2MambaMixer``, ``Mamba2Mixer``
and, with its multipliers, ``FalconH1Mixer``): they are copies of one layer (in_proj, causal
depthwise conv over x/B/C, chunked SSD scan, gated RMS norm, out_proj) that differ only in how
the input is scaled and the output gated. The conv runs through ``varlen_causal_conv1d`` and the
scan through ``varlen_ssd_scan``; both restart at every document start.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from packtune.layers.conv import varlen_causal_conv1d
from packtune.layers.common import mask_padding, packed_segments
from packtune.layers.segments import Segments


@functools.lru_cache(maxsize=1)
def _cuda_scan():
    """mamba_ssm's ``mamba_chunk_scan_combined`` (CUDA only; it takes ``seq_idx``), or ``None``."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return mamba_chunk_scan_combined


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = x[..., j+1] + ... + x[..., i]`` for ``j <= i``, ``-inf`` above the
    diagonal (transformers' ``segment_sum``: masked cumulative sums, stabler than a difference of
    two cumulative sums)."""
    size = x.size(-1)
    x = x[..., None].expand(*x.size(), size)
    below = torch.tril(torch.ones(size, size, device=x.device, dtype=torch.bool), diagonal=-1)
    out = torch.cumsum(x.masked_fill(~below, 0), dim=-2)
    causal = torch.tril(torch.ones(size, size, device=x.device, dtype=torch.bool), diagonal=0)
    return out.masked_fill(~causal, -torch.inf)


def _chunks(t: torch.Tensor, pad: int, chunk: int) -> torch.Tensor:
    """``(b, l, ...)`` zero-padded to a multiple of ``chunk`` tokens and cut into ``(b, c, chunk, ...)``."""
    t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])


def varlen_ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    seg: Segments,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """The Mamba2 chunked scan (SSD) of ``x`` ``(b, l, heads, head_dim)`` with ``dt``
    ``(b, l, heads)``, ``A`` ``(heads,)``, ``B``/``C`` ``(b, l, groups, state)``, restarted at
    every document start of ``seg``: each document's output is what it gets alone. Returns fp32
    ``(b, l, heads, head_dim)`` including the ``D`` skip (transformers' ``mamba2_chunk_scan``).

    On CUDA with mamba_ssm, its ``mamba_chunk_scan_combined`` runs with ``seq_idx``. Elsewhere,
    chunked in PyTorch: a token's contribution to a later token, to its chunk's final state, and
    a chunk's state to later chunks and tokens are kept only within one document (masks on the
    segment sums before ``exp``, so the cuts are exact zeros, with zero gradients, never NaN).
    """
    if x.is_cuda and _cuda_scan() is not None:
        return _cuda_scan()(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, seq_idx=seg.seq_idx,
            dt_softplus=dt_softplus, dt_limit=tuple(dt_limit),
        ).float()  # fmt: skip
    b, length, heads, _ = x.shape
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])
    x = x.float()
    groups = B.shape[2]
    B = B.float().repeat_interleave(heads // groups, dim=2, output_size=heads)
    C = C.float().repeat_interleave(heads // groups, dim=2, output_size=heads)
    pad = (chunk_size - length % chunk_size) % chunk_size
    skip = None if D is None else D[..., None] * x
    x = x * dt[..., None].float()
    a = A.to(x.dtype) * dt.float()
    x, a, B, C = (_chunks(t, pad, chunk_size) for t in (x, a, B, C))
    # Padding tokens are a document of their own (-1): nothing crosses into or out of them.
    doc = F.pad(seg.seq_idx, (0, pad), value=-1).view(b, -1, chunk_size)  # (b, c, l)
    last = doc[:, :, -1]  # the document each chunk's final state belongs to

    a = a.permute(0, 3, 1, 2)  # (b, h, c, l)
    a_cumsum = torch.cumsum(a, dim=-1)

    # 1. Within a chunk: token s reaches token l only inside one document.
    same = (doc[:, :, :, None] == doc[:, :, None, :])[:, None]  # (b, 1, c, l, s)
    decay = torch.exp(_segsum(a).masked_fill(~same, -torch.inf))
    scores = torch.einsum("bclhn,bcshn->bclsh", C, B) * decay.permute(0, 2, 3, 4, 1)
    y_diag = torch.einsum("bclsh,bcshp->bclhp", scores, x)

    # 2. Each chunk's final state, from the tokens of the document that chunk ends in.
    to_end = torch.exp(a_cumsum[:, :, :, -1:] - a_cumsum)  # <= 1: a <= 0
    to_end = to_end * (doc == last[:, :, None])[:, None].to(to_end.dtype)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, x)

    # 3. States passed from chunk to chunk, only while the document goes on: chunk z's state
    # reaches the end of chunk c > z iff both end in the same document (no start between them).
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    ends = F.pad(last, (1, 0), value=-2)  # the zero initial state belongs to no document
    carry = (ends[:, :, None] == ends[:, None, :])[:, None]  # (b, 1, to, from)
    chunk_decay = torch.exp(_segsum(F.pad(a_cumsum[:, :, :, -1], (1, 0))).masked_fill(~carry, -torch.inf))
    states = torch.einsum("bhcz,bzhpn->bchpn", chunk_decay, states)[:, :-1]  # state entering each chunk

    # 4. The entering state reaches the tokens of the document it belongs to.
    entering = ends[:, :-1]  # (b, c): document of the state entering chunk c
    reach = torch.exp(a_cumsum) * (doc == entering[:, :, None])[:, None].to(a_cumsum.dtype)
    y_off = torch.einsum("bclhn,bchpn->bclhp", C, states) * reach.permute(0, 2, 3, 1)[..., None]

    y = (y_diag + y_off).reshape(b, -1, heads, x.shape[-1])[:, :length]
    return y if skip is None else y + skip


def _mamba2_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    *,
    project: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    gate_out: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    **kwargs,
) -> torch.Tensor:
    """The Mamba2 mixer forward of transformers (``BambaMixer.forward`` and its copies) with the
    conv and the scan restarted at document starts. ``project``/``gate_out``: the per-class
    steps around them (input projection, gated norm)."""
    rows, length, _ = hidden_states.shape
    seg = packed_segments(module, rows, length, cache, kwargs)
    if seg is None:
        return type(module).forward(module, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    dtype = hidden_states.dtype
    projected = project(module, mask_padding(module, hidden_states, attention_mask))
    state = module.n_groups * module.ssm_state_size
    gate, xbc, dt = projected.split([module.intermediate_size, module.conv_dim, module.num_heads], dim=-1)
    conv = module.conv1d
    xbc = varlen_causal_conv1d(xbc.transpose(1, 2), conv.weight.squeeze(1), conv.bias, seg, module.activation)
    xbc = mask_padding(module, xbc.transpose(1, 2), attention_mask)
    x, B, C = xbc.split([module.intermediate_size, state, state], dim=-1)
    y = varlen_ssd_scan(
        x.reshape(rows, length, module.num_heads, module.head_dim),
        dt,
        -torch.exp(module.A_log.float()),
        B.reshape(rows, length, module.n_groups, module.ssm_state_size),
        C.reshape(rows, length, module.n_groups, module.ssm_state_size),
        seg,
        module.chunk_size,
        D=module.D,
        dt_bias=module.dt_bias,
        dt_limit=tuple(module.time_step_limit),
    )
    y = gate_out(module, y.reshape(rows, length, module.intermediate_size), gate)
    return module.out_proj(y.to(dtype))


def _in_proj(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return module.in_proj(hidden_states)


def _gated_norm(module: torch.nn.Module, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return module.norm(y, gate)


def _falcon_h1_in_proj(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    # FalconH1Mixer: the input scaled by ssm_in_multiplier, the projection by the muP vector.
    return module.in_proj(hidden_states * module.ssm_in_multiplier) * module.mup_vector


def _falcon_h1_gate(module: torch.nn.Module, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    # FalconH1Mixer: the gated RMS norm is optional (mamba_rms_norm); without it, a SiLU gate.
    return module.norm(y, gate) if module.mamba_rms_norm else y * F.silu(gate)


def mamba2_mixer_forward(module: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Varlen form of ``BambaMixer``, ``GraniteMoeHybridMambaLayer``, ``NemotronHMamba2Mixer``,
    ``Zamba2MambaMixer`` and ``Mamba2Mixer`` (same signature as their ``forward``)."""
    return _mamba2_forward(module, hidden_states, *args, project=_in_proj, gate_out=_gated_norm, **kwargs)


def falcon_h1_mixer_forward(module: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Varlen form of ``FalconH1Mixer``: the Mamba2 mixer with Falcon-H1's multipliers."""
    return _mamba2_forward(
        module, hidden_states, *args, project=_falcon_h1_in_proj, gate_out=_falcon_h1_gate, **kwargs
    )
