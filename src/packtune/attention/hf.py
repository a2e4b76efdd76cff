"""``"packtune_varlen"``: varlen attention for every transformers model, through ``AttentionInterface``.

``import packtune`` registers an attention function and a mask function under the name
``"packtune_varlen"``. A model loaded with ``attn_implementation="packtune_varlen"`` then runs
every attention layer through ``varlen_attn_func`` with the document boundaries of the batch.

Where the boundaries come from, first match wins:

1. ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (and ``max_length_q/k``) passed to the model's forward,
   exactly as transformers' ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``
   produces them. Offsets count tokens of the flattened ``(batch * seq)`` rows. Required for
   models that do not hand ``position_ids`` to their attention (GPT-BigCode).
2. ``position_ids``: a new document starts wherever a position is not the previous one plus
   one (``[0 1 2 0 1]`` is two documents), and at the start of every row.
3. Neither: every row is one document.

``packtune.enable_varlen`` validates the boundaries once per forward, where the batch enters
the model (``forward_boundaries``), and hands every layer the result (``Boundaries``, in the
``packtune_boundaries`` keyword): the layers then never read ``cu_seqlens`` back on the host,
so a CUDA forward makes no device sync per layer. Without it, each layer validates on its own.

Unlike transformers' own packed-row detection, this does not switch off when a KV cache
exists (``use_cache=True`` in training) or when an all-ones 2-D ``attention_mask`` is passed.
Only a 2-D mask that really pads something (batched generation) produces a dense 4-D mask; the
attention then combines it with the document boundaries of ``position_ids``, so even a padded
batch of packed rows cannot leak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from packtune.attention.backends import math_attention, sdpa_attention
from packtune.attention.segments import Segments
from packtune.attention.varlen import CuSeqlens, varlen_attn_func
from packtune.config.settings import ATTN_IMPLEMENTATION

BACKEND_ATTR = "packtune_attn_backend"
#: The keyword that carries a forward's validated ``Boundaries`` to every attention layer.
BOUNDARIES_KWARG = "packtune_boundaries"
#: The model-forward keyword that carries a ``UlyssesContext`` (``packtune.parallel.ulysses``)
#: to the attention of every layer.
SP_KWARG = "packtune_sp"
#: A ``(rows, len)`` factor for each query token, set by a layer's varlen form where the layer
#: scaled its queries from a position over the whole row (Llama 4's NoPE temperature tuning):
#: the ratio of the per-document scale to the one applied.
QUERY_SCALE_KWARG = "packtune_query_scale"

#: Attention keywords that transformers routinely passes and that change nothing packtune must
#: honour: boundaries packtune reads itself, flags it checks, bookkeeping for the model's own code.
#: Any other keyword with a value (``position_bias``, ``indices`` without a mask, ``block_indices``,
#: ...) is refused by name: an attention feature packtune ignored would train wrong in silence.
ROUTINE_KWARGS = frozenset({
    "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
    "output_attentions", "output_hidden_states", "output_router_logits", "num_items_in_batch",
    "use_cache", "cache_position", "past_key_values", "cache", "return_dict", "layer_idx",
    "target_dtype", "deterministic", "logits_to_keep", BOUNDARIES_KWARG, SP_KWARG,
})


@dataclass(frozen=True, eq=False)
class Boundaries:
    """The document boundaries of one forward, validated once: ``CuSeqlens`` of the queries
    and keys of the flattened rows (the same object for self-attention)."""

    q: CuSeqlens
    k: CuSeqlens


def forward_boundaries(cu_q: torch.Tensor, cu_k: torch.Tensor, device: torch.device) -> Boundaries:
    """Validate ``cu_seq_lens_q/k`` once (one host read each) and put them on ``device`` as int32.

    The totals are checked later, per layer, against the tokens the attention holds (host
    integers): a layer may hold another number of tokens than the model's input ids.
    """
    q = CuSeqlens.validate("cu_seq_lens_q", cu_q, device=device)
    k = q if cu_k is cu_q else CuSeqlens.validate("cu_seq_lens_k", cu_k, device=device)
    return Boundaries(q, k)


def _rows_as_documents(rows: int, length: int, device: torch.device) -> CuSeqlens:
    """Every row one document of ``length`` tokens (known on the host: nothing to read back)."""
    host = tuple(range(0, rows * length + 1, length)) if length else (0,) * (rows + 1)
    return CuSeqlens(torch.tensor(host, dtype=torch.int32, device=device), host, length)


def _document_starts(position_ids: torch.Tensor, rows: int) -> torch.Tensor:
    """``(rows, length)`` booleans: where a document starts (a row's start, or a position
    that is not the previous one plus one)."""
    pos = position_ids.expand(rows, -1) if position_ids.shape[0] != rows else position_ids
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    return starts


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, rows: int) -> torch.Tensor:
    """Document starts of ``rows`` flattened rows, from positions that restart.

    >>> cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0]]), rows=1).tolist()
    [0, 3, 5, 6]
    """
    starts = _document_starts(position_ids, rows)
    idx = starts.reshape(-1).nonzero().view(-1)
    total = torch.tensor([starts.numel()], device=idx.device, dtype=idx.dtype)
    return torch.cat([idx, total]).to(torch.int32)


def _document_ids(position_ids: torch.Tensor, rows: int) -> torch.Tensor:
    """``(rows, length)`` index of the document each token belongs to (for dense masks)."""
    return _document_starts(position_ids, rows).long().cumsum(-1)


def _window(sliding_window: int | None, causal: bool) -> tuple[int, int]:
    # transformers' sliding_window counts the query itself: it sees sliding_window - 1 keys back.
    if not sliding_window:
        return (-1, -1)
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


def has_padding(mask) -> bool:
    return mask is not None and not bool(mask.all())


def attach_boundaries(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on the backbone: the document boundaries of the batch, validated once.

    ``cu_seq_lens_q/k`` come from the batch, or from restarting ``position_ids``; they are
    validated here (one host read), moved to the tokens' device as int32 with the longest
    document as ``max_length_q/k``, and handed to every layer as ``Boundaries`` (keyword
    ``packtune_boundaries``): no layer reads them back on the host, so a CUDA forward makes no
    device sync per layer. Done once per forward, it also reaches models whose attention never
    sees ``position_ids`` (GPT-BigCode), where a packed row given by positions alone would
    otherwise be one long document. Decoding with a filled KV cache, and rows with real
    padding, are left alone (the dense-mask path handles them).
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and kwargs.get("position_ids") is None:
        return None
    if kwargs.get(SP_KWARG) is not None:
        return None  # a sequence-parallel shard: its context holds the whole row's documents
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        return None
    if has_padding(kwargs.get("attention_mask")):
        return None
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    rows, length = tokens.shape[:2]
    if cu_q is None:
        pos = kwargs["position_ids"]
        if pos.shape[-1] != length:
            return None
        cu_q = cu_k = cu_seqlens_from_position_ids(pos, rows)
    elif cu_k is None:
        return None  # half a pair: the attention reports it per layer
    bounds = forward_boundaries(cu_q, cu_k, tokens.device)
    kwargs.update(
        cu_seq_lens_q=bounds.q.tensor,
        cu_seq_lens_k=bounds.k.tensor,
        max_length_q=bounds.q.longest,
        max_length_k=bounds.k.longest,
        **{BOUNDARIES_KWARG: bounds},
    )
    return args, kwargs


def _dense(query, key, value, mask, scaling, softcap, dropout, docs, sinks=None, indices=None):
    """Attention with a dense 4-D mask (padded batches, decoding, models whose own code builds
    the mask); ``docs`` ``(rows, len)`` document index of each token (``None``: one per row).

    A boolean mask says which keys each query sees. A float mask is additive (transformers'
    eager convention): ``finfo.min`` or ``-inf`` rules a key out, any other value is a bias
    added to the score (Doge's dynamic mask). ``indices`` ``(rows, tq, k)``: the only keys each
    query may see (a sparse indexer's top-k), intersected with the mask.
    """
    rows, heads, tq, dim = query.shape
    scaling = dim**-0.5 if scaling is None else scaling
    bias = None
    if mask.dtype != torch.bool:
        bias = mask
        mask = (mask > torch.finfo(mask.dtype).min) & (mask != float("-inf"))
        if not bool(bias.masked_fill(~mask, 0).any()):
            bias = None  # a plain 0 / min mask: nothing to add
    if docs is not None:
        mask = mask & (docs.unsqueeze(-1) == docs.unsqueeze(-2)).unsqueeze(1)
    if indices is not None:
        # (rows, tq, k) or (rows, heads, tq, k); a negative index marks an unused slot.
        idx = indices.long() if indices.dim() == 4 else indices.long().unsqueeze(1)
        chosen = torch.zeros(*idx.shape[:-1], key.shape[2], dtype=torch.int32, device=mask.device)
        chosen.scatter_add_(-1, idx.clamp(min=0), (idx >= 0).int())
        mask = mask & (chosen > 0)
    seen = mask.any(-1, keepdim=True)
    mask = mask | ~seen
    if softcap or sinks is not None or bias is not None:
        if bias is not None:
            bias = bias.float().masked_fill(~mask, 0.0).expand(rows, heads, tq, key.shape[2])
        out = math_attention(query, key, value, mask, scaling, softcap or 0.0, dropout, bias, sinks)
    else:
        out = sdpa_attention(query, key, value, mask, scaling, dropout)
    out = out * seen.to(out.dtype)
    return out.transpose(1, 2).contiguous()


def _dense_documents(kwargs: dict, rows: int, tq: int, tk: int, position_ids) -> torch.Tensor | None:
    """``(rows, tq)`` document index of each token for a dense mask: from the forward's validated
    boundaries when the hook set them, else from restarting ``position_ids``; ``None`` when the
    keys are not the queries' tokens (decoding against a cache)."""
    if tq != tk:
        return None
    hooked = kwargs.get(BOUNDARIES_KWARG)
    if isinstance(hooked, Boundaries) and hooked.q.total == rows * tq:
        return Segments.build(hooked.q, rows, tq).seq_idx.long()
    if position_ids is not None and position_ids.shape[-1] == tq:
        return _document_ids(position_ids, rows)
    return None


def _sinks(s_aux, sinks, rows: int, heads: int, tq: int):
    """The attention-sink logits of a call: ``(heads,)`` (``s_aux``, gpt-oss) or per token
    (``sinks`` ``(rows, heads, tq, 1)``), as ``(heads,)`` / ``(rows * tq, heads)`` for
    ``varlen_attn_func`` and as a ``(rows or 1, heads, tq or 1, 1)`` tensor for the dense path."""
    if s_aux is not None and sinks is not None:
        raise NotImplementedError("packtune_varlen got both s_aux and sinks; a layer has one kind of attention sink")
    if s_aux is not None:
        if tuple(s_aux.shape) != (heads,):
            raise NotImplementedError(f"packtune_varlen takes one sink per head (s_aux of shape ({heads},)), got {tuple(s_aux.shape)}")
        return s_aux, s_aux.view(1, heads, 1, 1)
    if sinks is not None:
        if tuple(sinks.shape) != (rows, heads, tq, 1):
            raise NotImplementedError(f"packtune_varlen takes sinks of shape ({rows}, {heads}, {tq}, 1), got {tuple(sinks.shape)}")
        return sinks.squeeze(-1).transpose(1, 2).reshape(rows * tq, heads), sinks
    return None, None


def refuse_unknown_keywords(kwargs: dict) -> None:
    """Raise ``NotImplementedError`` naming every attention keyword packtune would ignore."""
    unknown = sorted(k for k, v in kwargs.items() if k not in ROUTINE_KWARGS and v is not None and v is not False)
    if unknown:
        raise NotImplementedError(
            f"packtune_varlen does not honour the attention keyword(s) {', '.join(unknown)}; "
            "refusing rather than ignoring them. Set use_varlen_attn = False and pack_to_max_length = False"
        )


def _common_dtype(query, key, value):
    """One dtype for q, k, v: autocast's when it is on, else the values' (the model's own).

    Rotary embeddings compute in fp32, so under autocast (or with fp32 norms in a bf16 model)
    q and k can arrive in fp32 beside bf16 values; SDPA and flash kernels need one dtype.
    """
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        target = torch.get_autocast_dtype(device_type)
    else:
        target = value.dtype
    return tuple(t if t.dtype == target else t.to(target) for t in (query, key, value))


def _layer_boundaries(kwargs: dict, rows: int, tq: int, tk: int, position_ids, device: torch.device) -> Boundaries:
    """The boundaries of this layer's ``rows`` flattened rows (see the module docs for the order)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    hooked = kwargs.get(BOUNDARIES_KWARG)
    if isinstance(hooked, Boundaries) and hooked.q.tensor is cu_q and hooked.k.tensor is cu_k:
        bounds = hooked  # validated once for this forward: no host read in the layer
    elif cu_q is not None and cu_k is not None:
        bounds = forward_boundaries(cu_q, cu_k, device)
    elif tq == tk and position_ids is not None and position_ids.shape[-1] == tq:
        cu = cu_seqlens_from_position_ids(position_ids, rows)
        bounds = forward_boundaries(cu, cu, device)
    else:
        if tq != tk and position_ids is not None and position_ids.shape[-1] == tq and tq > 1:
            if bool((position_ids[..., 1:] != position_ids[..., :-1] + 1).any()):
                raise NotImplementedError("packtune_varlen: packed rows cannot be decoded against an earlier KV cache")
        q = _rows_as_documents(rows, tq, device)
        return Boundaries(q, q if tk == tq else _rows_as_documents(rows, tk, device))
    if tq != tk and bounds.k.total != rows * tk:
        raise NotImplementedError("packtune_varlen: packed rows cannot be decoded against an earlier KV cache")
    return bounds


def packtune_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
    packtune_query_scale: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``(rows, heads, len, dim)`` in, ``(rows, len, heads, dim)`` out.

    ``s_aux`` (one sink logit per head, gpt-oss) and ``sinks`` (one per query token and head)
    are attention sinks, exact. ``indices`` (a sparse indexer's top-k keys per query) is honoured
    on the dense-mask path, where the model's own code built the mask. Any other keyword that
    carries a value and is not routine bookkeeping is refused by name (``ROUTINE_KWARGS``).
    """
    if kwargs.get("output_attentions"):
        raise NotImplementedError("packtune_varlen cannot return attention weights; use attn_implementation='eager'")
    refuse_unknown_keywords(kwargs)
    if packtune_query_scale is not None:
        query = query * packtune_query_scale.view(query.shape[0], 1, query.shape[2], 1).to(query.dtype)
    query, key, value = _common_dtype(query, key, value)
    rows, heads, tq, dim = query.shape
    tk = key.shape[2]
    position_ids = kwargs.get("position_ids")
    sp = kwargs.get(SP_KWARG)
    flat_sinks, dense_sinks = _sinks(s_aux, sinks, rows, heads, tq)
    if attention_mask is not None:
        if sp is not None:
            raise NotImplementedError("packtune_varlen: sequence parallelism takes packed rows without an attention mask")
        if attention_mask.dim() != 4:
            raise ValueError(f"packtune_varlen expects a 4-D mask or None, got shape {tuple(attention_mask.shape)}")
        docs = _dense_documents(kwargs, rows, tq, tk, position_ids)
        out = _dense(query, key, value, attention_mask, scaling, softcap, dropout, docs, dense_sinks, indices)
        return out, None
    if indices is not None:
        raise NotImplementedError(
            f"packtune_varlen: {type(module).__name__} passes sparse attention indices without a mask; "
            "its varlen form must hand it the documents' mask (packtune.layers.VARLEN_LAYERS)"
        )
    if is_causal is None and not hasattr(module, "is_causal"):
        raise NotImplementedError(
            f"packtune_varlen: {type(module).__name__} gives no attention mask and no is_causal; "
            "its own code must build the mask (packtune.layers.VARLEN_LAYERS)"
        )
    causal = module.is_causal if is_causal is None else is_causal

    if sp is not None and flat_sinks is not None:
        raise NotImplementedError("packtune_varlen: sequence parallelism cannot run attention sinks yet; set sequence_parallel_size = 1")
    if sp is not None:
        # Sequence parallelism: this rank holds a shard of one row; attention runs over the
        # whole row (the context's validated boundaries) between two all-to-alls.
        attend, bounds = sp.wrap(varlen_attn_func), Boundaries(sp.cu_seqlens, sp.cu_seqlens)
    else:
        attend, bounds = varlen_attn_func, _layer_boundaries(kwargs, rows, tq, tk, position_ids, query.device)
    out = attend(
        query.transpose(1, 2).reshape(rows * tq, heads, dim),
        key.transpose(1, 2).reshape(rows * tk, key.shape[1], dim),
        value.transpose(1, 2).reshape(rows * tk, value.shape[1], value.shape[-1]),
        bounds.q,
        bounds.k,
        bounds.q.longest,
        bounds.k.longest,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=causal,
        window_size=_window(sliding_window, causal),
        softcap=float(softcap or 0.0),
        sinks=flat_sinks,
        backend=getattr(module.config, BACKEND_ATTR, "auto"),
    )
    return out.view(rows, tq, heads, value.shape[-1]), None


def packtune_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function: ``None`` (varlen path) unless something must really be masked.

    A dense boolean mask is built only for a 2-D mask that pads something, or when a KV cache
    holds earlier tokens (decoding), where the keys are not those of the queries' documents.
    """
    no_cache = kv_length == q_length and not (isinstance(q_offset, int) and q_offset > 0)
    if no_cache and (attention_mask is None or (attention_mask.shape[-1] == kv_length and bool(attention_mask.all()))):
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **{**kwargs, "allow_is_causal_skip": False},
    )


def text_config(model: torch.nn.Module):
    """The config of the language part (the model's own config for text-only models)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def register() -> None:
    """Register ``"packtune_varlen"`` with transformers (idempotent; ``import packtune`` does it)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, packtune_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, packtune_mask)


register()
