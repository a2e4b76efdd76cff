"""Every text causal LM of the installed transformers, built tiny, run packed and alone.

``TEXT_TYPES``: the model types of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` that are text causal LMs
(a multimodal type counts once, through its text model; ``NOT_TEXT`` lists the rest, each with
why). ``tiny_model_of(type)`` builds one tiny and random (hidden 64, one layer of each layer kind,
no dropout, fp32, small windows, chunks and kernels); ``outcome(type)`` runs one packed row
through ``enable_varlen`` and ``check_no_leak`` against each document alone under the model's
default attention and says ``exact`` or ``refused`` (with the refusal's words). Run as a script,
it prints the outcome of every type.
"""

from __future__ import annotations

import copy
import functools
import sys

import torch
import torch.nn.functional as F
from helpers import randomize_constant_parameters

from packtune.modeling import GRAD_TOLERANCE as _GRAD_TOLERANCE, TOLERANCE as _TOLERANCE

#: Model types of the causal-LM mapping that are not text causal LMs, each with why.
NOT_TEXT: dict[str, str] = {
    **dict.fromkeys(
        ("bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
         "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm", "xlm-roberta",
         "xlm-roberta-xl", "xmod"),
        "a bidirectional encoder that can be configured as a decoder, not a causal LM",
    ),
    "xlnet": "permutation language model (two-stream attention), not a causal LM",
    "reformer": "LSH / local attention over fixed chunks of the row, with its own axial position encoding",
    **dict.fromkeys(("musicgen", "musicgen_melody"), "decodes audio codebooks, not text"),
    "moshi": "a speech-text model whose causal LM reads audio codebooks beside text",
    "trocr": "a text decoder with cross-attention to an image encoder",
    "git": "a text decoder over image features (its causal LM needs pixel values for its layout)",
    "phi4_multimodal": "its causal LM holds the vision and audio encoders; there is no text-only class",
    "blt": "byte-level and hierarchical: an entropy model cuts the whole row into patches that a global "
           "transformer reads, so patches span documents; not a per-token causal LM",
    "gemma4_assistant": "a draft model for Gemma 4's speculative decoding, built from the main model",
    "gemma4_unified_assistant": "a draft model for Gemma 4's speculative decoding, built from the main model",
}

#: Documents of the packed row: a long first one (longer than every window, chunk and kernel set
#: below, and than the 64-token chunk of transformers' torch scans), so the others start far in.
LENGTHS = (80, 17, 5, 30, 9)
#: Small windows and chunks, so that the documents above cross them.
WINDOW, CHUNK = 8, 16
#: A tiny model has fewer parameters than this.
MAX_PARAMETERS = 8_000_000


def _mapping() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@functools.lru_cache(maxsize=None)
def _default_config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type)


def _text_type(model_type: str) -> str:
    cfg = _default_config(model_type)
    return cfg.get_text_config().model_type


def text_types() -> list[str]:
    """The text causal LMs of the installed transformers: the causal-LM mapping less ``NOT_TEXT``,
    encoder-decoder models, and multimodal types whose text model is a type of its own."""
    mapping = _mapping()
    out = []
    for model_type in sorted(mapping):
        if model_type in NOT_TEXT or getattr(_default_config(model_type), "is_encoder_decoder", False):
            continue
        text = _text_type(model_type)
        if text != model_type and text in mapping:
            continue  # gemma3 -> gemma3_text, llama4 -> llama4_text, fuyu -> persimmon, ...
        out.append(model_type)
    return out


# ----------------------------------------------------------------------------- tiny configs

#: Every setting of this name that the default text config has is set to this value.
_SIZES = {
    "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2,
    # mixtures of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_topk": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "n_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "expert_intermediate_size": 32,
    # multi-head latent attention
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    # windows, chunks, sparse blocks
    # (index_n_heads stays the model's own: with few indexer heads a ReLU'd score is often exactly 0,
    # and the indexer's top-k over such ties breaks them by slot in the row, alone or packed.)
    "sliding_window": WINDOW, "attention_chunk_size": CHUNK, "index_topk": CHUNK, "index_head_dim": 16,
    "keep_window_size": WINDOW,
    # linear attention, convolutions, state-space layers
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "linear_num_heads": 4, "linear_head_dim": 16,
    "linear_conv_kernel_dim": 4, "conv_L_cache": 3, "mamba_d_conv": 4, "conv_kernel": 4, "mamba_d_state": 16,
    "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_n_groups": 1, "mamba_expand": 2, "mamba_chunk_size": CHUNK,
    "ssm_state_size": 16, "state_size": 16, "n_groups": 1, "chunk_size": CHUNK, "time_step_rank": 8,
    "rotary_dim": 8, "window_size": WINDOW, "mamba_d_ssm": 128, "intermediate_size_mlp": 96,
    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16,
}

