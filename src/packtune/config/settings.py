"""The typed settings of a packtune run: ``Settings``, its choices, and ``ConfigError``.

A config file is plain assignments of these settings (see ``packtune.config.loader``). Every
field below is one setting; its ``metadata`` holds the config-file part it belongs to and a
one-line description, used by ``settings_to_source`` to write a config back out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Choices. Kept here rather than imported from packtune.attention / packtune.packing so that
# reading and validating a config never needs torch; tests check they stay in sync.
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_BACKENDS = ("auto", "sdpa", "eager", "flash_attn", "torch")
DATASET_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "oasst1", "text", "preference")
PROMPT_TEMPLATES = (
    "auto", "tokenizer", "default", "chatml", "qwen_chat", "llama2_chat", "llama3_chat", "mistral", "zephyr",
    "internlm2_chat", "gemma", "deepseek", "yi", "vicuna", "chatglm3", "baichuan2_chat",
)
PACK_STRATEGIES = ("bfd", "sequential", "concat")
OVERFLOW_POLICIES = ("truncate", "drop", "error")
BAD_ROW_POLICIES = ("skip", "error")
LOSS_REDUCTIONS = ("token", "sample", "square")
NONFINITE_LOSS_POLICIES = ("error", "skip")
LORA_QUANTIZATION = (None, "4bit", "8bit")
#: Training objectives (``method``) and DPO losses (``dpo_loss``): see ``packtune.preference``.
METHODS = ("sft", "dpo", "simpo", "orpo", "reward")
DPO_LOSSES = ("sigmoid", "ipo", "hinge")

#: Default ``loss_chunk_size``: at a 151,936-token vocabulary a 1,024-token chunk is 0.6 GB of
#: fp32 logits (4,096 would be 2.5 GB), and 1,024 rows keep the vocabulary product efficient.
LOSS_CHUNK_SIZE = 1024

#: Keys of the ``lora`` dict and their defaults; a config's ``lora`` is completed with these.
LORA_DEFAULTS: dict[str, Any] = {
    "r": 8,
    "alpha": 16,
    "dropout": 0.05,
    "target_modules": "all-linear",
    "quantization": None,
}

#: Scheme of datasets and tokenizers shipped inside packtune (``packtune://NAME``).
BUNDLED_SCHEME = "packtune://"

#: Config-file parts, in file order (the XTuner layout).
PARTS = ("Settings", "Model", "Dataset", "Scheduler & Optimizer", "Runtime")
MODEL, DATASET, SCHEDULE, RUNTIME = 2, 3, 4, 5


def _f(default: Any, part: int, doc: str, *, factory: Any = None) -> Any:
    """A dataclass field with its config-file part and description."""
    meta = {"part": part, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Problem:
    """One thing wrong with a config: the setting, what is wrong, and how to fix it."""

    __slots__ = ("key", "message", "fix")

    def __init__(self, key: str, message: str, fix: str) -> None:
        self.key = key
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        # "did you mean `r`? fix: ..." reads better than "did you mean `r`?; fix: ...".
        sep = " " if self.message.endswith(("?", ".", "!")) else "; "
        return f"{self.message}{sep}fix: {self.fix}"

    def __repr__(self) -> str:
        return f"Problem({self.key!r}, {self.message!r}, {self.fix!r})"


class ConfigError(ValueError):
    """A config cannot be used. ``problems`` lists every problem found, not just the first.

    ``str()`` gives a header line (when there is a source or more than one problem) and one
    line per problem, each with its fix.
    """

    def __init__(self, problems: list[Problem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(str(self))

    def header(self) -> str:
        """``config 'x' has 2 problems:`` (or ``'x': ...`` for a single problem)."""
        n = len(self.problems)
        where = f"config {self.source!r}" if self.source else "config"
        return f"{where} has {n} problem{'s' if n != 1 else ''}:"

    def lines(self) -> list[str]:
        """One line per problem, message and fix."""
        return [str(p) for p in self.problems]

    def __str__(self) -> str:
        if len(self.problems) == 1 and not self.source:
            return str(self.problems[0])
        return "\n".join([self.header(), *(f"  - {line}" for line in self.lines())])


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
        # Imported here: validate imports this module for the field list.
        from packtune.config.validate import check_settings

        values, problems = check_settings({name: getattr(self, name) for name in self.__dataclass_fields__})
        if problems:
            raise ConfigError(problems)
        for name, value in values.items():
            # Frozen dataclass: normalised values are written once, here.
            object.__setattr__(self, name, value)
