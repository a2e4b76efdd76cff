"""Tiny checkpoints in the ORIGINAL layouts of the ported families, and a plain-torch reference.

Each family is described by facts about the published architecture (config keys, tensor
names, fused shapes, rotary and ALiBi conventions), not by packtune's or transformers' model
code. ``write_checkpoint`` writes ``config.json`` with the original keys, ``model_type``,
``architectures`` and ``auto_map``, tensors with the original names and fused shapes (with
the derived ``inv_freq`` buffers some originals carry), a stand-in ``.py`` file that must never
be imported, and a tokenizer file that must be copied. ``reference_logits(family, cfg, state,
ids)`` runs ONE document through the original architecture, computed from the original
tensors: fused projections are applied to activations and split there, as the original code
does, so the test does not repeat packtune's weight-splitting.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

VOCAB = 96


def _llama_like(**extra) -> dict:
    base = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB,
                rms_norm_eps=1e-6, hidden_act="silu", pad_token_id=0, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False, initializer_range=0.02, torch_dtype="float32", use_cache=True)
    base.update(extra)
    return base


# family -> (config.json, weight format, shard?)
CONFIGS = {
    "internlm": (_llama_like(
        architectures=["InternLMForCausalLM"], model_type="internlm", bias=True, max_position_embeddings=64,
        auto_map={"AutoConfig": "configuration_internlm.InternLMConfig",
                  "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"}), "bin", False),
    "internlm2": (_llama_like(
        architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False, num_key_value_heads=2,
        max_position_embeddings=64, rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 2.0},
        attn_implementation="eager",
        auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                  "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}), "safetensors", True),
    "baichuan-7b": (_llama_like(
        architectures=["BaiChuanForCausalLM"], model_type="baichuan", max_position_embeddings=64,
        auto_map={"AutoConfig": "configuration_baichuan.BaiChuanConfig",
                  "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM"}), "bin", False),
    "baichuan2-7b": (_llama_like(
        architectures=["BaichuanForCausalLM"], model_type="baichuan", max_position_embeddings=64, model_max_length=64,
        z_loss_weight=0,
        auto_map={"AutoConfig": "configuration_baichuan.BaichuanConfig",
                  "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}), "safetensors", False),
    "baichuan2-13b": (_llama_like(
        architectures=["BaichuanForCausalLM"], model_type="baichuan", hidden_size=48, num_attention_heads=6,
        model_max_length=64, z_loss_weight=0,
        auto_map={"AutoConfig": "configuration_baichuan.BaichuanConfig",
                  "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}), "bin", True),
    "chatglm3": (dict(
        architectures=["ChatGLMModel"], model_type="chatglm", num_layers=2, padded_vocab_size=VOCAB, hidden_size=32,
        ffn_hidden_size=48, kv_channels=8, num_attention_heads=4, seq_length=64, hidden_dropout=0.0,
        attention_dropout=0.0, layernorm_epsilon=1e-5, rmsnorm=True, apply_residual_connection_post_layernorm=False,
        post_layer_norm=True, add_bias_linear=False, add_qkv_bias=True, bias_dropout_fusion=True,
        multi_query_attention=True, multi_query_group_num=2, apply_query_key_layer_scaling=True,
        attention_softmax_in_fp32=True, fp32_residual_connection=False, original_rope=True, rope_ratio=2,
        pad_token_id=0, eos_token_id=2, tie_word_embeddings=False, torch_dtype="float32", use_cache=True,
        auto_map={"AutoConfig": "configuration_chatglm.ChatGLMConfig", "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                  "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}), "safetensors", False),
    "qwen": (dict(
        architectures=["QWenLMHeadModel"], model_type="qwen", hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
        intermediate_size=96, kv_channels=8, vocab_size=VOCAB, emb_dropout_prob=0.0, attn_dropout_prob=0.0,
        layer_norm_epsilon=1e-6, initializer_range=0.02, max_position_embeddings=64, seq_length=24,
        scale_attn_weights=True, use_cache=True, rotary_pct=1.0, rotary_emb_base=10000, use_dynamic_ntk=True,
        use_logn_attn=True, use_flash_attn="auto", no_bias=True, tie_word_embeddings=False, bf16=False, fp16=False,
        fp32=False, torch_dtype="float32",
        auto_map={"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}),
        "safetensors", False),
}
FAMILIES = tuple(CONFIGS)


def original_tensors(family: str, cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the original names and fused shapes (norm weights near 1)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = _shapes(family, cfg)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen) * 0.1
        if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t = 1.0 + t
        out[name] = t
    if family in ("internlm", "baichuan-7b"):  # these originals keep the rotary buffer in the checkpoint
        d = cfg["hidden_size"] // cfg["num_attention_heads"]
        for i in range(cfg["num_hidden_layers"]):
            out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    if family == "chatglm3":
        out["transformer.rotary_pos_emb.inv_freq"] = torch.ones(cfg["kv_channels"] // 4)
    return out


def _shapes(family: str, cfg: dict) -> dict[str, tuple]:
    h, layers = cfg["hidden_size"], cfg.get("num_hidden_layers", cfg.get("num_layers"))
    heads = cfg["num_attention_heads"]
    d = h // heads
    s: dict[str, tuple] = {}
    if family == "chatglm3":
        kv, d, ff, v = cfg["multi_query_group_num"], cfg["kv_channels"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
        s["transformer.embedding.word_embeddings.weight"] = (v, h)
        for i in range(layers):
            p = f"transformer.encoder.layers.{i}."
            s[p + "input_layernorm.weight"] = (h,)
            s[p + "self_attention.query_key_value.weight"] = ((heads + 2 * kv) * d, h)
            s[p + "self_attention.query_key_value.bias"] = ((heads + 2 * kv) * d,)
            s[p + "self_attention.dense.weight"] = (h, heads * d)
            s[p + "post_attention_layernorm.weight"] = (h,)
            s[p + "mlp.dense_h_to_4h.weight"] = (2 * ff, h)
            s[p + "mlp.dense_4h_to_h.weight"] = (h, ff)
        s["transformer.encoder.final_layernorm.weight"] = (h,)
        s["transformer.output_layer.weight"] = (v, h)
        return s
    if family == "qwen":
        ff = cfg["intermediate_size"] // 2
        s["transformer.wte.weight"] = (cfg["vocab_size"], h)
        for i in range(layers):
            p = f"transformer.h.{i}."
            s[p + "ln_1.weight"] = (h,)
            s[p + "attn.c_attn.weight"] = (3 * h, h)
            s[p + "attn.c_attn.bias"] = (3 * h,)
            s[p + "attn.c_proj.weight"] = (h, h)
            s[p + "ln_2.weight"] = (h,)
            s[p + "mlp.w1.weight"] = (ff, h)
            s[p + "mlp.w2.weight"] = (ff, h)
            s[p + "mlp.c_proj.weight"] = (h, ff)
        s["transformer.ln_f.weight"] = (h,)
        s["lm_head.weight"] = (cfg["vocab_size"], h)
        return s
    ff, v = cfg["intermediate_size"], cfg["vocab_size"]
    if family == "internlm2":
        kv = cfg["num_key_value_heads"]
        s["model.tok_embeddings.weight"] = (v, h)
        for i in range(layers):
            p = f"model.layers.{i}."
            s[p + "attention.wqkv.weight"] = ((heads + 2 * kv) * d, h)
            s[p + "attention.wo.weight"] = (h, heads * d)
            s[p + "feed_forward.w1.weight"] = (ff, h)
            s[p + "feed_forward.w3.weight"] = (ff, h)
            s[p + "feed_forward.w2.weight"] = (h, ff)
            s[p + "attention_norm.weight"] = (h,)
            s[p + "ffn_norm.weight"] = (h,)
        s["model.norm.weight"] = (h,)
        s["output.weight"] = (v, h)
        return s
    s["model.embed_tokens.weight"] = (v, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        if family == "internlm":
            for x in "qkvo":
                s[p + f"self_attn.{x}_proj.weight"] = (h, h)
                s[p + f"self_attn.{x}_proj.bias"] = (h,)
        else:  # baichuan
            s[p + "self_attn.W_pack.weight"] = (3 * h, h)
            s[p + "self_attn.o_proj.weight"] = (h, h)
        s[p + "mlp.gate_proj.weight"] = (ff, h)
        s[p + "mlp.up_proj.weight"] = (ff, h)
        s[p + "mlp.down_proj.weight"] = (h, ff)
        s[p + "input_layernorm.weight"] = (h,)
        s[p + "post_attention_layernorm.weight"] = (h,)
    s["model.norm.weight"] = (h,)
    s["lm_head.weight"] = (v, h)
    return s


def write_checkpoint(folder, family: str, seed: int = 0, **overrides) -> tuple[dict, dict[str, torch.Tensor]]:
    """Write a tiny original-layout checkpoint of ``family`` (config keys ``overrides``
    changed); returns ``(config, tensors)``."""
    from safetensors.torch import save_file

    cfg, fmt, sharded = CONFIGS[family]
    cfg = {**json.loads(json.dumps(cfg)), **overrides}
    state = original_tensors(family, cfg, seed)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    names = sorted(state)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]] if sharded else [names]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" if sharded else f"{stem}.{ext}"
        tensors = {n: state[n].clone() for n in part}
        if fmt == "safetensors":
            save_file(tensors, os.path.join(folder, fname), metadata={"format": "pt"})
        else:
            torch.save(tensors, os.path.join(folder, fname))
        weight_map.update({n: fname for n in part})
    if sharded:
        with open(os.path.join(folder, f"{stem}.{ext}.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    # The checkpoint's own code: importing it would fail the test loudly.
    module = cfg["auto_map"]["AutoModelForCausalLM"].split(".")[0]
    with open(os.path.join(folder, f"{module}.py"), "w") as f:
        f.write("raise RuntimeError('packtune must never import a checkpoint .py file')\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64, "stand_in": family}, f)
    return cfg, state


def write_hub_cache(cache, repo_id: str, family: str) -> str:
    """``family``'s tiny original-layout checkpoint as hub repo ``repo_id`` in the Hugging Face
    cache folder ``cache``, laid out as ``huggingface_hub`` finds a download offline
    (``models--ORG--NAME/snapshots/COMMIT`` and ``refs/main``); returns the snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(str(cache), "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    write_checkpoint(snapshot, family)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


# ---------------------------------------------------------------- reference forward pass


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_halves(x, pos, base):
    """GPT-NeoX/llama rotary: dimension i pairs with i + d/2."""
    d = x.shape[-1]
    freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None].float() * freq[None]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]  # (T, 1, d/2)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def rotate_pairs_first_half(x, pos, base):
    """ChatGLM2/3 rotary: only the first half of each head, on pairs (2i, 2i+1)."""
    d = x.shape[-1]
    rot = d // 2
    freq = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    ang = pos[:, None].float() * freq[None]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    even, odd = x[..., 0:rot:2], x[..., 1:rot:2]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., rot:]], dim=-1)


