"""Make a transformers model safe for packed rows, and prove it before training starts.

``enable_varlen`` switches a model to the ``"packtune_varlen"`` attention and turns the KV
cache off for training. ``check_no_leak`` then runs one tiny packed row through the model
and compares the second document's logits with those of the same document run alone: any
attention (or other layer) that lets tokens of one sample see another shows up as a
difference, and training is refused (``LeakError``) rather than silently wrong. The check
costs two tiny forward passes (the 12-token packed row, and its 4-token document alone), run
under the autocast of the training step, so that they go through the kernel training uses.
"""

from __future__ import annotations

import contextlib

import torch

from packtune.attention.hf import (
    ATTN_IMPLEMENTATION,
    BACKEND_ATTR,
    BOUNDARIES_KWARG,
    SP_KWARG,
    cu_seqlens_from_position_ids,
    forward_boundaries,
    text_config,
)
from packtune.attention.varlen import BACKENDS


class LeakError(RuntimeError):
    """Tokens of one packed sample influence another: the model does not honour boundaries."""


def model_configs(model: torch.nn.Module) -> list:
    """The model's config and its text config, each once (they are often the same object)."""
    return list({id(c): c for c in (model.config, text_config(model))}.values())


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under PEFT and engine (DDP, DeepSpeed) wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device``, or nothing for fp32 (the training step's context)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _has_padding(mask) -> bool:
    return mask is not None and not bool(mask.all())


def _attach_boundaries(module: torch.nn.Module, args: tuple, kwargs: dict):
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
    if _has_padding(kwargs.get("attention_mask")):
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


def enable_varlen(model: torch.nn.Module, backend: str = "auto") -> torch.nn.Module:
    """Route every attention layer of ``model`` through ``varlen_attn_func``; cache off.

    Also installs ``_attach_boundaries`` on the model's backbone, so a packed row given by
    ``position_ids`` alone is exact on every family. Raises ``ValueError`` when the model
    cannot switch attention implementation (remote code that does not use transformers'
    ``AttentionInterface``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attn_backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        try:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        except (ValueError, AttributeError, KeyError) as exc:
            raise ValueError(
                f"{type(model).__name__} cannot use packtune's varlen attention ({exc}); "
                "set use_varlen_attn = False and pack_to_max_length = False"
            ) from exc
    for cfg in model_configs(model):
        setattr(cfg, BACKEND_ATTR, backend)
        cfg.use_cache = False
    backbone = getattr(model, "base_model", None) or model
    if not getattr(backbone, "_packtune_boundaries", False):
        backbone.register_forward_pre_hook(_attach_boundaries, with_kwargs=True)
        backbone._packtune_boundaries = True
    return model


@torch.no_grad()
def check_no_leak(
    model: torch.nn.Module, lengths: tuple[int, int] = (8, 4), seed: int = 0, dtype: torch.dtype = torch.float32
) -> float:
    """Relative logit difference of a packed document against itself alone; raises on a leak.

    The packed row is given in packtune's batch format (``position_ids`` and
    ``cu_seq_lens_q/k``), the one the training loop uses, under the training step's autocast
    to ``dtype``: with fp32 weights and bf16 autocast, q/k/v reach the attention in bf16, so an
    explicit ``attn_backend`` (``flash_attn``, ``torch``) runs, and ``auto`` resolves to the
    kernel training will use for that dtype on that device.
    """
    cfg = text_config(model)
    first, second = lengths
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    vocab = int(getattr(cfg, "vocab_size", 32000))
    ids = torch.randint(0, vocab, (1, first + second), generator=gen).to(device)
    pos = torch.cat([torch.arange(first), torch.arange(second)]).unsqueeze(0).to(device)
    cu = torch.tensor([0, first, first + second], dtype=torch.int32, device=device)
    was_training = model.training
    model.eval()
    try:
        with autocast_context(device, dtype):
            packed = model(
                input_ids=ids,
                position_ids=pos,
                cu_seq_lens_q=cu,
                cu_seq_lens_k=cu,
                max_length_q=max(lengths),
                max_length_k=max(lengths),
                use_cache=False,
            ).logits[0, first:].float()
            alone = model(input_ids=ids[:, first:], position_ids=pos[:, first:], use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    scale = alone.abs().max().clamp(min=1e-6)
    error = float((packed - alone).abs().max() / scale)
    weights = next(model.parameters()).dtype
    tolerance = 1e-3 if dtype == torch.float32 and weights == torch.float32 else 5e-2
    if not error <= tolerance:
        raise LeakError(
            f"{type(model).__name__}: a packed sample's logits differ from the same sample alone by "
            f"{error:.3g} (relative, tolerance {tolerance:g}); its attention does not honour packing "
            f"boundaries (attn_implementation={getattr(model.config, '_attn_implementation', None)!r}). "
            "Refusing to train on packed rows: set use_varlen_attn = False and pack_to_max_length = False"
        )
    return error
