"""Baichuan 1/2: 7B (RoPE) as llama, 13B (ALiBi) as packtune's ``baichuan_alibi`` class.

``self_attn.W_pack`` is q, k and v concatenated along dim 0; everything else already has
llama's names. RoPE checkpoints carry ``rotary_emb.inv_freq`` buffers (derived, dropped).
Baichuan2's NormHead stays a normalisation in the forward pass (``NormHead``): the raw rows
are the trained parameter, as in the original.

The versions are told apart from ``config.json`` alone:

* ``BaiChuanForCausalLM`` (capital C) is Baichuan-7B v1;
* the 13B models (ALiBi) have ``model_max_length`` and no ``max_position_embeddings``;
* Baichuan2 (NormHead) configs carry ``z_loss_weight``.

Baichuan2's z-loss is a training-loss term of the original's own ``forward(labels=...)``
(``z_loss_weight``, 0 in the released configs); packtune computes its own loss and adds none.
"""

from __future__ import annotations

from packtune.ports.layout import (
    LLAMA_QKV,
    Fused,
    Layout,
    PortError,
    llama_identity,
    split_rows,
)
from packtune.ports.port import Port, common, sizes

LAYER = "model.layers.{L}."


def _rope_config(label: str):
    def native_config(cfg: dict):
        from transformers import LlamaConfig

        size = sizes(cfg, label, "max_position_embeddings")
        return LlamaConfig(
            **size,
            num_key_value_heads=size["num_attention_heads"],
            max_position_embeddings=cfg["max_position_embeddings"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            attention_bias=False,
            mlp_bias=False,
            # The original's rotary embedding has its base written in the code: 10000.
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **common(cfg),
        )

    return native_config


def _alibi_config(label: str, norm_head: bool):
    def native_config(cfg: dict):
        from packtune.ports.baichuan_alibi import BaichuanAlibiConfig

        return BaichuanAlibiConfig(
            **sizes(cfg, label, "model_max_length"),
            model_max_length=cfg["model_max_length"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            norm_head=norm_head,
            **common(cfg),
        )

    return native_config


def _layout(label: str):
    def layout(cfg: dict) -> Layout:
        split, join = split_rows([cfg["hidden_size"]] * 3)
        fused = [Fused(LAYER + "self_attn.W_pack.weight", tuple(n.replace("{P}", "weight") for n in LLAMA_QKV), split, join)]
        return Layout(label, llama_identity(), fused, dropped=[LAYER + "self_attn.rotary_emb.inv_freq"])

    return layout


BAICHUAN_7B = Port("baichuan_7b", "Baichuan-7B", "llama", _rope_config("Baichuan-7B"), _layout("Baichuan-7B"))
BAICHUAN2_7B = Port("baichuan2_7b", "Baichuan2-7B", "llama", _rope_config("Baichuan2-7B"), _layout("Baichuan2-7B"), norm_head=True)
BAICHUAN_13B = Port("baichuan_13b", "Baichuan-13B", "baichuan_alibi", _alibi_config("Baichuan-13B", False), _layout("Baichuan-13B"))
BAICHUAN2_13B = Port(
    "baichuan2_13b", "Baichuan2-13B", "baichuan_alibi", _alibi_config("Baichuan2-13B", True), _layout("Baichuan2-13B"), norm_head=True
)
PORTS = (BAICHUAN_7B, BAICHUAN2_7B, BAICHUAN_13B, BAICHUAN2_13B)


def select(cfg: dict) -> Port:
    """The Baichuan variant of a ``model_type = "baichuan"`` config, or a one-line refusal."""
    archs = cfg.get("architectures") or []
    alibi = "max_position_embeddings" not in cfg and "model_max_length" in cfg
    rope = "max_position_embeddings" in cfg
    v2 = "z_loss_weight" in cfg
    if "BaiChuanForCausalLM" in archs and rope and not v2:
        return BAICHUAN_7B
    if "BaiChuanForCausalLM" not in archs:
        if alibi:
            return BAICHUAN2_13B if v2 else BAICHUAN_13B
        if rope and v2:
            return BAICHUAN2_7B
    raise PortError(
        f"a baichuan config.json that fits no known Baichuan (architectures={archs}, "
        f"max_position_embeddings {'present' if rope else 'absent'}, model_max_length "
        f"{'present' if 'model_max_length' in cfg else 'absent'}, z_loss_weight {'present' if v2 else 'absent'}); "
        "packtune ports Baichuan-7B, Baichuan-13B, Baichuan2-7B and Baichuan2-13B"
    )
