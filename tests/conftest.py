"""Shared fixtures and helpers for packtune's tests.

* ``tiny_config(model_type, **overrides)``: a tiny, valid, dropout-free transformers config
  for every model family the tests cover (``FAMILIES``).
* ``@pytest.mark.gpu`` tests are skipped on machines without CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch

import packtune  # noqa: F401  (registers the "packtune_varlen" attention)

# Small but valid settings shared by every family: 64 hidden units, 4 heads, 128 tokens.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    attention_dropout=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# Per-family differences. ``sliding_window=4`` everywhere a family has one, so that documents
# longer than four tokens exercise the window.
_FAMILY = {
    "llama": dict(),
    "mistral": dict(sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": dict(head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "gemma": dict(head_dim=16),
    "gemma2": dict(
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=20.0,
        final_logit_softcapping=10.0,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gemma3_text": dict(
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi3": dict(sliding_window=4, resid_pdrop=0.0, embd_pdrop=0.0),
    "starcoder2": dict(sliding_window=4, residual_dropout=0.0, embedding_dropout=0.0),
    "olmo2": dict(),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,  # MLA: v head_dim differs from q/k (24)
        rope_interleave=True,
    ),
    "glm4": dict(head_dim=16),
}

# GPT-BigCode names everything differently.
_GPT_BIGCODE = dict(
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_inner=96,
    n_positions=256,
    vocab_size=128,
    multi_query=True,
    attn_pdrop=0.0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

FAMILIES = (*_FAMILY, "gpt_bigcode")
SLIDING = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "starcoder2")


def tiny_config(model_type: str, **overrides):
    """A fresh tiny config of ``model_type`` (a new object on every call: transformers mutates it)."""
    from transformers import AutoConfig

    if model_type == "gpt_bigcode":
        kwargs = {**_GPT_BIGCODE, **overrides}
    else:
        kwargs = {**_COMMON, **_FAMILY[model_type], **overrides}
    return AutoConfig.for_model(model_type, **copy.deepcopy(kwargs))


def tiny_model(model_type: str, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """A tiny fp32 causal LM with random weights (seeded), on CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)


def same_weights(model, model_type: str, attn_implementation: str, **overrides):
    """A second model of the same family with ``model``'s weights and another attention."""
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_config(
        tiny_config(model_type, **overrides), attn_implementation=attn_implementation, dtype=torch.float32
    )
    other.load_state_dict(model.state_dict())
    return other


@pytest.fixture
def tiny():
    """The ``tiny_config`` helper as a fixture."""
    return tiny_config


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
