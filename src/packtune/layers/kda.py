"""Kimi delta attention (KDA) over packed rows: the chunked delta-rule scan restarts its state and
its decay at every document start, and the short convolutions in front of it never reach into the
previous document.

Layers: ``KimiLinearDeltaAttention`` (kimi_linear), ``BailingHybridDeltaAttention``
(bailing_hybrid) and ``Glm5NextTextLinearAttention`` (glm5_next's text model), which share
transformers' KDA scan (``chunk_kimi_delta_attention``) and differ only in their forget gate
(their own submodule, called as it is) and their output gate.

KDA is a gated delta rule with one decay per key channel: for each head, with ``q`` and ``k``
l2-normalised and ``q`` scaled by ``1/sqrt(K)``,
``S_t = diag(exp(g_t)) S_{t-1};  S_t += k_t (beta_t (v_t - S_t^T k_t))^T;  o_t = S_t^T q_t``,
with ``S = 0`` before each document. The CPU form below is transformers' chunked algorithm (chunks
of 64 tokens, a WY representation inside each chunk, the state carried between chunks) with
document masks: inside a chunk only pairs of the same document interact, the decay is summed from
the document's own start, only tokens whose document began before the chunk read the carried
state, and only the chunk's last document writes it. On CUDA with flash-linear-attention, its
``chunk_kda`` runs with ``cu_seqlens`` instead.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from packtune.layers.conv import varlen_causal_conv1d
from packtune.layers.common import mask_padding, packed_segments
from packtune.layers.segments import Segments

#: Tokens per chunk of the scan: transformers' and flash-linear-attention's default for KDA.
CHUNK_SIZE = 64


@functools.lru_cache(maxsize=1)
def _fla_chunk_kda():
    """flash-linear-attention's ``chunk_kda`` (CUDA) and whether it takes ``cu_seqlens_cpu``, or
    ``None`` when the package is missing."""
    try:
        from fla.ops.kda import chunk_kda
    except ImportError:
        return None
    return chunk_kda, "cu_seqlens_cpu" in inspect.signature(chunk_kda).parameters


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # transformers' (and fla's) form: eps inside the square root, not F.normalize's max(norm, eps).
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def chunk_kda_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    seg: Segments,
    chunk_size: int = CHUNK_SIZE,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """KDA over packed rows in pure PyTorch: every document as if it were alone, no state in.

    ``query``/``key``: ``(rows, length, heads, K)``; ``value``: ``(rows, length, heads, V)``;
    ``g``: ``(rows, length, heads, K)`` log decay per key channel; ``beta``: ``(rows, length,
    heads)``; ``seg``: the rows' documents. Returns ``(rows, length, heads, V)`` in ``query``'s
    dtype, computed in float32 (as transformers does). The rows are scanned as one flattened
    sequence, the way the boundaries (and varlen attention) count them.
    """
    rows, length, heads, k_dim = key.shape
    v_dim = value.shape[-1]
    dtype = query.dtype
    total = rows * length
    # (1, heads, total, ·) in float32: the layout transformers' chunked scan works in.
    q, k, v, b, gg = (
        x.reshape(1, total, *x.shape[2:]).transpose(1, 2).to(torch.float32) for x in (query, key, value, beta, g)
    )
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    scale = k_dim**-0.5 if scale is None else scale
    pad = (-total) % chunk_size
    n = (total + pad) // chunk_size
    q = F.pad(q, (0, 0, 0, pad)) * scale
    k, v, gg = (F.pad(x, (0, 0, 0, pad)) for x in (k, v, gg))
    b = F.pad(b, (0, pad))
    # Padding tokens form a document of their own (-1) at the very end: they reach nothing real.
    doc = F.pad(seg.seq_idx.reshape(-1).long(), (0, pad), value=-1).view(n, chunk_size)
    pos = F.pad(seg.pos.reshape(-1), (0, pad), value=0).view(n, chunk_size)
    index = torch.arange(chunk_size, device=doc.device)

    same = doc.unsqueeze(-1) == doc.unsqueeze(-2)  # (n, C, C): i and j in one document
    causal = index.unsqueeze(-1) >= index.unsqueeze(-2)
    seen = same & causal  # j <= i within i's document
    # The token's document began before its chunk: it reads the state carried into the chunk.
    carries = (pos > index).to(torch.float32)  # (n, C)
    # Tokens of the chunk's last document: only they write the state carried out of it.
    last_doc = same[:, :, -1]  # (n, C)
    keep_state = carries[:, -1]  # (n,): the carried state survives the chunk

    k_beta = k * b.unsqueeze(-1)
    v_beta = v * b.unsqueeze(-1)
    q, k, v, gg, k_beta, v_beta = (
        x.reshape(1, heads, n, chunk_size, x.shape[-1]) for x in (q, k, v, gg, k_beta, v_beta)
    )
    # Decay summed from the document's own start (or from the chunk start for a document that
    # began before it), as a masked sum rather than a cumsum minus an offset: no cancellation.
    g_cum = seen.to(torch.float32) @ gg  # (1, heads, n, C, K)
    decay = (g_cum.unsqueeze(-2) - g_cum.unsqueeze(-3)).masked_fill(~seen[..., None], float("-inf")).exp()
    strict = ~torch.tril(torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device), diagonal=-1)
    attn = -(k_beta.unsqueeze(-2) * k.unsqueeze(-3) * decay).sum(-1).masked_fill(strict, 0)
    # Forward substitution for (I - A)^-1: A is block diagonal over documents, so is its inverse.
    for i in range(1, chunk_size):
        row = attn[..., i, :i].clone()
        sub = attn[..., :i, :i].clone()
        attn[..., i, :i] = row + (row.unsqueeze(-1) * sub).sum(-2)
    attn = attn + torch.eye(chunk_size, dtype=attn.dtype, device=attn.device)
    value_w = attn @ v_beta
    k_cumdecay = (attn @ (k_beta * g_cum.exp())) * carries[:, :, None]

    # Everything that does not read the carried state, for all chunks at once (``decay`` is 0
    # above the diagonal and across documents).
    intra = (q.unsqueeze(-2) * k.unsqueeze(-3) * decay).sum(-1)
    q_decayed = q * g_cum.exp() * carries[..., None]
    g_last = g_cum[..., -1:, :]  # (1, heads, n, 1, K)
    # Masked before exp: another document's decay, summed from its own start, may exceed g_last.
    k_to_end = k * (g_last - g_cum).masked_fill(~last_doc[..., None], float("-inf")).exp()
    state_decay = g_last.transpose(-1, -2).exp() * keep_state.view(1, 1, n, 1, 1)

    # The scan over chunks; unbind (not indexing) so that backward does not fill a full-size
    # gradient per chunk.
    state = q.new_zeros(1, heads, k_dim, v_dim)
    outs = []
    for q_i, a_i, w_i, kc_i, ke_i, sd_i in zip(
        *(x.unbind(2) for x in (q_decayed, intra, value_w, k_cumdecay, k_to_end, state_decay))
    ):
        v_new = w_i - kc_i @ state
        outs.append(q_i @ state + a_i @ v_new)
        state = state * sd_i + ke_i.transpose(-1, -2) @ v_new
    out = torch.stack(outs, dim=2)
    out = out.reshape(1, heads, -1, v_dim)[:, :, :total]
    return out.transpose(1, 2).reshape(rows, length, heads, v_dim).to(dtype)


def kda_scan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    seg: Segments,
) -> torch.Tensor:
    """KDA with l2-normalised q/k over packed rows (shapes as ``chunk_kda_varlen``): fla's
    ``chunk_kda`` with ``cu_seqlens`` on CUDA when installed, the PyTorch chunked form elsewhere."""
    fla = _fla_chunk_kda() if query.is_cuda else None
    if fla is None:
        return chunk_kda_varlen(query, key, value, g, beta, seg)
    kernel, takes_host_copy = fla
    rows, length = query.shape[:2]
    flat = [x.reshape(1, rows * length, *x.shape[2:]) for x in (query, key, value, g, beta)]
    # The boundaries' host copy, where fla takes one, spares it reading the device tensor back.
    host = {"cu_seqlens_cpu": torch.tensor(seg.cu.host, dtype=torch.long)} if takes_host_copy else {}
    out, _ = kernel(
        flat[0],
        flat[1],
        flat[2],
        g=flat[3],
        beta=flat[4],
        use_qk_l2norm_in_kernel=True,
        cu_seqlens=seg.cu.tensor.long(),
        **host,
    )
    return out.reshape(rows, length, *out.shape[2:])


def _output_gate(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The gate of the layer's gated output norm: a low-rank pair (Kimi) or one projection (Bailing)."""
    if hasattr(module, "g_a_proj"):
        return module.g_b_proj(module.g_a_proj(hidden_states))
    return module.g_proj(hidden_states)


def varlen_kda_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """``KimiLinearDeltaAttention.forward`` / ``BailingHybridDeltaAttention.forward`` on packed rows.

    Without boundaries (no packing, padded batches, decoding) it is the class's own forward.
    """
    rows, length = hidden_states.shape[:2]
    seg = packed_segments(module, rows, length, cache, kwargs)
    if seg is None:
        return type(module).forward(module, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    hidden_states = mask_padding(module, hidden_states, attention_mask)
    shape = (rows, length, -1, module.head_dim)
    mixed = torch.cat(
        [module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states)], dim=-1
    ).transpose(1, 2)
    conv = module.conv1d
    mixed = varlen_causal_conv1d(mixed, conv.weight.squeeze(1), conv.bias, seg, activation=module.activation)
    query, key, value = (
        x.reshape(shape) for x in torch.split(mixed.transpose(1, 2), [module.qkv_dim] * 3, dim=-1)
    )
    g = module.forget_gate(hidden_states)
    beta = torch.sigmoid(module.b_proj(hidden_states))
    out = kda_scan(query, key, value, g, beta, seg)
    out = module.o_norm(out, _output_gate(module, hidden_states).view(shape)).reshape(rows, length, -1)
    return module.o_proj(out)