#: Per type: settings the generic ones above do not reach (layer patterns that are not a
#: ``layer_types`` list, sizes that must agree with each other).
_OVERRIDES: dict[str, dict] = {
    "cohere_compass_text": dict(rope_parameters={"full_attention": dict(rope_type="default", rope_theta=10000.0)}),
    # (clip_qkv=None crashes transformers' DBRX attention: clamp with neither bound.)
    "dbrx": dict(
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=96, moe_num_experts=4, moe_top_k=2, hidden_size=64),
    ),
    # MLA with its sliding layers' head_dim = qk_nope + qk_rope; no per-layer head counts.
    "dots3_note_text": dict(num_key_value_heads=4, head_dim=24, per_layer_config={}),
    # The four layers picked (sliding / full, with and without activation sparsity): the last two
    # share the first two's keys and values.
    "gemma3n_text": dict(num_kv_shared_layers=2, intermediate_size=[96] * 4),
    **dict.fromkeys(
        ("inkling2_text", "inkling2_loop_text"),
        dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16, unpadded_vocab_size=128,
             sliding_window_size=WINDOW),
    ),
    # A sliding layer, an indexer layer (pool of 4-key blocks, top-k, sinks, local keys) and one
    # reading its keys, values and pool.
    "kolibri1_1": dict(
        num_hidden_layers=3, layer_types=["sliding_attention", "indexed_attention", "indexed_attention"],
        kv_source_layers=[0, 1, 1], index_layers=[1], mlp_only_layers=[0], mlp_only_intermediate_size=96,
        index_num_heads=2, index_pool_size=32, index_compression=4, index_num_local_tokens=8, index_num_sink_tokens=2,
    ),
    "lfm2": dict(layer_types=["conv", "full_attention"], num_hidden_layers=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_hidden_layers=2, num_dense_layers=1),
    "mamba2": dict(num_heads=4, head_dim=32),
    # Its QSA indexer (sparse attention over 4-token blocks) is off unless every setting is given.
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=CHUNK,
                           indexer_compress_ratio=4, hc_lowrank=16, ple_embed_dim=64),
    # Two hybrid layers: the second's shared transformer block is tied to the first's.
    "zamba": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"],
                  attention_hidden_size=128, attention_head_dim=32, mamba_dt_rank=8),
    "zaya": dict(num_experts_per_tok=1),
}


def _per_layer_lists(cfg, layers: int) -> dict[str, list]:
    return {k: v for k, v in vars(cfg).items() if isinstance(v, list) and len(v) == layers and layers > 1}


def tiny_config(model_type: str):
    """A tiny config of ``model_type``'s text model: one layer of each kind (each distinct
    combination of the per-layer settings), small sizes, no dropout."""
    default = _default_config(model_type).get_text_config()
    aliases = getattr(type(default), "attribute_map", {}) or {}
    kwargs = {aliases.get(k, k): v for k, v in _SIZES.items() if aliases.get(k, k) in vars(default)}
    for key, value in vars(default).items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            kwargs[key] = 0.0
    layers = getattr(default, "num_hidden_layers", None)
    if isinstance(layers, int):
        lists = _per_layer_lists(default, layers)
        picked, seen = [], set()
        for i in range(layers):
            signature = tuple(repr(v[i]) for v in lists.values())
            if signature not in seen:
                seen.add(signature)
                picked.append(i)
        if len(picked) < 2:
            picked = list(range(min(2, layers)))
        kwargs["num_hidden_layers"] = len(picked)
        for key, values in lists.items():
            kwargs[key] = [values[i] for i in picked]
    if isinstance(getattr(default, "rope_parameters", None), dict):
        kwargs["rope_parameters"] = copy.deepcopy(default.rope_parameters)  # keyed by layer type in some
    if "qk_rope_head_dim" in kwargs and "head_dim" in kwargs:
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]  # MLA: rotary embeddings span the rope part only
    if "kv_lora_rank" in kwargs and "num_key_value_heads" in kwargs:
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]  # MLA: one key per query head
    kwargs.update(_OVERRIDES.get(model_type, {}))
    return type(default)(**kwargs)


def tiny_model_of(model_type: str, seed: int = 0) -> torch.nn.Module:
    """``model_type``'s causal LM (its text model for multimodal types), tiny, random, fp32, CPU;
    parameters that initialise to one constant are randomised around it."""
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)

    def build():
        if cfg.model_type in _mapping():
            return AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.float32)
        # a text config without a type of its own in the mapping (emu3, mllama)
        return getattr(transformers, _mapping()[model_type])(copy.deepcopy(cfg)).to(torch.float32)

    with torch.device("meta"):
        size = sum(p.numel() for p in build().parameters())
    if size > MAX_PARAMETERS:
        raise AssertionError(f"{model_type}: the tiny config builds {size:,} parameters; shrink it in _OVERRIDES")
    torch.manual_seed(seed)
    model = build()
    randomize_constant_parameters(model)
    return model


