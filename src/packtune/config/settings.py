"""The typed settings of a packtune run: ``Settings``, its choices, and ``ConfigError``.

The choices and the error types live in ``packtune.config.facts`` (below validation, which
reads them) and are re-exported here. A config file is plain assignments of these settings (see ``packtune.config.loader``). Every
field below is one setting; its ``metadata`` holds the config-file part it belongs to and a
one-line description, used by ``settings_to_source`` to write a config back out.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from packtune.config.facts import (  # noqa: F401  (re-exported: the settings' facts, importable from here)
    ATTN_BACKENDS,
    ATTN_IMPLEMENTATION,
    BAD_ROW_POLICIES,
    BUNDLED_SCHEME,
    ConfigError,
    DATASET,
    DATASET_FORMATS,
    DPO_LOSSES,
    DTYPES,
    LORA_DEFAULTS,
    LORA_QUANTIZATION,
    LOSS_CHUNK_SIZE,
    LOSS_REDUCTIONS,
    METHODS,
    MODEL,
    NONFINITE_LOSS_POLICIES,
    OVERFLOW_POLICIES,
    PACK_STRATEGIES,
    PARTS,
    PROMPT_TEMPLATES,
    Problem,
    RUNTIME,
    SCHEDULE,
)
from packtune.config.validate import check_values


def _f(default: Any, part: int, doc: str, *, factory: Any = None) -> Any:
    """A dataclass field with its config-file part and description."""
    meta = {"part": part, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every setting of a packtune run, validated and normalised on construction.

    Construct it with keywords (``Settings(dataset=..., pretrained_model_name_or_path=...)``)
    or load it from a config file with ``load_settings``; either way an invalid combination
    raises ``ConfigError`` listing every problem. Change a copy with ``dataclasses.replace``.
    Normalisation: ``lora`` is completed with ``LORA_DEFAULTS``, ``betas`` becomes a tuple of
    floats, float settings given as ints become floats, tuples of strings become lists.

    ``prompt_template = "auto"`` means the tokenizer's own chat template when it has one,
    else ``"default"``; ``dataset_format = "auto"`` means detected from the rows' columns.
    """

    # --- Model -------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = _f(None, 1, "HF hub id or local path of the model")
    model_config: dict | None = _f(
        None, MODEL, "random-init model: kwargs for transformers.AutoConfig.for_model (needs model_type)")
    tokenizer_name_or_path: str | None = _f(
        None, MODEL, "None = the model's; 'packtune://mistral-v1' is a bundled tokenizer")
    trust_remote_code: bool = _f(False, MODEL, "run the model repo's own Python code")
    dtype: str = _f("auto", MODEL, "auto|float32|bfloat16|float16")
    use_varlen_attn: bool = _f(True, 1, "exact per-sample attention inside packed rows")
    attn_backend: str = _f("auto", MODEL, "auto|sdpa|eager|flash_attn|torch")
    gradient_checkpointing: bool = _f(False, MODEL, "recompute activations: less memory, ~30% slower")
    lora: dict | None = _f(
        None, MODEL, "None = full fine-tuning; dict(r, alpha, dropout, target_modules, quantization)")

    # --- Objective (preference training: packtune.preference) ---------------------------
    method: str = _f("sft", 1, "sft|dpo|simpo|orpo|reward (the last four train on preference pairs)")
    dpo_loss: str = _f("sigmoid", SCHEDULE, "method='dpo': sigmoid|ipo|hinge, as TRL's DPOTrainer")
    beta: float = _f(0.1, 1, "dpo/simpo: the reward scale; orpo: the odds-ratio weight")
    simpo_gamma: float = _f(0.5, SCHEDULE, "method='simpo': the target reward margin")
    ref_model: str | None = _f(
        None, MODEL, "method='dpo': None = a frozen copy of the starting weights (LoRA: the base, adapter off), else a path or hub id")
    precompute_ref_log_probs: bool = _f(
        False, SCHEDULE, "method='dpo': compute the reference's log-probs once before training")
    center_rewards_coefficient: float | None = _f(
        None, SCHEDULE, "method='reward': weight of mean((r_chosen + r_rejected)^2), as TRL's RewardTrainer")

    # --- Data --------------------------------------------------------------------------
    dataset: str | list[str] = field(metadata={
        "part": 1, "doc": "HF dataset id, local path(s), or packtune://NAME (required)"})
    dataset_format: str = _f("auto", 1, "auto|alpaca|sharegpt|messages|oasst1|text|preference")
    dataset_split: str = _f("train", DATASET, "split to train on")
    dataset_streaming: bool = _f(False, DATASET, "read a hub dataset as a stream (no full download first)")
    max_samples: int | None = _f(None, DATASET, "use only the first N rows (None = all)")
    prompt_template: str = _f("auto", 1, "chat format the samples are rendered in")
    system_prompt: str | None = _f(None, 1, "system prompt for training samples and evaluation")
    train_on_reasoning: bool = _f(True, DATASET, "train the replies' reasoning (<think>...</think>); False = mask it")
    max_length: int = _f(2048, 1, "tokens per packed row (and per sample)")
    pack_to_max_length: bool = _f(True, 1, "pack samples into rows of max_length tokens")
    pack_strategy: str = _f("bfd", DATASET, "bfd (best-fit decreasing)|sequential|concat")
    shuffle_before_pack: bool = _f(True, DATASET, "shuffle samples before packing")
    overflow: str = _f("truncate", DATASET, "samples longer than max_length: truncate|drop|error")
    on_bad_row: str = _f("skip", DATASET, "rows that cannot be read: skip|error")
    num_proc: int | None = _f(None, DATASET, "processes for tokenization (None = automatic)")
    data_cache_dir: str | None = _f(None, DATASET, "where tokenized data is cached")

    # --- Schedule ----------------------------------------------------------------------
    batch_size: int = _f(1, 1, "packed rows per micro-batch per process")
    accumulative_counts: int = _f(1, 1, "micro-batches per optimizer step")
    sequence_parallel_size: int = _f(
        1, 1, "ranks that share each packed row, one shard each (Ulysses); processes = data parallel x this")
    max_epochs: int = _f(1, 1, "passes over the data")
    max_steps: int | None = _f(None, 1, "stop after N optimizer steps, overriding max_epochs (None = run max_epochs)")
    lr: float = _f(2e-5, 1, "peak learning rate (AdamW)")
    betas: tuple[float, float] = _f((0.9, 0.999), 1, "AdamW betas")
    weight_decay: float = _f(0.0, 1, "AdamW weight decay")
    max_norm: float = _f(1.0, 1, "gradient clipping norm")
    warmup_ratio: float = _f(0.03, 1, "share of the steps spent warming up the learning rate")
    loss_reduction: str = _f("token", SCHEDULE, "average the loss per token|sample|square")
    loss_chunk_size: int | None = _f(
        LOSS_CHUNK_SIZE, SCHEDULE, "loss head over chunks of this many trained tokens, logits never all at once (None = plain head)")
    on_nonfinite_loss: str = _f("error", SCHEDULE, "NaN/inf loss: error|skip the step")
    balance_attention: bool = _f(
        False, SCHEDULE, "several processes: deal each step's packs to ranks by attention cost (sum of squared doc lengths)")

    # --- Runtime -----------------------------------------------------------------------
    save_steps: int = _f(500, 1, "save a checkpoint every N optimizer steps")
    save_total_limit: int = _f(2, 1, "keep at most N checkpoints")
    log_steps: int = _f(10, RUNTIME, "log every N optimizer steps")
    evaluation_freq: int = _f(500, 1, "generate from evaluation_inputs every N steps")
    evaluation_inputs: list[str] = _f(None, 1, "prompts to generate from during training", factory=list)
    max_new_tokens: int = _f(64, RUNTIME, "tokens generated per evaluation input")
    seed: int = _f(0, RUNTIME, "random seed")

    def __post_init__(self) -> None:
        values, problems = check_settings({name: getattr(self, name) for name in FIELD_NAMES})
        if problems:
            raise ConfigError(problems)
        for name, value in values.items():
            # Frozen dataclass: normalised values are written once, here.
            object.__setattr__(self, name, value)


#: Every setting's name, in declaration order.
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Settings))


def setting_defaults() -> dict[str, Any]:
    """Every setting's default (a fresh one for list defaults; ``MISSING`` for a required one)."""
    out: dict[str, Any] = {}
    for f in fields(Settings):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = MISSING
    return out


def check_settings(raw: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """Validate ``raw`` (setting name -> value; missing names take their defaults).

    Returns the normalised values (complete: every field) and every problem found; the values
    are only meaningful when the problem list is empty.
    """
    return check_values(raw, setting_defaults())
