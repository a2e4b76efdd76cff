"""What packtune knows about one ported family: its native config and its tensor layout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from packtune.ports.layout import Layout, PortError


@dataclass(frozen=True)
class Port:
    """One family (or variant) of remote-code checkpoints, mapped onto a native class.

    ``native_config(cfg)`` and ``layout(cfg)`` take the original ``config.json`` as a dict.
    ``norm_head``: the output layer is Baichuan2's NormHead. ``long_context(cfg)``: the length
    beyond which the original's inference differs from the native class (Qwen-1's dynamic NTK
    and logn scaling), or None.
    """

    family: str
    label: str
    native: str
    native_config: Callable[[dict], object]
    layout: Callable[[dict], Layout]
    norm_head: bool = False
    long_context: Callable[[dict], int | None] = lambda cfg: None


def need(cfg: dict, label: str, *keys: str) -> None:
    """Refuse, in one line, a config that lacks keys the port reads."""
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise PortError(f"{label} config.json lacks {', '.join(missing)}: not a checkpoint packtune can port")


SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def sizes(cfg: dict, label: str, *extra: str, **renamed: str) -> dict:
    """The five sizes every native config takes, from the original's keys (``renamed``: native
    name -> original key, e.g. ChatGLM's ``num_layers``); refuses a config lacking one, or ``extra``."""
    keys = {name: renamed.get(name, name) for name in SIZES}
    need(cfg, label, *keys.values(), *extra)
    return {name: cfg[key] for name, key in keys.items()}


def refuse_if(condition: bool, label: str, what: str) -> None:
    """Refuse, in one line, a variant of a family that the native class does not compute."""
    if condition:
        raise PortError(f"{label} checkpoint with {what} is not supported by packtune's port")


def common(cfg: dict) -> dict:
    """Settings every native config copies unchanged from the original."""
    keys = ("pad_token_id", "bos_token_id", "eos_token_id", "initializer_range", "hidden_act")
    out = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    out["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return out


def rope(theta: float, scaling: dict | None = None, label: str = "") -> dict:
    """transformers' ``rope_parameters`` from a base and an original ``rope_scaling`` dict."""
    params = {"rope_type": "default", "rope_theta": float(theta)}
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        refuse_if(kind not in ("dynamic", "linear"), label, f"rope scaling {kind!r}")
        params.update(rope_type=kind, factor=float(scaling.get("factor", 1.0)))
    return params
