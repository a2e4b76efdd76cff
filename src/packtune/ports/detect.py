"""Which port a ``config.json`` needs, from the config alone (no checkpoint code is run).

=============  =================================  =================================
model_type     checkpoints                        native class
=============  =================================  =================================
``internlm``   InternLM-7B/20B                    llama (q, k, v and o biases)
``internlm2``  InternLM2 / 2.5                    llama
``baichuan``   Baichuan-7B, Baichuan2-7B (RoPE)   llama (+ NormHead for Baichuan2)
``baichuan``   Baichuan-13B, Baichuan2-13B        ``baichuan_alibi`` (packtune's)
``chatglm``    ChatGLM2-6B, ChatGLM3-6B           glm
``qwen``       Qwen-1 (7B/14B/72B)                qwen2
=============  =================================  =================================

A native config written by packtune carries ``packtune_port`` (the family, the original
config, the original weight format and base folder), so a native folder can still be saved
back in the original layout.
"""

from __future__ import annotations

from collections.abc import Callable

from packtune.ports import baichuan, chatglm, internlm, internlm2, qwen
from packtune.ports.layout import PortError
from packtune.ports.port import Port

#: The attribute of a native config that records its original (see the module docstring).
META = "packtune_port"


def _chatglm(cfg: dict) -> Port:
    chatglm.check_version(cfg)  # ChatGLM-6B v1: a one-line refusal
    return chatglm.PORT


#: The one registry: each ported ``model_type``, its ports, and how its config picks one
#: (``None``: the family has one port).
FAMILIES: dict[str, tuple[tuple[Port, ...], Callable[[dict], Port] | None]] = {
    "internlm": ((internlm.PORT,), None),
    "internlm2": ((internlm2.PORT,), None),
    "baichuan": (baichuan.PORTS, baichuan.select),
    "chatglm": ((chatglm.PORT,), _chatglm),
    "qwen": ((qwen.PORT,), None),
}
MODEL_TYPES = tuple(FAMILIES)
PORTS: dict[str, Port] = {p.family: p for ports, _ in FAMILIES.values() for p in ports}
#: packtune's own model types, registered with transformers' Auto classes on import.
NATIVE_MODEL_TYPES = ("baichuan_alibi",)


def find_port(cfg: dict) -> Port | None:
    """The port of a config (original, or native with ``packtune_port``); None for other models.

    Raises ``PortError`` (one line) for ChatGLM-6B v1 and for a config of a ported model type
    that fits none of its known variants.
    """
    meta = cfg.get(META)
    if isinstance(meta, dict):
        if meta.get("family") not in PORTS:
            raise PortError(f"config.json names an unknown packtune port {meta.get('family')!r}; known: {', '.join(PORTS)}")
        return PORTS[meta["family"]]
    family = FAMILIES.get(cfg.get("model_type"))
    if family is None:
        return None
    ports, select = family
    return ports[0] if select is None else select(cfg)


def check_known(cfg: dict, source: str, trust_remote_code: bool = False) -> None:
    """Refuse, in one line, a config that neither transformers, packtune nor remote code can build."""
    model_type = cfg.get("model_type")
    if not model_type:
        raise PortError(f"{source}: config.json has no model_type, so no model class can be chosen")
    if trust_remote_code or model_type in NATIVE_MODEL_TYPES:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise PortError(
            f"{source}: model_type {model_type!r} is neither a transformers architecture nor one packtune ports "
            f"({', '.join(MODEL_TYPES)}); set trust_remote_code to run the checkpoint's own code"
        )
