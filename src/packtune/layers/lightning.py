"""MiniMax lightning attention over packed rows: the block-wise decayed linear attention restarts
its state at every document start.

``MiniMaxLightningAttention`` computes, per head with slope ``s``,
``o_i = sum_{j <= i} exp(-s (i - j)) (q_i . k_j) v_j``, in blocks of ``block_size`` tokens: inside
a block from the scores times a decay matrix, across blocks through a ``K^T V`` state decayed by
``exp(-s * block_size)`` per block. The decay depends only on ``i - j``, so a document alone is the
same sum restricted to its own tokens. The varlen form keeps transformers' blocks and masks them:
inside a block only pairs of one document interact, only tokens whose document began before the
block read the carried state, and only the block's last document writes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from packtune.layers.common import packed_segments
from packtune.layers.segments import Segments


def lightning_attention_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seg: Segments,
    slope_rate: torch.Tensor,
    query_decay: torch.Tensor,
    key_decay: torch.Tensor,
    diagonal_decay: torch.Tensor,
) -> torch.Tensor:
    """Lightning attention over packed rows, every document as if it were alone (no state in).

    ``query``/``key``/``value``: ``(rows, heads, length, D)`` (transformers' layout in the layer).
    The decays are the layer's own buffers: ``slope_rate`` ``(heads, 1, 1)``, ``query_decay`` and
    ``key_decay`` ``(heads, block, 1)``, ``diagonal_decay`` ``(1, heads, block, block)``; their
    ``block`` is the block size. Returns ``(rows, heads, length, D)``. The rows are scanned as one
    flattened sequence, the way the boundaries count them.
    """
    rows, heads, length, dim = query.shape
    block_size = query_decay.shape[1]
    v_dim = value.shape[-1]
    total = rows * length
    pad = (-total) % block_size
    n = (total + pad) // block_size
    q, k, v = (
        F.pad(x.transpose(0, 1).reshape(1, heads, total, x.shape[-1]), (0, 0, 0, pad)).view(
            1, heads, n, block_size, x.shape[-1]
        )
        for x in (query, key, value)
    )
    # Padding tokens form a document of their own (-1) at the very end: they reach nothing real.
    doc = F.pad(seg.seq_idx.reshape(-1).long(), (0, pad), value=-1).view(n, block_size)
    pos = F.pad(seg.pos.reshape(-1), (0, pad), value=0).view(n, block_size)
    index = torch.arange(block_size, device=doc.device)
    dtype = q.dtype
    same = (doc.unsqueeze(-1) == doc.unsqueeze(-2)).to(dtype)  # (n, B, B)
    carries = (pos > index).to(dtype)  # (n, B): the document began before the block
    last_doc = same[:, :, -1]  # (n, B): tokens of the block's last document
    keep_state = carries[:, -1]  # (n,): the carried state survives the block

    block_decay = torch.exp(-slope_rate * block_size)  # across a whole block, as transformers has it

    state = q.new_zeros(1, heads, dim, v_dim)
    out = []
    for i in range(n):
        q_i, k_i, v_i = q[:, :, i], k[:, :, i], v[:, :, i]
        intra = ((q_i @ k_i.transpose(-1, -2)) * diagonal_decay * same[i]) @ v_i
        inter = ((q_i * query_decay) @ state) * carries[i, :, None]
        out.append(intra + inter)
        written = (k_i * key_decay * last_doc[i, :, None]).transpose(-1, -2) @ v_i
        state = state * (block_decay * keep_state[i]) + written
    out = torch.cat(out, dim=-2)[:, :, :total]
    return out.view(heads, rows, length, v_dim).transpose(0, 1)


def varlen_lightning_forward(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings=None,
    attention_mask: torch.Tensor | None = None,
    cache=None,
    **kwargs,
):
    """``MiniMaxLightningAttention.forward`` on packed rows; the class's own forward without boundaries.

    Returns ``(output, None)``: the layer's second output, its final ``K^T V`` state, is what a
    cache keeps, and a packed row fills no cache.
    """
    rows, length = hidden_states.shape[:2]
    seg = packed_segments(module, rows, length, cache, kwargs)
    if seg is None:
        return type(module).forward(
            module, hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs
        )
    heads, head_dim = module.num_attention_heads, module.head_dim
    qkv = module.act_fn(module.qkv_proj(hidden_states))
    if attention_mask is not None and attention_mask.dim() == 2:
        # The layer's own zeroing of padded tokens (a packed row has none: all ones).
        qkv = (qkv * attention_mask[:, :, None]).to(qkv.dtype)
    qkv = qkv.reshape(rows, length, heads, 3 * head_dim)
    query, key, value = (x.transpose(1, 2) for x in torch.split(qkv, head_dim, dim=3))
    out = lightning_attention_varlen(
        query, key, value, seg, module.slope_rate, module.query_decay, module.key_decay, module.diagonal_decay
    )
    out = out.transpose(1, 2).reshape(rows, length, heads * head_dim)
    out = module.norm(out)
    out = torch.sigmoid(module.output_gate(hidden_states)) * out
    return module.out_proj(out), None
