"""The torch-free facts of packtune's settings: every list of choices, the constant defaults,
and the ``Problem`` / ``ConfigError`` types.

The one place for each list: validation (``packtune.config.validate``), the settings
(``packtune.config.settings``, which re-exports all of this) and the code that implements a
choice (attention backends, pack strategies, loss reductions, templates, data formats) import
it from here. Nothing here imports torch or transformers, so reading and checking a config never
waits for them.
"""

from __future__ import annotations

from typing import Any

#: The attention implementation packtune registers with transformers.
ATTN_IMPLEMENTATION = "packtune_varlen"

# Choices.
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
