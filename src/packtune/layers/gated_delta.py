"""Gated DeltaNet (Qwen3-Next, Qwen3.5, OLMo Hybrid, ...) over packed rows.

The mixer is a causal depthwise convolution over ``[q | k | v]`` followed by the gated delta rule

    S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t k_t v_t^T,   o_t = S_t^T q_t,

computed in chunks of 64 tokens as transformers' ``torch_chunk_gated_delta_rule`` does (a UT
transform inside each chunk, a sequential scan over chunks). On a packed row every document
starts from ``S = 0`` and from zeros before its convolution window, exactly as if it were alone.

CPU (and CUDA without flash-linear-attention): ``varlen_chunk_gated_delta_rule``, the same chunked
algorithm over the row as it lies, chunks at fixed multiples of 64, with the documents kept
apart inside each chunk: the decays and the UT system are block-diagonal by document (a token
never sees an earlier document's keys), a token reads the carried state only if its document
began before the chunk, and the state passed on is reset where the chunk's last document began
inside it. No padding per document, so the work is that of the row without boundaries.

CUDA with flash-linear-attention: its ``chunk_gated_delta_rule`` with ``cu_seqlens``; the
convolution in front goes through ``varlen_causal_conv1d`` (``causal_conv1d_fn`` with
``seq_idx``: the scan kernel's ``cu_seqlens`` alone would leave the first taps of each document
reading the previous one).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from packtune.layers.common import mask_padding, packed_segments
from packtune.layers.conv import varlen_causal_conv1d
from packtune.layers.segments import Segments

#: Tokens per chunk of the torch scan: transformers' ``torch_chunk_gated_delta_rule`` default.
CHUNK_SIZE = 64


@functools.lru_cache(maxsize=1)
def _fla_kernel():
    """flash-linear-attention's ``chunk_gated_delta_rule`` (CUDA only), or ``None``."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    return chunk_gated_delta_rule


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # The form of transformers' (and fla's) l2norm, so results match theirs to the last bit.
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _scan_torch(q, k, v, g, beta, seq_idx, pos, chunk_size: int) -> torch.Tensor:
    """The chunked scan over one flattened row: ``(heads, tokens, dim)`` inputs (q, k already
    normalised and scaled), ``seq_idx``/``pos`` ``(tokens,)``; returns ``(heads, tokens, v_dim)``."""
    heads, total, k_dim = k.shape
    v_dim = v.shape[-1]
    pad = (-total) % chunk_size
    if pad:
        # Padding continues the last document with k = v = 0, beta = 0, g = 0: it adds nothing
        # to the state and decays nothing.
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
        seq_idx = torch.cat([seq_idx, seq_idx[-1:].expand(pad)])
        pos = torch.cat([pos, pos[-1] + 1 + torch.arange(pad, device=pos.device)])
    chunks = (total + pad) // chunk_size
    shape = (heads, chunks, chunk_size)
    q, k, v = (x.reshape(*shape, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(shape), beta.reshape(shape)
    seq_idx, pos = seq_idx.view(chunks, chunk_size), pos.view(chunks, chunk_size)

    index = torch.arange(chunk_size, device=k.device)
    # A token reads (and its document carries) the state of the chunk before only if its document
    # began before this chunk; only the first document of a chunk can.
    carry = pos > index
    # Cumulative log-decay from the start of each token's own stretch of this chunk (the chunk
    # start, or its document's start): exactly the values a document alone would have.
    cum = g.cumsum(-1)
    stretch_start = (index - pos).clamp(min=0).expand(heads, chunks, chunk_size)
    cum = cum - (cum - g).gather(-1, stretch_start)
    # Pairs (i, j) that interact inside a chunk: j <= i in the same document.
    allowed = (seq_idx.unsqueeze(-1) == seq_idx.unsqueeze(-2)) & torch.ones(
        chunk_size, chunk_size, dtype=torch.bool, device=k.device
    ).tril()
    pairwise = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~allowed, float("-inf")).exp()

    k_beta, v_beta = k * beta.unsqueeze(-1), v * beta.unsqueeze(-1)
    read = cum.exp() * carry
    ut_system = (k_beta @ k.transpose(-1, -2)) * pairwise
    intra = (q @ k.transpose(-1, -2)) * pairwise
    # The UT transform: unit lower-triangular and block-diagonal by document.
    new_values = torch.linalg.solve_triangular(ut_system, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(
        ut_system, k_beta * read.unsqueeze(-1), upper=False, unitriangular=True
    )
    q_read = q * read.unsqueeze(-1)
    # What a chunk writes to the state it passes on: its last document's tokens, decayed to the
    # chunk's end; the state it received survives only if that document began before the chunk.
    last_doc = seq_idx == seq_idx[:, -1:]
    # (Masked before exp: an earlier document's stretch has its own origin, so the difference
    # can be positive and overflow, and inf * 0 would poison the gradient with NaN.)
    k_write = k * (cum[..., -1:] - cum).masked_fill(~last_doc, float("-inf")).exp().unsqueeze(-1)
    chunk_decay = (cum[..., -1].exp() * carry[:, -1]).unsqueeze(-1).unsqueeze(-1)

    state = q.new_zeros(heads, k_dim, v_dim)
    outputs = []
    for i in range(chunks):
        v_new = new_values[:, i] - k_cumdecay[:, i] @ state
        outputs.append(q_read[:, i] @ state + intra[:, i] @ v_new)
        state = state * chunk_decay[:, i] + k_write[:, i].transpose(-1, -2) @ v_new
    return torch.stack(outputs, dim=1).reshape(heads, -1, v_dim)[:, :total]


def varlen_chunk_gated_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    seg: Segments,
    chunk_size: int = CHUNK_SIZE,
    use_qk_l2norm_in_kernel: bool = True,
) -> torch.Tensor:
    """The gated delta rule over packed rows, each document from a zero state.

    Shapes as transformers' ``torch_chunk_gated_delta_rule``: ``query``/``key`` ``(rows, len,
    k_heads, k_dim)``, ``value`` ``(rows, len, v_heads, v_dim)`` (``v_heads`` a multiple of
    ``k_heads``), ``g`` (log decay, ``<= 0``) and ``beta`` ``(rows, len, v_heads)``. Returns
    ``(rows, len, v_heads, v_dim)`` in ``query``'s dtype; the work runs in fp32 (or fp64 for fp64
    inputs). ``seg`` counts documents over the flattened rows, as ``cu_seqlens`` does.
    """
    rows, length, k_heads, k_dim = key.shape
    v_heads, v_dim = value.shape[-2:]
    dtype = query.dtype
    if v_heads != k_heads:
        # Grouped values: each query/key head serves v_heads // k_heads consecutive value heads.
        query = query.repeat_interleave(v_heads // k_heads, dim=2)
        key = key.repeat_interleave(v_heads // k_heads, dim=2)
    total = rows * length
    kernel = _fla_kernel() if query.is_cuda else None
    if kernel is not None:
        out, _ = kernel(
            *(x.reshape(1, total, *x.shape[2:]) for x in (query, key, value, g, beta)),
            cu_seqlens=seg.cu.tensor.long(),
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )
        return out.reshape(rows, length, v_heads, v_dim).to(dtype)
    work = torch.promote_types(dtype, torch.float32)
    q, k, v, b, decay = (
        x.reshape(total, *x.shape[2:]).transpose(0, 1).to(work) for x in (query, key, value, beta, g)
    )
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    q = q * k_dim**-0.5
    out = _scan_torch(q, k, v, decay, b, seg.seq_idx.reshape(-1), seg.pos.reshape(-1), chunk_size)
    return out.transpose(0, 1).reshape(rows, length, v_heads, v_dim).to(dtype)


# ----------------------------------------------------------------------------- the mixers


def _mix(module, seg, mixed_qkv, beta, a, gate, norm, out_proj) -> torch.Tensor:
    """Everything after the input projections, shared by every Gated DeltaNet mixer:
    ``mixed_qkv`` ``(rows, len, 2 * key_dim + value_dim)`` before the convolution, ``beta`` after
    its sigmoid, ``a`` the raw decay input, ``gate`` ``(rows, len, value_dim)`` for the gated norm."""
    rows, length, _ = mixed_qkv.shape
    conv = module.conv1d
    mixed_qkv = varlen_causal_conv1d(
        mixed_qkv.transpose(1, 2), conv.weight.squeeze(1), conv.bias, seg, module.activation
    ).transpose(1, 2)
    query, key, value = torch.split(mixed_qkv, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    query = query.reshape(rows, length, -1, module.head_k_dim)
    key = key.reshape(rows, length, -1, module.head_k_dim)
    value = value.reshape(rows, length, -1, module.head_v_dim)
    # As the models do: fp32 so that a half-precision A cannot reach -inf.
    g = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)
    out = varlen_chunk_gated_delta_rule(query, key, value, g, beta, seg)
    out = norm(out.reshape(-1, module.head_v_dim), gate.reshape(-1, module.head_v_dim))
    return out_proj(out.reshape(rows, length, -1))


def _unpacked(module, hidden_states, cache, attention_mask, kwargs):
    return type(module).forward(module, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)


def qwen3_next_gated_deltanet_forward(
    module: torch.nn.Module, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs
) -> torch.Tensor:
    """Varlen form of ``Qwen3NextGatedDeltaNet.forward`` (fused ``qkvz`` / ``ba`` projections)."""
    rows, length, _ = hidden_states.shape
    seg = packed_segments(module, rows, length, cache, kwargs)
    if seg is None:
        return _unpacked(module, hidden_states, cache, attention_mask, kwargs)
    hidden_states = mask_padding(module, hidden_states, attention_mask)
    query, key, value, z, b, a = module.fix_query_key_value_ordering(
        module.in_proj_qkvz(hidden_states), module.in_proj_ba(hidden_states)
    )
    mixed_qkv = torch.cat([x.reshape(rows, length, -1) for x in (query, key, value)], dim=-1)
    return _mix(module, seg, mixed_qkv, b.sigmoid(), a, z, module.norm, module.out_proj)


def qwen3_5_gated_deltanet_forward(
    module: torch.nn.Module, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs
) -> torch.Tensor:
    """Varlen form of ``Qwen3_5GatedDeltaNet.forward`` and the mixers that share it (Qwen3.5-MoE,
    Lara-mini, Qwen4-exp): separate ``qkv``, ``z``, ``b`` and ``a`` projections."""
    rows, length, _ = hidden_states.shape
    seg = packed_segments(module, rows, length, cache, kwargs)
    if seg is None:
        return _unpacked(module, hidden_states, cache, attention_mask, kwargs)
    hidden_states = mask_padding(module, hidden_states, attention_mask)
    beta = module.in_proj_b(hidden_states).sigmoid()
    return _mix(
        module,
        seg,
        module.in_proj_qkv(hidden_states),
        beta,
        module.in_proj_a(hidden_states),
        module.in_proj_z(hidden_states),
        module.norm,
        module.out_proj,
    )


def olmo_hybrid_gated_deltanet_forward(
    module: torch.nn.Module, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs
) -> torch.Tensor:
    """Varlen form of ``OlmoHybridGatedDeltaNet.forward``: separate ``q/k/v/a/b`` projections, a
    ``g_proj`` output gate, and ``beta`` doubled when negative eigenvalues are allowed."""
    rows, length, _ = hidden_states.shape
    seg = packed_segments(module, rows, length, cache, kwargs)
    if seg is None:
        return _unpacked(module, hidden_states, cache, attention_mask, kwargs)
    hidden_states = mask_padding(module, hidden_states, attention_mask)
    mixed_qkv = torch.cat([module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states)], -1)
    beta = module.b_proj(hidden_states).sigmoid()
    if module.allow_neg_eigval:
        beta = beta * 2.0
    gate = module.g_proj(hidden_states)
    return _mix(module, seg, mixed_qkv, beta, module.a_proj(hidden_states), gate, module.o_norm, module.o_proj)
