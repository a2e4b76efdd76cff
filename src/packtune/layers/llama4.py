"""Llama 4 attention on packed rows: chunked layers and NoPE temperature tuning per document.

Llama 4 has two things that transformers computes over the whole row instead of per document:

* ``chunked_attention`` layers see only the keys of their own ``attention_chunk_size`` chunk.
  That lives in the mask (``create_chunked_causal_mask``), which packtune replaces with the
  boundaries. The varlen form splits every document into chunks counted from the document's own
  start (refined ``cu_seqlens`` for those layers only), so a document sees the same chunks as
  alone.
* NoPE layers scale their queries by ``log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1``
  with ``pos`` an ``arange`` over the whole row. The varlen form hands packtune's attention the
  per-token ratio of that scale at each token's position in its own document to the scale the
  layer applied (``QUERY_SCALE_KWARG``): the queries end up scaled as for the document alone.

Everything else is the layer's own forward. Without boundaries (decoding with a cache, padded
batches: the dense-mask path, whose mask transformers builds chunked), the class's forward runs.
"""

from __future__ import annotations

import functools

import torch

from packtune.attention.hf import BOUNDARIES_KWARG, QUERY_SCALE_KWARG, Boundaries
from packtune.attention.varlen import CuSeqlens
from packtune.layers.segments import segments_of


@functools.lru_cache(maxsize=256)
def chunked_host(host: tuple[int, ...], chunk: int) -> tuple[int, ...]:
    """Document boundaries refined so that every document is cut into ``chunk``-token pieces
    counted from its own start.

    >>> chunked_host((0, 5, 7), 2)
    (0, 2, 4, 5, 7)
    """
    out = [0]
    for start, end in zip(host, host[1:]):
        out.extend(range(start + chunk, end, chunk))
        out.append(end)
    return tuple(out)


def chunked_boundaries(cu: CuSeqlens, chunk: int) -> CuSeqlens:
    """``cu`` with every document split into chunks of ``chunk`` tokens (from the host copy: no
    device read; one host-to-device copy)."""
    host = chunked_host(cu.host, chunk)
    if host == cu.host:
        return cu
    tensor = torch.tensor(host, dtype=torch.int32, device=cu.tensor.device)
    return CuSeqlens(tensor, host, max(b - a for a, b in zip(host, host[1:])))


def _temperature(module: torch.nn.Module, pos: torch.Tensor) -> torch.Tensor:
    # Llama4TextAttention.forward's formula, at the given positions.
    return torch.log1p(torch.floor((pos.float() + 1.0) / module.floor_scale)) * module.attn_scale + 1.0


def llama4_attention_forward(module: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """Varlen form of ``Llama4TextAttention``: per-document chunks and NoPE temperature."""
    bounds = kwargs.get(BOUNDARIES_KWARG)
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    rows, length = hidden_states.shape[:2]
    if bounds is None or mask is not None or bounds.q.total != rows * length:
        return type(module).forward(module, hidden_states, *args, **kwargs)
    extra = {}
    cfg = module.config
    chunk = getattr(cfg, "attention_chunk_size", None)
    if chunk and cfg.layer_types[module.layer_idx] == "chunked_attention":
        cu = chunked_boundaries(bounds.q, int(chunk))
        extra = {
            BOUNDARIES_KWARG: Boundaries(cu, cu),
            "cu_seq_lens_q": cu.tensor,
            "cu_seq_lens_k": cu.tensor,
            "max_length_q": cu.longest,
            "max_length_k": cu.longest,
        }
    if module.attn_temperature_tuning and not module.use_rope:
        seg = segments_of(kwargs, rows, length)
        applied = _temperature(module, torch.arange(length, device=hidden_states.device))
        extra[QUERY_SCALE_KWARG] = _temperature(module, seg.pos) / applied
    return type(module).forward(module, hidden_states, *args, **{**kwargs, **extra})
