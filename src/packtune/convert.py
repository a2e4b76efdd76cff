"""Checkpoints to Hugging Face folders: ``pth_to_hf`` and ``merge_adapter``.

The output loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` without packtune: its config names a stock attention
implementation, the tokenizer carries the chat template used in training, and the generation
config stops at the end-of-turn token.

A LoRA run gives a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``),
or with ``merge=True`` a plain model with the adapter merged in (a reward model's adapter converts
merged only: ``REWARD_ADAPTER_MERGE_ONLY``). When the base was a
random-init ``model_config`` there is no published base to point at, so the base weights are
saved beside the adapter in ``base_model/``.

A ported family (InternLM, Baichuan, ChatGLM2/3, Qwen-1) is written in its ``original`` layout
by default, or ``native`` (``packtune.save_model``). Its adapters are native only: a LoRA on
separate q/k/v cannot be expressed on the original's fused ``wqkv``.
"""

from __future__ import annotations

import copy
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from packtune.config.settings import Settings
from packtune.data import load_tokenizer
from packtune.ports.api import load_model, port_for, save_model
from packtune.recipe.checkpoint import load_trainable_state
from packtune.recipe.model_setup import DTYPES, apply_lora, load_base_model

REWARD_ADAPTER_MERGE_ONLY = (
    "a reward model's LoRA adapter converts merged only: unmerged, it would need a sequence-classification base "
    "with one label and the converted pad token, which no published checkpoint is; add --merge"
)
ADAPTER_NATIVE_ONLY = (
    "a LoRA adapter on separate q/k/v cannot be expressed on the {label} checkpoint's fused layout, so adapters "
    "are exported for the native layout only (load its base with packtune.load_model); add --merge for a full "
    "model in either layout"
)


