"""The one table of varlen layer forms (``VARLEN_LAYERS``), and how ``enable_varlen`` installs them."""

from __future__ import annotations

import functools
import importlib
import re

import torch

#: Layer class name -> ``"module:function"`` of its varlen form (imported when a model has the layer,
#: so ``import packtune`` stays cheap). A new stateful layer kind is one function plus one row here.
VARLEN_LAYERS: dict[str, str] = {
    # Mamba2 (SSD) mixers: one form, Falcon-H1's with its multipliers (layers/mamba2.py).
    "BambaMixer": "packtune.layers.mamba2:mamba2_mixer_forward",
    "GraniteMoeHybridMambaLayer": "packtune.layers.mamba2:mamba2_mixer_forward",
    "NemotronHMamba2Mixer": "packtune.layers.mamba2:mamba2_mixer_forward",
    "Zamba2MambaMixer": "packtune.layers.mamba2:mamba2_mixer_forward",
    "Mamba2Mixer": "packtune.layers.mamba2:mamba2_mixer_forward",
    "FalconH1Mixer": "packtune.layers.mamba2:falcon_h1_mixer_forward",
    # Mamba1 (selective scan) mixers (layers/mamba1.py). Jamba's decoder layer and the Mamba /
    # Falcon-Mamba LMs call their mixers without the forward's kwargs: their rows hand the
    # boundaries to the mixers inside.
    "JambaMambaDecoderLayer": "packtune.layers.mamba1:jamba_mamba_layer_forward",
    "MambaForCausalLM": "packtune.layers.mamba1:mamba_lm_forward",
    "FalconMambaForCausalLM": "packtune.layers.mamba1:mamba_lm_forward",
    "ZambaMambaMixer": "packtune.layers.mamba1:zamba_mixer_forward",
    # Kimi delta attention (kimi_linear, bailing_hybrid, glm5_next's text model) and MiniMax
    # lightning attention (minimax).
    "KimiLinearDeltaAttention": "packtune.layers.kda:varlen_kda_forward",
    "BailingHybridDeltaAttention": "packtune.layers.kda:varlen_kda_forward",
    "Glm5NextTextLinearAttention": "packtune.layers.kda:varlen_kda_forward",
    "MiniMaxLightningAttention": "packtune.layers.lightning:varlen_lightning_forward",
    # Short causal convolutions: LFM2's gated short convolution (lfm2, lfm2_moe, lfm3).
    **dict.fromkeys(
        ("Lfm2ShortConv", "Lfm2MoeShortConv", "Lfm3ShortConv"),
        "packtune.layers.short_conv:lfm2_short_conv_forward",
    ),
    # Gated DeltaNet: a short convolution, then the chunked gated delta rule.
    "Qwen3NextGatedDeltaNet": "packtune.layers.gated_delta:qwen3_next_gated_deltanet_forward",
    **dict.fromkeys(
        ("Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet", "LaraMiniGatedDeltaNet", "Qwen4ExpTextGatedDeltaNet"),
        "packtune.layers.gated_delta:qwen3_5_gated_deltanet_forward",
    ),
    "OlmoHybridGatedDeltaNet": "packtune.layers.gated_delta:olmo_hybrid_gated_deltanet_forward",
    # Attention layers whose own code reads the mask before attending (DeepSeek sparse attention's
    # and the Kolibri 1.1 and Qwen4-Exp (QSA) indexers, Doge's dynamic mask): they get the documents'
    # causal mask instead of None.
    **dict.fromkeys(
        (
            "DeepseekV32Attention", "GlmMoeDsaAttention", "HYV4Attention", "MistralLarge4TextAttention",
            "AXK2Attention", "Dots3NoteTextAttention", "DogeAttention", "Kolibri1_1Attention",
            "Qwen4ExpTextAttention",
        ),
        "packtune.layers.masked:mask_reading_attention_forward",
    ),
    # Attention whose sliding window only the model's own mask carries (PhiMoE): the window is
    # handed to packtune's attention instead.
    "PhimoeAttention": "packtune.layers.masked:config_window_attention_forward",
    # Llama 4: chunked attention and NoPE temperature tuning counted per document.
    "Llama4TextAttention": "packtune.layers.llama4:llama4_attention_forward",
}

#: Layer class name -> ``"module:function"`` of ``fn(module) -> str | None``: why packtune cannot
#: make that layer exact on a packed row (``None``: this instance is fine). ``enable_varlen``
#: refuses such a model in one line naming the layer, before anything trains.
REFUSED_LAYERS: dict[str, str] = {
    "DeepseekV4Attention": "packtune.layers.sparse:deepseek_v4_reason",
    "MiniMaxM3VLAttention": "packtune.layers.sparse:minimax_m3_reason",
}

