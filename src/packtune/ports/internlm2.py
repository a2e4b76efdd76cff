"""InternLM2 / 2.5 as llama.

``attention.wqkv`` is interleaved per KV group: viewed as ``[kv_heads, groups + 2, head_dim,
hidden]``, ``[:, :groups]`` are that group's query heads (query head ``kv * groups + g``),
``[:, groups]`` its key and ``[:, groups + 1]`` its value. A contiguous q|k|v split would be
completely wrong. ``feed_forward.w1`` is gate, ``w3`` up, ``w2`` down; ``attention_norm`` and
``ffn_norm`` are the two layer norms; ``tok_embeddings`` and ``output`` the embeddings and head.
``config.bias`` puts biases on ``wqkv`` and ``wo`` (llama's ``attention_bias``).
"""

from __future__ import annotations

import torch

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
)
from packtune.ports.port import Port, common, rope, sizes

LABEL = "InternLM2"
LAYER = "model.layers.{L}."


def _heads(cfg: dict) -> tuple[int, int, int]:
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    return heads, kv, cfg["hidden_size"] // heads


def native_config(cfg: dict):
    from transformers import LlamaConfig

    size = sizes(cfg, LABEL)
    return LlamaConfig(
        **size,
        num_key_value_heads=_heads(cfg)[1],
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        attention_bias=bool(cfg.get("bias", True)),  # configuration_internlm2.py defaults to True
        mlp_bias=False,
        rope_parameters=rope(cfg.get("rope_theta", 10000), cfg.get("rope_scaling"), LABEL),
        **common(cfg),
    )


def layout(cfg: dict) -> Layout:
    heads, kv, d = _heads(cfg)
    groups = heads // kv

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        rest = t.shape[1:]
        w = t.reshape(kv, groups + 2, d, *rest)
        return [w[:, :groups].reshape(heads * d, *rest), w[:, groups].reshape(kv * d, *rest), w[:, groups + 1].reshape(kv * d, *rest)]

    def join(parts) -> torch.Tensor:
        q, k, v = parts
        rest = q.shape[1:]
        w = torch.cat([q.reshape(kv, groups, d, *rest), k.reshape(kv, 1, d, *rest), v.reshape(kv, 1, d, *rest)], dim=1)
        return w.reshape((heads + 2 * kv) * d, *rest)

    renames = [
        ("model.tok_embeddings.weight", LLAMA_EMBED),
        (LAYER + "attention.wo.{P}", LLAMA_O),
        (LAYER + "feed_forward.w1.weight", LLAMA_MLP["gate"]),
        (LAYER + "feed_forward.w3.weight", LLAMA_MLP["up"]),
        (LAYER + "feed_forward.w2.weight", LLAMA_MLP["down"]),
        (LAYER + "attention_norm.weight", LLAMA_NORMS[0]),
        (LAYER + "ffn_norm.weight", LLAMA_NORMS[1]),
        ("model.norm.weight", LLAMA_NORM),
        ("output.weight", LLAMA_HEAD),
    ]
    fused = [Fused(LAYER + "attention.wqkv.{P}", LLAMA_QKV, split, join)]
    return Layout(LABEL, renames, fused, dropped=[LAYER + "attention.rotary_emb.inv_freq"])


PORT = Port("internlm2", LABEL, "llama", native_config, layout)