# ----------------------------------------------------------------------------- packed vs alone


def _docs(vocab: int, seed: int = 0):
    """Documents of ``LENGTHS`` (distinct tokens within each, none special: ``leak_check_ids``'s
    reasons) and their targets."""
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randperm(vocab - 3, generator=gen)[:n] + 3 for n in LENGTHS]
    targets = [torch.randint(0, vocab, (n,), generator=gen) for n in LENGTHS]
    return ids, targets


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def packed_errors(model, reference) -> tuple[float, float, str | None]:
    """The packed row through ``model`` against each document alone through ``reference``: largest
    relative logit error (over the document's largest logit) and gradient error (per parameter,
    over its largest gradient entry), and the parameter where the latter is largest."""
    vocab = model.config.get_text_config().vocab_size
    ids, targets = _docs(vocab)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    model.eval()
    reference.eval()
    logits = model(
        input_ids=torch.cat(ids).unsqueeze(0), position_ids=torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0),
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS), use_cache=False,
    ).logits[0].float()
    bounds = list(zip(cu.tolist(), cu.tolist()[1:]))
    sum(F.cross_entropy(logits[a:b], t, reduction="sum") for (a, b), t in zip(bounds, targets)).backward()
    logit_error = 0.0
    for doc, (a, b), t in zip(ids, bounds, targets):
        alone = reference(input_ids=doc.unsqueeze(0), position_ids=torch.arange(len(doc)).unsqueeze(0),
                          use_cache=False).logits[0].float()
        F.cross_entropy(alone, t, reduction="sum").backward()
        alone = alone.detach()
        logit_error = max(logit_error, float((logits[a:b].detach() - alone).abs().max() / alone.abs().max()))
    packed, single = _grads(model), _grads(reference)
    grad_error, worst = 0.0, None
    # A parameter whose gradient is zero in exact arithmetic (a key bias under softmax) holds only
    # rounding noise: gradients are compared relative to at least 1e-3 of the model's largest.
    floor = 1e-3 * max((float(g.abs().max()) for g in single.values() if g is not None), default=1.0)
    for name, mine in packed.items():
        theirs = single[name]
        if mine is None and theirs is None:
            continue
        mine = torch.zeros_like(theirs) if mine is None else mine
        theirs = torch.zeros_like(mine) if theirs is None else theirs
        error = float((mine - theirs).abs().max()) / max(float(theirs.abs().max()), floor)
        if error > grad_error:
            grad_error, worst = error, name
    return logit_error, grad_error, worst


#: What refusing in words may raise (a ``StatefulLayerError`` and a ``LeakError`` included).
def refusals() -> tuple[type[BaseException], ...]:
    from packtune.modeling import LeakError

    return (ValueError, NotImplementedError, LeakError)


def outcome(model_type: str) -> tuple[str, str]:
    """``("exact", errors)``, ``("refused", message)`` or ``("wrong", errors)`` for ``model_type``.

    Anything else a model raises (a ``TypeError`` from inside it) propagates.
    """
    from packtune.modeling import check_no_leak, enable_varlen

    model = tiny_model_of(model_type)
    reference = copy.deepcopy(model)  # the model's default attention, untouched by enable_varlen
    try:
        enable_varlen(model)
        check_no_leak(model)
    except refusals() as exc:
        return "refused", f"{type(exc).__name__}: {exc}"
    logit_error, grad_error, worst = packed_errors(model, reference)
    words = f"logits {logit_error:.2g}, gradients {grad_error:.2g} (worst {worst})"
    exact = logit_error <= TOLERANCE and grad_error <= GRAD_TOLERANCE
    return ("exact" if exact else "wrong"), words


#: Relative tolerances of ``outcome``'s comparison: ``check_no_leak``'s in fp32. A gradient entry
#: sums the contributions of every token of the row (141 here) where a logit sums one token's: its
#: rounding differs more between the packed row and the documents alone (diffllama's lambda
#: scalars: 1.1e-5; Gated DeltaNet's A_log through transformers' fp32 scan: 2.3e-5).
TOLERANCE, GRAD_TOLERANCE = _TOLERANCE[torch.float32], _GRAD_TOLERANCE[torch.float32]


if __name__ == "__main__":
    import os
    import traceback

    SKIP = set(os.environ.get("SKIP", "").split(","))

    for t in [a for a in sys.argv[1:] if a != '-v'] or text_types():
        if t in SKIP:
            continue
        try:
            kind, words = outcome(t)
        except Exception as exc:  # noqa: BLE001 - a report of every type
            kind, words = "CRASH", f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            if "-v" in sys.argv:
                traceback.print_exc()
        print(f"{t}\t{kind}\t{words[:300]}", flush=True)
