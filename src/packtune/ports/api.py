"""``packtune.load_model`` and ``packtune.save_model``.

``load_model`` loads any causal LM ready for packed training: varlen attention
(``"packtune_varlen"``) and the KV cache off. A checkpoint of a ported family (InternLM 1/2,
Baichuan 1/2, ChatGLM2/3, Qwen-1; see ``packtune.ports.detect``) becomes its native class with
converted weights, without ``trust_remote_code`` and without importing any of its ``.py``
files::

    model = packtune.load_model("internlm/internlm2-7b", dtype=torch.bfloat16)
    packtune.save_model(model, "out", format="original")   # wqkv, tok_embeddings, ... as published
    packtune.save_model(model, "out_native", format="native")  # LlamaForCausalLM, no remote code

``format="original"`` writes the checkpoint's own layout (``model_type``, ``architectures``,
``auto_map``, names, fused shapes, and the base's file format: a ``.bin`` base stays ``.bin``)
and copies the base folder's ``.py``, tokenizer and generation files, so the result drops in
wherever the base model was used. For a model loaded and saved untouched, its tensors are
bit-identical to the input's (derived ``rotary_emb.inv_freq`` buffers are dropped). The map is
a pure function of tensors (``to_original``), so it maps gradients as well as weights.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings

import torch

from packtune.attention.hf import BACKEND_ATTR
from packtune.modeling import enable_varlen, model_configs, transformers_model
from packtune.ports import files
from packtune.ports.detect import META, PORTS, check_known, find_port
from packtune.ports.layout import PortError
from packtune.ports.norm_head import NormHead, install_norm_head, normalized_head
from packtune.ports.port import Port

FORMATS = ("original", "native")


def _config_dict(name_or_path: str, kwargs: dict) -> tuple[dict | None, str | None]:
    """``(config.json as a dict, local folder)``; the folder is None for a hub id."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "config.json")
        return (files.read_config(name_or_path), name_or_path) if os.path.isfile(path) else (None, name_or_path)
    if os.path.exists(name_or_path) or name_or_path.count("/") > 1:
        return None, None  # not a folder, not a hub id: transformers' loader says what is wrong
    return files.hub_config(name_or_path, **kwargs), None


def port_for(name_or_path: str | os.PathLike, **kwargs) -> Port | None:
    """The port a checkpoint (folder or hub id) loads through, None for other models."""
    cfg, _ = _config_dict(str(name_or_path), kwargs)
    return find_port(cfg) if cfg is not None else None


def _resolve_dtype(dtype, state: dict[str, torch.Tensor]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    return getattr(torch, str(dtype))


def native_config(cfg: dict, port: Port, folder: str, fmt: str):
    """The native config of original-layout checkpoint ``cfg`` in ``folder`` (weights in format
    ``fmt``), carrying its ``packtune_port`` record (so it saves back as the original)."""
    native_cfg = port.native_config(cfg)
    setattr(native_cfg, META, {"family": port.family, "config": cfg, "weights": fmt, "source": os.path.abspath(folder)})
    return native_cfg


def original_layout(name_or_path: str | os.PathLike) -> tuple[Port, dict] | None:
    """``(port, config.json)`` of a local checkpoint folder in a ported family's original
    layout; None for any other model (or a folder packtune saved in the native layout)."""
    name_or_path = str(name_or_path)
    if not os.path.isdir(name_or_path):
        return None
    cfg, _ = _config_dict(name_or_path, {})
    port = find_port(cfg) if cfg is not None else None
    return (port, cfg) if port is not None and META not in cfg else None


def prepare_ported(model: torch.nn.Module) -> torch.nn.Module:
    """What a ported family's native model adds to its class (Baichuan2's ``NormHead``, the
    long-context warning), from the ``packtune_port`` record of its config; other models pass."""
    port, meta = port_of(model)
    if port is None:
        return model
    if port.norm_head:
        install_norm_head(model)
    limit = port.long_context(meta["config"])
    if limit:
        _say_long_context(model, limit, port.label)
    return model


def _load_original(name_or_path: str, folder: str | None, cfg: dict, port: Port, dtype, kwargs: dict):
    """A ported checkpoint in its original layout -> its native class with converted weights."""
    from transformers import AutoModelForCausalLM

    port.native_config(cfg)  # refuses an unsupported variant before any download
    folder = folder or files.hub_folder(name_or_path, **kwargs)
    state, fmt = files.read_weights(folder)
    native_cfg = native_config(cfg, port, folder, fmt)
    native_state = port.layout(cfg).to_native(state)
    del state
    model_class = AutoModelForCausalLM._model_mapping[type(native_cfg)]
    passed = {k: v for k, v in kwargs.items() if k not in (*files.HUB_KWARGS, "trust_remote_code")}
    model, info = model_class.from_pretrained(
        None, config=native_cfg, state_dict=native_state, dtype=_resolve_dtype(dtype, native_state), output_loading_info=True, **passed
    )
    problems = {k: sorted(v)[:3] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise PortError(f"{name_or_path}: the {port.label} weights do not fit the native {port.native} model: {problems}")
    model.config._name_or_path = str(name_or_path)
    return model


def _say_long_context(model: torch.nn.Module, limit: int, label: str) -> None:
    """Warn once when a model in eval mode runs beyond ``limit`` tokens (Qwen-1's NTK/logn)."""
    said = []

    def hook(module, args, kwargs):
        if module.training or said:
            return
        tokens = kwargs.get("input_ids", args[0] if args else None)
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if tokens is not None and past + tokens.shape[1] > limit:
            said.append(True)
            warnings.warn(
                f"{label}: beyond seq_length = {limit} tokens the original applies dynamic NTK and logn attention "
                "scaling, which packtune's native model does not reproduce; from here its outputs differ from the original's",
                stacklevel=2,
            )

    model.register_forward_pre_hook(hook, with_kwargs=True)


def load_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32, **kwargs):
    """Any causal LM, ready for packed training: varlen attention on, KV cache off.

    A ported family (see ``packtune.ports.detect``) loads as its native class with converted
    weights, from safetensors or ``pytorch_model.bin`` (sharded or not, ``weights_only``); its
    ``.py`` files are never imported. Extra ``kwargs`` go to ``from_pretrained``
    (``revision``, ``quantization_config``, ``device_map``, ``trust_remote_code`` for other
    remote-code models ...). Passing ``attn_implementation`` yourself keeps that
    implementation instead of switching to varlen. ``dtype="auto"`` keeps the checkpoint's.

    Raises ``PortError`` (a ``ValueError``) in one line for ChatGLM-6B v1 and for a config that
    fits no known model.
    """
    from transformers import AutoModelForCausalLM

    import packtune.ports.baichuan_alibi  # noqa: F401  (registers packtune's class with the Auto classes)

    name_or_path = str(name_or_path)
    varlen = "attn_implementation" not in kwargs
    cfg, folder = _config_dict(name_or_path, kwargs)
    port = find_port(cfg) if cfg is not None else None
    if cfg is not None and port is None:
        check_known(cfg, name_or_path, bool(kwargs.get("trust_remote_code")))
    if port is not None and META not in cfg:
        model = _load_original(name_or_path, folder, cfg, port, dtype, kwargs)
    else:
        if port is not None:
            kwargs = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}  # native: no remote code
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if port is not None:
        prepare_ported(model)
    if varlen:
        enable_varlen(model)
    for cfg_ in model_configs(model):
        cfg_.use_cache = False
    return model


