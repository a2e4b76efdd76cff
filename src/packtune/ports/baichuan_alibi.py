"""A native class for Baichuan-13B and Baichuan2-13B: ALiBi + RMSNorm + SwiGLU, varlen attention.

No transformers class combines ALiBi with RMSNorm and SwiGLU, so packtune registers this small
one with transformers' Auto classes (``model_type = "baichuan_alibi"``; after ``import packtune``,
see ``packtune.ports.baichuan_alibi_config``). It is built from
transformers' own llama pieces (``LlamaRMSNorm``, ``LlamaMLP``, the decoder-layer shape, the
KV ``Cache``); its names are llama's (``model.layers.N.self_attn.q_proj`` ...).

Attention always goes through ``packtune.varlen_attn_func(..., alibi_slopes=...)``: the ALiBi
bias ``slope * (j - i)`` is per document, so a packed row is exact. Document boundaries come,
first match wins, from ``cu_seq_lens_q/k`` (packtune's batches), from ``position_ids`` that
restart, and from a 2-D ``attention_mask`` (padding becomes documents of its own, so real
tokens never see it). With a KV cache the new queries are the last keys of each document
(flash-attn's bottom-right causal alignment), which is decoding for ``chat``.

Slopes follow Press et al. (ALiBi), including head counts that are not a power of two (40).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from packtune.attention import hf
from packtune.attention.hf import (
    BACKEND_ATTR,
    BOUNDARIES_KWARG,
    _document_starts,
    forward_boundaries,
)
from packtune.attention.varlen import CuSeqlens, varlen_attn_func
from packtune.attention.hf import has_padding
from packtune.ports.baichuan_alibi_config import BaichuanAlibiConfig
from packtune.ports.norm_head import NormHead

@lru_cache(maxsize=None)
def alibi_slopes(heads: int) -> tuple[float, ...]:
    """ALiBi slopes (Press et al.): ``2**(-8 i / n)`` for a power of two ``n``; otherwise those of
    the nearest lower power of two, then every other slope of the next power of two."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return tuple(power_of_two(heads))
    closest = 2 ** math.floor(math.log2(heads))
    return tuple(power_of_two(closest) + list(alibi_slopes(2 * closest)[0::2][: heads - closest]))


@dataclass(frozen=True)
class Boundaries:
    """Documents of one forward pass, validated once (``CuSeqlens``: no host read in any layer)
    and shared by every layer."""

    cu_q: CuSeqlens
    cu_k: CuSeqlens
    max_q: int
    max_k: int

    @classmethod
    def of(cls, validated: hf.Boundaries, max_q: int | None = None, max_k: int | None = None) -> Boundaries:
        """From ``packtune.attention.hf``'s validated boundaries; ``max_q/k`` default to the longest document."""
        return cls(validated.q, validated.k, int(max_q or validated.q.longest), int(max_k or validated.k.longest))