def press_slopes(n: int) -> torch.Tensor:
    """ALiBi slopes written from Press et al.: 2^(-8k/n) for a power of two; otherwise the
    slopes of the closest lower power of two c, then 2^(-4(2m+1)/c), m = 0, 1, ..."""
    c = 2 ** int(math.floor(math.log2(n)))
    slopes = [2 ** (-8 * (k + 1) / c) for k in range(c)]
    slopes += [2 ** (-4 * (2 * m + 1) / c) for m in range(n - c)]
    return torch.tensor(slopes)


def attend(q, k, v, bias=None):
    """q (T, heads, d); k, v (T, kv, d); query head h reads kv head h // (heads / kv); causal."""
    t, heads, d = q.shape
    groups = heads // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).reshape(t, heads * d)


def swiglu(x, gate_w, up_w, down_w):
    return (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ down_w.T


def reference_logits(family: str, cfg: dict, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Logits (T, vocab) of one document ``ids`` (T,) through the original architecture."""
    t = ids.shape[0]
    pos = torch.arange(t)
    heads, h = cfg["num_attention_heads"], cfg["hidden_size"]
    if family == "chatglm3":
        kv, d = cfg["multi_query_group_num"], cfg["kv_channels"]
        eps, base = cfg["layernorm_epsilon"], 10000 * cfg["rope_ratio"]
        x = w["transformer.embedding.word_embeddings.weight"][ids]
        for i in range(cfg["num_layers"]):
            p = f"transformer.encoder.layers.{i}."
            y = rms(x, w[p + "input_layernorm.weight"], eps)
            mixed = y @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
            q, k, v = mixed.split([heads * d, kv * d, kv * d], dim=-1)
            q = rotate_pairs_first_half(q.view(t, heads, d), pos, base)
            k = rotate_pairs_first_half(k.view(t, kv, d), pos, base)
            x = x + attend(q, k, v.view(t, kv, d)) @ w[p + "self_attention.dense.weight"].T
            y = rms(x, w[p + "post_attention_layernorm.weight"], eps)
            gate, up = (y @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
        return rms(x, w["transformer.encoder.final_layernorm.weight"], eps) @ w["transformer.output_layer.weight"].T
    if family == "qwen":
        d, eps = h // heads, cfg["layer_norm_epsilon"]
        x = w["transformer.wte.weight"][ids]
        for i in range(cfg["num_hidden_layers"]):
            p = f"transformer.h.{i}."
            y = rms(x, w[p + "ln_1.weight"], eps)
            q, k, v = (y @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]).split(h, dim=-1)
            q = rotate_halves(q.view(t, heads, d), pos, cfg["rotary_emb_base"])
            k = rotate_halves(k.view(t, heads, d), pos, cfg["rotary_emb_base"])
            x = x + attend(q, k, v.view(t, heads, d)) @ w[p + "attn.c_proj.weight"].T
            y = rms(x, w[p + "ln_2.weight"], eps)
            a1, a2 = y @ w[p + "mlp.w1.weight"].T, y @ w[p + "mlp.w2.weight"].T
            x = x + (a1 * F.silu(a2)) @ w[p + "mlp.c_proj.weight"].T  # silu on w2: w2 is the gate
        return rms(x, w["transformer.ln_f.weight"], eps) @ w["lm_head.weight"].T
    d, eps = h // heads, cfg["rms_norm_eps"]
    if family == "internlm2":
        kv = cfg["num_key_value_heads"]
        groups = heads // kv
        x = w["model.tok_embeddings.weight"][ids]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            y = rms(x, w[p + "attention_norm.weight"], eps)
            # The original: qkv viewed as (T, kv heads, groups + 2, d): queries, then key, then value.
            qkv = (y @ w[p + "attention.wqkv.weight"].T).view(t, kv, groups + 2, d)
            q = qkv[:, :, :groups].reshape(t, heads, d)
            k, v = qkv[:, :, groups], qkv[:, :, groups + 1]
            q, k = rotate_halves(q, pos, cfg["rope_theta"]), rotate_halves(k, pos, cfg["rope_theta"])
            x = x + attend(q, k, v) @ w[p + "attention.wo.weight"].T
            y = rms(x, w[p + "ffn_norm.weight"], eps)
            x = x + swiglu(y, w[p + "feed_forward.w1.weight"], w[p + "feed_forward.w3.weight"], w[p + "feed_forward.w2.weight"])
        return rms(x, w["model.norm.weight"], eps) @ w["output.weight"].T
    x = w["model.embed_tokens.weight"][ids]
    alibi = "max_position_embeddings" not in cfg
    if alibi:
        slopes = press_slopes(heads)
        rel = (pos[None, :] - pos[:, None]).float()  # j - i
        bias = slopes[:, None, None] * rel[None]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        y = rms(x, w[p + "input_layernorm.weight"], eps)
        if family == "internlm":
            q, k, v = (y @ w[p + f"self_attn.{n}_proj.weight"].T + w[p + f"self_attn.{n}_proj.bias"] for n in "qkv")
        else:
            q, k, v = (y @ w[p + "self_attn.W_pack.weight"].T).split(h, dim=-1)
        q, k, v = q.view(t, heads, d), k.view(t, heads, d), v.view(t, heads, d)
        if not alibi:
            q, k = rotate_halves(q, pos, 10000), rotate_halves(k, pos, 10000)
        out = attend(q, k, v, bias if alibi else None) @ w[p + "self_attn.o_proj.weight"].T
        if family == "internlm":
            out = out + w[p + "self_attn.o_proj.bias"]
        x = x + out
        y = rms(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + swiglu(y, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
    head = w["lm_head.weight"]
    if "z_loss_weight" in cfg:  # Baichuan2's NormHead: the effective head is the normalised raw rows
        head = head / head.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return rms(x, w["model.norm.weight"], eps) @ head.T