#: Class names of layers that carry state from token to token (scans, recurrences, causal convs).
_STATEFUL_NAME = re.compile(
    r"Mamba|Mixer|DeltaNet|DeltaAttention|LinearAttention|ShortConv|Lightning|Recurrent|Rwkv|RWKV|"
    r"Ssm|SSM|Retention|Hyena|LSTM|Lru|LRU"
)
#: Names of wrappers and leaves that merely contain or sit beside a stateful mixer (a model, a
#: decoder block, a norm, an MLP): the mixer inside is the layer to name.
_WRAPPER_NAME = re.compile(r"(Norm|Block|DecoderLayer|Layer|Model|ForCausalLM|FeedForward|Mlp|MLP)$")
#: Softmax attention (through ``AttentionInterface``, kept exact by varlen attention) named like a
#: linear-attention mixer: Kimi Linear's MLA layers.
_PLAIN_ATTENTION = frozenset({"KimiLinearAttention"})
#: Parameters that only state-space / decay layers have.
_STATEFUL_PARAMS = ("A_log", "dt_bias")


class StatefulLayerError(ValueError):
    """A layer keeps state across tokens and packtune has no varlen form of it."""


class UnsupportedLayerError(ValueError):
    """A layer that packtune knows it cannot make exact on a packed row (``REFUSED_LAYERS``)."""


def _is_time_conv(module: torch.nn.Module) -> bool:
    """A depthwise convolution over time with more than one tap: it mixes neighbouring tokens."""
    return (
        isinstance(module, torch.nn.Conv1d)
        and module.groups == module.in_channels
        and module.groups > 1
        and module.kernel_size[0] > 1
    )


def looks_stateful(module: torch.nn.Module) -> bool:
    """Whether ``module`` itself mixes tokens through a state or a causal convolution: it is (or
    directly holds) a depthwise convolution over time, has state-space parameters (``A_log``,
    ``dt_bias``), or is named like a scan or recurrence (not a model, block, norm or MLP around one).

    >>> looks_stateful(torch.nn.Linear(2, 2)), looks_stateful(torch.nn.Conv1d(4, 4, 3, groups=4))
    (False, True)
    """
    if _is_time_conv(module) or any(_is_time_conv(child) for child in module.children()):
        return True
    own = dict(module.named_parameters(recurse=False))
    if any(name in own for name in _STATEFUL_PARAMS):
        return True
    name = type(module).__name__
    if name in _PLAIN_ATTENTION:
        return False
    return bool(_STATEFUL_NAME.search(name)) and not _WRAPPER_NAME.search(name)


@functools.lru_cache(maxsize=None)
def _resolve(target: str):
    module_name, func = target.split(":")
    return getattr(importlib.import_module(module_name), func)


def install_varlen_layers(model: torch.nn.Module) -> list[str]:
    """Give every layer of ``model`` with an entry in ``VARLEN_LAYERS`` its varlen form.

    Returns the class names that were switched (each once, in model order). Raises
    ``StatefulLayerError`` naming every stateful layer kind that has no varlen form, and
    ``UnsupportedLayerError`` naming a layer in ``REFUSED_LAYERS``; nothing is switched then. Idempotent: a layer already switched is left as it is.
    """
    plan: list[tuple[torch.nn.Module, str]] = []
    unknown: dict[str, str] = {}
    covered: set[int] = set()
    for name, module in model.named_modules():
        kind = type(module).__name__
        reason = _resolve(REFUSED_LAYERS[kind])(module) if kind in REFUSED_LAYERS else None
        if reason:
            raise UnsupportedLayerError(
                f"{type(model).__name__} cannot train packed rows exactly: {kind} (at {name or 'the model'}) {reason}; "
                "set use_varlen_attn = False and pack_to_max_length = False"
            )
        if id(module) in covered:
            continue
        if kind in VARLEN_LAYERS:
            plan.append((module, kind))
            covered.update(id(m) for m in module.modules())
        elif looks_stateful(module):
            unknown.setdefault(kind, name)
            covered.update(id(m) for m in module.modules())
    if unknown:
        listed = ", ".join(f"{kind} (at {where or 'the model'})" for kind, where in unknown.items())
        raise StatefulLayerError(
            f"{type(model).__name__} has layers that carry state from token to token and packtune has "
            f"no varlen form of them: {listed}. On a packed row their state would cross document "
            "boundaries; refusing to pack. Set use_varlen_attn = False and pack_to_max_length = False"
        )
    switched: list[str] = []
    for module, kind in plan:
        if not getattr(module, "_packtune_varlen_layer", False):
            # An instance attribute: this layer object only, never the class (other models and the
            # reference copies in tests keep transformers' forward). A partial survives deepcopy.
            module.forward = functools.partial(_resolve(VARLEN_LAYERS[kind]), module)
            module._packtune_varlen_layer = True
        if kind not in switched:
            switched.append(kind)
    return switched
