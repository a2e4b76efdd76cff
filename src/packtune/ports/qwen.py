"""Qwen-1 (Qwen-7B/14B/72B) as qwen2.

``attn.c_attn`` is q, k and v concatenated, with bias; ``attn.c_proj`` has none. **``mlp.w2``
is the gate** (silu is applied to it), ``mlp.w1`` is up, ``mlp.c_proj`` down, and the MLP width
is ``intermediate_size // 2``.

The original's dynamic NTK and logn attention scaling act only at inference, on rows longer
than ``seq_length``; training is exact at any length. packtune does not reproduce them: it
says so once when a model in eval mode (``chat``, evaluation) runs beyond ``seq_length``.
"""

from __future__ import annotations

from packtune.ports.layout import (
    LLAMA_EMBED,
    LLAMA_HEAD,
    LLAMA_MLP,
    LLAMA_NORM,
    LLAMA_NORMS,
    LLAMA_O,
    LLAMA_QKV,
    Fused,
    Layout,
    split_rows,
)
from packtune.ports.port import Port, common, refuse_if, sizes

LABEL = "Qwen-1"
LAYER = "transformer.h.{L}."


def native_config(cfg: dict):
    from transformers import Qwen2Config

    size = sizes(cfg, LABEL)
    heads, hidden = size["num_attention_heads"], size["hidden_size"]
    refuse_if(float(cfg.get("rotary_pct", 1.0)) != 1.0, LABEL, f"rotary_pct = {cfg.get('rotary_pct')}")
    refuse_if(cfg.get("kv_channels", hidden // heads) * heads != hidden, LABEL, "kv_channels * num_attention_heads != hidden_size")
    refuse_if(not cfg.get("no_bias", True), LABEL, "no_bias = false (biases on the output and MLP layers)")
    return Qwen2Config(
        **{**size, "intermediate_size": size["intermediate_size"] // 2},
        num_key_value_heads=heads,
        max_position_embeddings=cfg.get("max_position_embeddings") or cfg.get("seq_length", 8192),
        rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rotary_emb_base", 10000))},
        use_sliding_window=False,
        **common(cfg),
    )


def layout(cfg: dict) -> Layout:
    split, join = split_rows([cfg["hidden_size"]] * 3)
    renames = [
        ("transformer.wte.weight", LLAMA_EMBED),
        (LAYER + "ln_1.weight", LLAMA_NORMS[0]),
        (LAYER + "attn.c_proj.weight", LLAMA_O.replace("{P}", "weight")),
        (LAYER + "ln_2.weight", LLAMA_NORMS[1]),
        (LAYER + "mlp.w2.weight", LLAMA_MLP["gate"]),
        (LAYER + "mlp.w1.weight", LLAMA_MLP["up"]),
        (LAYER + "mlp.c_proj.weight", LLAMA_MLP["down"]),
        ("transformer.ln_f.weight", LLAMA_NORM),
        ("lm_head.weight", LLAMA_HEAD),
    ]
    fused = [Fused(LAYER + "attn.c_attn.{P}", LLAMA_QKV, split, join)]
    return Layout(LABEL, renames, fused, dropped=[LAYER + "attn.rotary_emb.inv_freq", "transformer.rotary_emb.inv_freq"])


def long_context(cfg: dict) -> int | None:
    """Where the original's inference starts to differ: ``seq_length`` when NTK or logn is on."""
    if cfg.get("use_dynamic_ntk", True) or cfg.get("use_logn_attn", True):
        return int(cfg.get("seq_length", 8192))
    return None


PORT = Port("qwen", LABEL, "qwen2", native_config, layout, long_context=long_context)
