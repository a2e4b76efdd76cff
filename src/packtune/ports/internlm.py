"""InternLM (v1, InternLM-7B/20B) as llama: the same names, and biases on q, k, v **and** o.

``config.bias`` switches all four attention biases (llama's ``attention_bias`` does the same).
The rotary setting ``rotary = {"base", "type", "scaling_factor"}`` defaults, as in
``configuration_internlm.py``, to base 10000 with dynamic NTK scaling, which acts only on
rows longer than ``max_position_embeddings``; transformers' ``"dynamic"`` rope is the same
formula. Checkpoints carry ``rotary_emb.inv_freq`` buffers: derived, dropped.
"""

from __future__ import annotations

from packtune.ports.layout import LLAMA_QKV, Layout, llama_identity
from packtune.ports.port import Port, common, refuse_if, sizes

LABEL = "InternLM"


def native_config(cfg: dict):
    from transformers import LlamaConfig

    size = sizes(cfg, LABEL)
    rotary = cfg.get("rotary") or {"base": 10000, "type": "dynamic"}
    kind = rotary.get("type", "dynamic")
    refuse_if(kind not in ("origin", "dynamic"), LABEL, f"rotary type {kind!r}")
    rope = {"rope_type": "default", "rope_theta": float(rotary.get("base", 10000))}
    if kind == "dynamic":
        rope.update(rope_type="dynamic", factor=float(rotary.get("scaling_factor", 1.0)))
    return LlamaConfig(
        **size,
        num_key_value_heads=cfg.get("num_key_value_heads") or size["num_attention_heads"],
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        attention_bias=bool(cfg.get("bias", True)),
        mlp_bias=False,
        rope_parameters=rope,
        **common(cfg),
    )


def layout(cfg: dict) -> Layout:
    qkv = [(name, name) for name in LLAMA_QKV]
    return Layout(LABEL, llama_identity() + qkv, dropped=[r"model.layers.{L}.self_attn.rotary_emb.inv_freq"])


PORT = Port("internlm", LABEL, "llama", native_config, layout)
