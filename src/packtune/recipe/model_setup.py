"""Model and precision from validated settings: pretrained or random-init, varlen, LoRA, QLoRA."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from packtune.config.settings import Settings
from packtune.errors import SetupError
from packtune.modeling import check_no_leak, enable_varlen

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: ``auto`` is bf16 on a CUDA device with native bf16 (Ampere and
    newer), fp16 on an older card (the engines then scale the loss), fp32 elsewhere."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        # Emulated bf16 (T4, V100) would be counted too, and is many times slower than fp16.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float16
    return DTYPES[name]


def model_source(settings: Settings) -> str:
    """A short description of where the weights come from (for logs and errors)."""
    if settings.model_config is not None:
        return f"random-init {settings.model_config.get('model_type')}"
    return str(settings.pretrained_model_name_or_path)


def _quantization(settings: Settings, device: torch.device):
    quant = (settings.lora or {}).get("quantization")
    if not quant:
        return None
    if device.type != "cuda":
        raise SetupError(f"QLoRA (lora quantization={quant!r}) needs a CUDA device and bitsandbytes; this run is on {device.type}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SetupError("QLoRA needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            # The 4-bit matmuls compute in the run's dtype (fp16 on a card without bf16).
            bnb_4bit_compute_dtype=compute_dtype(settings.dtype, device),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base_model(settings: Settings, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The base model (no LoRA yet), on CPU unless quantized, with weights in ``dtype``.

    A pretrained model loads through ``packtune.load_model``: ported families (InternLM,
    Baichuan, ChatGLM2/3, Qwen-1) become their native class, without remote code.
    """
    if getattr(settings, "method", "sft") == "reward":  # AutoModelForSequenceClassification, num_labels=1
        from packtune.preference.model import load_reward_model

        causal = dataclasses.replace(settings, method="sft", dataset_format="auto", center_rewards_coefficient=None)
        return load_reward_model(settings, dtype, lambda s: load_base_model(causal, device, dtype))
    if settings.model_config is not None:
        return random_init_model(AutoConfig.for_model(**copy.deepcopy(settings.model_config)), dtype, settings.seed)
    from packtune.ports.api import load_model

    quant = _quantization(settings, device)
    kwargs = {"trust_remote_code": settings.trust_remote_code}
    if not settings.use_varlen_attn:
        kwargs["attn_implementation"] = None  # the model's default attention (remote code may have no other)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device.index or 0})
    try:
        return load_model(settings.pretrained_model_name_or_path, dtype=dtype, **kwargs)
    except OSError as exc:
        raise SetupError(f"cannot load {settings.pretrained_model_name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:  # a checkpoint packtune cannot port, a model that cannot use varlen attention
        raise SetupError(str(exc).splitlines()[0]) from exc


def random_init_model(config, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A random-init model whose weights depend on ``config`` and ``seed`` only.

    Seeded, so a run, its resume and its conversion agree on the weights; and initialised the
    way transformers does it under ZeRO-3's ``zero.Init`` (construction with initialisation
    off, then each module's ``_init_weights`` in order), so every engine, sharded or not,
    starts from the same weights.
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    try:
        from transformers import initialization as hf_init
    except ImportError:  # transformers 4: initialisation at construction, as it always was
        hf_init = None
    if not hasattr(hf_init, "no_init_weights") or not hasattr(hf_init, "guard_torch_init_functions"):
        hf_init = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hf_init is None or is_deepspeed_zero3_enabled():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        with hf_init.no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        with torch.no_grad(), hf_init.guard_torch_init_functions():
            model.initialize_weights()
        model.tie_weights()
    return model


def base_dtype(settings: Settings, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the base model's weights: fp32 master weights for full fine-tuning
    (autocast computes in ``dtype``), ``dtype`` for the frozen base of a LoRA run."""
    return dtype if settings.lora else torch.float32


def _is_reward_model(model: torch.nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def apply_lora(model: torch.nn.Module, lora: dict) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=int(lora.get("r", 8)),
        lora_alpha=int(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.05)),
        target_modules=lora.get("target_modules", "all-linear"),
        # A reward model's new `score` head trains in full (peft's SEQ_CLS keeps it in modules_to_save).
        task_type="SEQ_CLS" if _is_reward_model(model) else "CAUSAL_LM",
    )
    return get_peft_model(model, config)


def build_model(settings: Settings, device: torch.device, dtype: torch.dtype, *, base: torch.nn.Module | None = None,
                leak_check: bool = True) -> torch.nn.Module:
    """The model to train: varlen attention (leak-checked), checkpointing, LoRA, on ``device``.

    Full fine-tuning keeps fp32 master weights (autocast computes in ``dtype``); a LoRA run
    keeps the frozen base in ``dtype`` and its adapters in fp32. ``base``: a base model built
    elsewhere (a sharded construction's skeleton, see ``engines.construction``) instead of loading it;
    ``leak_check=False`` leaves the leak check to the caller (once the engine holds the model).
    A ``base`` is not moved to ``device``: the engine that shards it places the shards.
    """
    model = base if base is not None else load_base_model(settings, device, base_dtype(settings, dtype))
    if settings.use_varlen_attn:
        try:
            enable_varlen(model, settings.attn_backend)
        except ValueError as exc:
            raise SetupError(str(exc)) from exc
    model.config.use_cache = False
    if not (settings.lora or {}).get("quantization") and base is None:
        model.to(device)  # a base built elsewhere stays on the CPU: its engine places its shards
    if settings.use_varlen_attn and leak_check:
        # Under the training step's autocast: the check runs the kernel training will run.
        if getattr(settings, "method", "sft") == "reward":
            from packtune.preference.model import check_reward_no_leak

            check_reward_no_leak(model, dtype=dtype, max_length=settings.max_length)
        else:
            check_no_leak(model, dtype=dtype, max_length=settings.max_length)
    if settings.gradient_checkpointing:
        # transformers >= 5.x renames it activation checkpointing; older releases have only this name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.lora:
        if settings.lora.get("quantization"):
            from peft import prepare_model_for_kbit_training

            # Without these kwargs peft switches checkpointing back to the reentrant kind.
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=settings.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif settings.gradient_checkpointing:
            model.enable_input_require_grads()
        model = apply_lora(model, settings.lora)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model