def document_boundaries(
    rows: int, tq: int, past: int, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, device: torch.device
) -> Boundaries:
    """``cu_seqlens`` of queries and keys for ``rows`` rows of ``tq`` new tokens after ``past`` cached ones.

    A key segment starts at each row, where the 2-D mask switches between padding and tokens,
    and (without a cache) where ``position_ids`` restart. The queries of a segment are its
    last ones, so the causal alignment is right per segment.
    """
    tk = past + tq
    starts = torch.zeros(rows, tk, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != (rows, tk):
            raise ValueError(f"BaichuanAlibi takes a 2-D attention_mask of shape ({rows}, {tk}), got {tuple(attention_mask.shape)}")
        mask = attention_mask.to(device=device, dtype=torch.bool)
        starts[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    if past == 0 and position_ids is not None and position_ids.shape[-1] == tq:
        starts |= _document_starts(position_ids.to(device), rows)
    segment = starts.reshape(-1).long().cumsum(0) - 1
    count = int(segment[-1]) + 1
    k_sizes = torch.bincount(segment, minlength=count)
    q_sizes = torch.bincount(segment.view(rows, tk)[:, past:].reshape(-1), minlength=count)
    return Boundaries.of(forward_boundaries(F.pad(q_sizes.cumsum(0), (1, 0)), F.pad(k_sizes.cumsum(0), (1, 0)), device))


class BaichuanAlibiAttention(nn.Module):
    """Multi-head attention with per-document ALiBi through ``varlen_attn_func``."""

    def __init__(self, config: BaichuanAlibiConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, boundaries: Boundaries, cache: Cache | None = None, **kwargs) -> torch.Tensor:
        rows, tq, _ = hidden_states.shape
        shape = (rows, tq, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        if cache is not None:
            k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        tk = k.shape[1]
        slopes = torch.tensor(alibi_slopes(self.num_heads), dtype=torch.float32, device=q.device)
        backend = "eager" if self.config._attn_implementation == "eager" else getattr(self.config, BACKEND_ATTR, "auto")
        out = varlen_attn_func(
            q.reshape(rows * tq, self.num_heads, self.head_dim),
            k.reshape(rows * tk, self.num_heads, self.head_dim),
            v.reshape(rows * tk, self.num_heads, self.head_dim),
            boundaries.cu_q,
            boundaries.cu_k,
            boundaries.max_q,
            boundaries.max_k,
            dropout_p=self.config.attention_dropout if self.training else 0.0,
            causal=True,
            alibi_slopes=slopes,
            backend=backend,
        )
        return self.o_proj(out.reshape(rows, tq, self.num_heads * self.head_dim))


class BaichuanAlibiDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BaichuanAlibiConfig, layer_idx: int):
        super().__init__()
        self.self_attn = BaichuanAlibiAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, boundaries: Boundaries, cache: Cache | None = None, **kwargs) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), boundaries, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BaichuanAlibiPreTrainedModel(PreTrainedModel):
    config_class = BaichuanAlibiConfig
    config: BaichuanAlibiConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanAlibiDecoderLayer"]
    # Attention is always varlen_attn_func (the only exact path for per-document ALiBi); any
    # registered implementation name is accepted, "eager" selects its per-document fp32 backend.
    _supports_attention_backend = True
    _supports_sdpa = True
    # transformers guesses from the module's source whether set_attn_implementation can work;
    # it can here (the name is read at every forward), so answer instead of letting it guess.
    _can_set_attn_implementation_cached_value = True


class BaichuanAlibiModel(BaichuanAlibiPreTrainedModel):
    def __init__(self, config: BaichuanAlibiConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BaichuanAlibiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        rows, tq = hidden.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if cu_seq_lens_q is not None:
            if past:
                raise NotImplementedError("packed rows (cu_seq_lens_q) cannot be decoded against an earlier KV cache")
            cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
            hooked = kwargs.get(BOUNDARIES_KWARG)  # validated once by enable_varlen's boundary hook
            if not (isinstance(hooked, hf.Boundaries) and hooked.q.tensor is cu_seq_lens_q and hooked.k.tensor is cu_k):
                hooked = forward_boundaries(cu_seq_lens_q, cu_k, hidden.device)
            boundaries = Boundaries.of(hooked, max_length_q, max_length_k)
        else:
            mask = attention_mask if has_padding(attention_mask) else None
            boundaries = document_boundaries(rows, tq, past, mask, position_ids, hidden.device)
        for layer in self.layers:
            hidden = layer(hidden, boundaries=boundaries, cache=cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache)


class BaichuanAlibiForCausalLM(BaichuanAlibiPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BaichuanAlibiConfig):
        super().__init__(config)
        self.model = BaichuanAlibiModel(config)
        head = NormHead if config.norm_head else nn.Linear
        self.lm_head = head(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


AutoModelForCausalLM.register(BaichuanAlibiConfig, BaichuanAlibiForCausalLM, exist_ok=True)