@contextlib.contextmanager
def stock_config(model: torch.nn.Module):
    """While saving: a config independent of packtune (stock attention, cache on, no backend)."""
    configs = model_configs(model)
    saved = [(c, c.use_cache, c.__dict__.get(BACKEND_ATTR)) for c in configs]
    impl = getattr(model.config, "_attn_implementation", None)
    for c in configs:
        if hasattr(c, BACKEND_ATTR):
            delattr(c, BACKEND_ATTR)
        c.use_cache = True
    if impl not in (None, "eager", "sdpa"):
        model.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        for c, use_cache, backend in saved:
            c.use_cache = use_cache
            if backend is not None:
                setattr(c, BACKEND_ATTR, backend)
        if impl != getattr(model.config, "_attn_implementation", None):
            model.set_attn_implementation(impl)


def port_of(model: torch.nn.Module) -> tuple[Port, dict] | tuple[None, None]:
    """``(port, packtune_port record)`` of a model loaded from a ported family, else ``(None, None)``."""
    meta = getattr(transformers_model(model).config, META, None)
    if not isinstance(meta, dict):
        return None, None
    return PORTS[meta["family"]], meta


def to_original(model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``tensors`` (default: the model's state dict; or e.g. its gradients) in the original layout."""
    port, meta = port_of(model)
    if port is None:
        raise ValueError(f"{type(model).__name__} was not loaded from a ported family; its layout is already its own")
    state = transformers_model(model).state_dict() if tensors is None else tensors
    return port.layout(meta["config"]).to_original(state)


def save_model(model: torch.nn.Module, out_dir: str | os.PathLike, format: str = "original", *, max_shard_size: str | int = "5GB",
               safe_serialization: bool = True) -> str:
    """Save a full model as ``format``: ``"original"`` (the checkpoint's own layout) or ``"native"``.

    For a model that is not a ported family both formats are its transformers layout. The
    original layout keeps the base's weight format; ``safe_serialization`` applies to native.
    Returns ``out_dir``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if hasattr(model, "peft_config"):
        raise ValueError("save_model takes a full model: merge the adapter first (merge_and_unload()), or save it with save_pretrained")
    model = transformers_model(model)
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    port, meta = port_of(model)
    if port is None or format == "native":
        state = None
        if isinstance(model.get_output_embeddings(), NormHead) and port is not None and port.native != "baichuan_alibi":
            # A plain llama has no NormHead: it must hold the effective (normalised) head.
            state = dict(model.state_dict())
            state["lm_head.weight"] = normalized_head(state["lm_head.weight"])
        with stock_config(model):
            model.save_pretrained(out_dir, state_dict=state, max_shard_size=max_shard_size, safe_serialization=safe_serialization)
        return out_dir
    original = to_original(model)
    config = copy.deepcopy(meta["config"])
    floating = next((t.dtype for t in original.values() if t.is_floating_point()), None)
    if floating is not None:
        config["torch_dtype"] = str(floating).removeprefix("torch.")
    files.write_weights(original, out_dir, meta["weights"], max_shard_size)
    files.copy_side_files(meta.get("source"), out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return out_dir
