"""ChatGLM2-6B and ChatGLM3-6B as transformers' ``GlmForCausalLM``.

* ``query_key_value`` splits as ``[heads * d | groups * d | groups * d]`` (with bias);
  ``multi_query_group_num`` is the KV head count.
* ``dense_h_to_4h`` is already ``[gate; up]`` (GLM's ``gate_up_proj``).
* Rotary acts on the first half of each head, on interleaved pairs ``(2i, 2i + 1)``, with base
  ``10000 * rope_ratio``: GLM's ``partial_rotary_factor = 0.5`` computes exactly that.
* ``apply_query_key_layer_scaling`` has no effect on the result (it scales and unscales).
* ``transformer.rotary_pos_emb.inv_freq`` is derived: dropped.

ChatGLM-6B (v1) is another architecture (2-D positions, prefix attention) and is refused.
"""

from __future__ import annotations

from packtune.ports.layout import (
    LLAMA_EMBED,
    LLAMA_HEAD,
    LLAMA_NORM,
    LLAMA_NORMS,
    LLAMA_QKV,
    Fused,
    Layout,
    PortError,
    split_rows,
)
from packtune.ports.port import Port, common, refuse_if, sizes

LABEL = "ChatGLM2/3"
ORIG = "transformer.encoder.layers.{L}."
NATIVE = "model.layers.{L}."


def _heads(cfg: dict) -> tuple[int, int, int]:
    heads = cfg["num_attention_heads"]
    kv = cfg.get("multi_query_group_num") if cfg.get("multi_query_attention") else heads
    return heads, kv or heads, cfg.get("kv_channels") or cfg["hidden_size"] // heads


def check_version(cfg: dict) -> None:
    """Refuse ChatGLM-6B (v1), whose config also says ``model_type = "chatglm"``."""
    if cfg.get("position_encoding_2d") is not None or "padded_vocab_size" not in cfg:
        raise PortError(
            "ChatGLM-6B (v1) is not supported: it uses 2-D position encoding and prefix (GLM blank-infilling) "
            "attention, a different architecture; ChatGLM2-6B and ChatGLM3-6B are"
        )


def native_config(cfg: dict):
    from transformers import GlmConfig

    check_version(cfg)
    size = sizes(cfg, LABEL, vocab_size="padded_vocab_size", intermediate_size="ffn_hidden_size", num_hidden_layers="num_layers")
    refuse_if(not cfg.get("rmsnorm", True), LABEL, "LayerNorm (rmsnorm = false)")
    refuse_if(cfg.get("apply_residual_connection_post_layernorm", False), LABEL, "apply_residual_connection_post_layernorm")
    refuse_if(not cfg.get("post_layer_norm", True), LABEL, "post_layer_norm = false")
    refuse_if(cfg.get("add_bias_linear", False), LABEL, "add_bias_linear")
    refuse_if(not cfg.get("original_rope", True), LABEL, "original_rope = false")
    refuse_if(bool(cfg.get("quantization_bit")), LABEL, f"quantization_bit = {cfg.get('quantization_bit')} (quantized weights)")
    refuse_if(cfg.get("pre_seq_len") is not None, LABEL, "pre_seq_len (P-tuning prefix)")
    _, kv, d = _heads(cfg)
    kwargs = common(cfg)
    kwargs.setdefault("eos_token_id", 2)
    kwargs.setdefault("pad_token_id", 0)
    kwargs["hidden_act"] = "silu"
    return GlmConfig(
        **size,
        num_key_value_heads=kv,
        head_dim=d,
        max_position_embeddings=cfg.get("seq_length", 8192),
        rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
        attention_bias=bool(cfg.get("add_qkv_bias", False)),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * float(cfg.get("rope_ratio", 1)), "partial_rotary_factor": 0.5},
        **kwargs,
    )


def layout(cfg: dict) -> Layout:
    heads, kv, d = _heads(cfg)
    split, join = split_rows([heads * d, kv * d, kv * d])
    renames = [
        ("transformer.embedding.word_embeddings.weight", LLAMA_EMBED),
        (ORIG + "input_layernorm.weight", LLAMA_NORMS[0]),
        (ORIG + "self_attention.dense.weight", NATIVE + "self_attn.o_proj.weight"),
        (ORIG + "post_attention_layernorm.weight", LLAMA_NORMS[1]),
        (ORIG + "mlp.dense_h_to_4h.weight", NATIVE + "mlp.gate_up_proj.weight"),
        (ORIG + "mlp.dense_4h_to_h.weight", NATIVE + "mlp.down_proj.weight"),
        ("transformer.encoder.final_layernorm.weight", LLAMA_NORM),
        ("transformer.output_layer.weight", LLAMA_HEAD),
    ]
    fused = [Fused(ORIG + "self_attention.query_key_value.{P}", LLAMA_QKV, split, join)]
    return Layout(LABEL, renames, fused, dropped=["transformer.rotary_pos_emb.inv_freq"])


PORT = Port("chatglm", LABEL, "glm", native_config, layout)