def read_checkpoint(path: str) -> dict:
    """The model state dict of any checkpoint form packtune writes (file or engine folder)."""
    if os.path.isdir(path):
        from packtune.recipe.engines import read_sharded_model_state

        return read_sharded_model_state(path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["model"] if isinstance(state, dict) and "model" in state else state


def _output_dtype(settings: Settings, fp32: bool) -> torch.dtype:
    if fp32 or settings.dtype in ("auto", "float32"):
        # "auto" trains with fp32 master weights; keep them unless a half dtype was asked for.
        return torch.float32
    return DTYPES[settings.dtype]


def ported(settings: Settings):
    """The port of the run's base model (InternLM, Baichuan, ...), None for other models."""
    if settings.model_config is not None:
        return None
    return port_for(settings.pretrained_model_name_or_path)


def _skeleton(settings: Settings, port) -> torch.nn.Module:
    """The model to load a full state dict into, without downloading weights twice (``port``: ``ported(settings)``)."""
    if settings.model_config is not None or port is not None or settings.method == "reward":
        # A ported model needs its base folder anyway (the original layout copies its files);
        # a reward model is built as it trained (AutoModelForSequenceClassification, num_labels=1).
        return load_base_model(settings, torch.device("cpu"))
    config = AutoConfig.from_pretrained(settings.pretrained_model_name_or_path, trust_remote_code=settings.trust_remote_code)
    return AutoModelForCausalLM.from_config(config, trust_remote_code=settings.trust_remote_code, dtype=torch.float32)


def _reward_pad(tokenizer, stops: list[int], model: torch.nn.Module) -> None:
    """A reward model scores the last token that is not a pad (transformers'
    ``ForSequenceClassification``), and it was trained at the end-of-turn token: the pad of the
    converted folder (tokenizer and config) must be another token, or it would score the token
    before the end of the turn."""
    for token in (tokenizer.pad_token, tokenizer.unk_token):
        if token is not None and tokenizer.convert_tokens_to_ids(token) not in stops:
            tokenizer.pad_token = token
            model.config.pad_token_id = tokenizer.pad_token_id
            return
    raise ValueError("the reward model's tokenizer has no pad or unk token other than an end-of-turn token: "
                     "add a pad token to the tokenizer so that the converted model scores the end of each turn")


def _save_tokenizer(settings: Settings, save_path: str, reward_model: torch.nn.Module | None = None) -> None:
    """The tokenizer with the chat template used in training, and a generation config that
    stops where a trained reply ends (every single-token stop of the template, not just EOS).
    With ``reward_model`` (converted before it is saved): a pad that is no end-of-turn token."""
    from packtune.data.templates import get_template, stop_token_ids

    tokenizer = load_tokenizer(settings.tokenizer_name_or_path or settings.pretrained_model_name_or_path, settings.trust_remote_code)
    template = get_template(settings.prompt_template, tokenizer)
    if reward_model is not None:
        _reward_pad(tokenizer, stop_token_ids(tokenizer, template.stop), reward_model)
    jinja = getattr(template, "to_jinja", None)
    if jinja is not None:
        # A built-in template trained the model: it replaces whatever template the tokenizer had.
        tokenizer.chat_template = jinja(settings.system_prompt)
    tokenizer.save_pretrained(save_path)
    stops = stop_token_ids(tokenizer, template.stop)
    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stops[0] if len(stops) == 1 else (stops or None),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    gen.save_pretrained(save_path)


def pth_to_hf(
    settings: Settings,
    pth: str,
    save_path: str,
    *,
    fp32: bool = False,
    max_shard_size: str = "2GB",
    safe_serialization: bool = True,
    merge: bool = False,
    format: str | None = None,
) -> str:
    """Convert checkpoint ``pth`` of a run of ``settings`` into a Hugging Face folder.

    ``format``: ``"original"`` or ``"native"`` (default: original for a ported family).
    """
    port = ported(settings)
    if settings.method == "reward" and settings.lora and not merge:
        raise ValueError(REWARD_ADAPTER_MERGE_ONLY)
    if settings.lora and not merge and port is not None and format == "original":
        raise ValueError(ADAPTER_NATIVE_ONLY.format(label=port.label))
    format = format or ("original" if port is not None else "native")
    state = read_checkpoint(pth)
    dtype = _output_dtype(settings, fp32)
    os.makedirs(save_path, exist_ok=True)
    if not settings.lora:
        model = _skeleton(settings, port)
        load_trainable_state(model, state)
        missing = set(model.state_dict()) - set(state)
        if missing - {k for k in missing if "rotary" in k or k.endswith("inv_freq")}:
            raise ValueError(f"{pth} is not a full checkpoint: it lacks {sorted(missing)[:5]}")
        out = model
    else:
        base = load_base_model(settings, torch.device("cpu"))
        model = apply_lora(base, settings.lora)
        load_trainable_state(model, state)
        out = model.merge_and_unload() if merge else model
    out = out.to(dtype)
    reward = out if settings.method == "reward" else None
    if reward is not None:
        _save_tokenizer(settings, save_path, reward)  # sets the pad of the config saved below
    if settings.lora and not merge:
        base_dir = None
        if settings.model_config is not None:
            # No published base to point at: save the (frozen, loaded) base next to the adapter.
            base_dir = os.path.join(os.path.abspath(save_path), "base_model")
            save_model(copy.deepcopy(out).unload(), base_dir, "native", max_shard_size=max_shard_size,
                       safe_serialization=safe_serialization)
            _save_tokenizer(settings, base_dir)
        out.peft_config["default"].base_model_name_or_path = base_dir or settings.pretrained_model_name_or_path
        out.save_pretrained(save_path, safe_serialization=safe_serialization)
    else:
        save_model(out, save_path, format, max_shard_size=max_shard_size, safe_serialization=safe_serialization)
    if reward is None:
        _save_tokenizer(settings, save_path)
    return save_path


def merge_adapter(base: str, adapter: str, save_path: str, *, max_shard_size: str = "2GB", safe_serialization: bool = True,
                  format: str | None = None) -> str:
    """Merge PEFT ``adapter`` into ``base`` (both HF folders or ids) and save a plain model.

    ``format`` as in ``pth_to_hf`` (default: original for a ported base).
    """
    from peft import PeftModel

    model = load_model(base, dtype="auto")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    format = format or "original"  # a model that is not a ported family has one layout: both formats write it
    save_model(merged, save_path, format, max_shard_size=max_shard_size, safe_serialization=safe_serialization)
    source = adapter if os.path.exists(os.path.join(adapter, "tokenizer_config.json")) else base
    load_tokenizer(source).save_pretrained(save_path)
    if os.path.exists(os.path.join(base, "generation_config.json")):
        GenerationConfig.from_pretrained(base).save_pretrained(save_path)
    return save_path
