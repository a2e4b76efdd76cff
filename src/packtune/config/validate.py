"""Check a dict of settings: every problem is collected, each with its fix.

``check_values(raw, defaults)`` returns the normalised values and a list of ``Problem``
(``packtune.config.settings.check_settings`` passes the settings' defaults). Nothing is
coerced silently: ``batch_size = 4.0`` or ``"4"`` is an error whose fix says what to write.
Combination rules run only on settings that passed their own checks, so one mistake does not
produce a cascade of follow-up messages.
"""

from __future__ import annotations

import ast
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING
from typing import Any

from packtune.config import facts as S
from packtune.config.facts import Problem
from packtune.config.sizes import heads_problem
from packtune.config.preference_rules import preference_problems

# Common spellings of valid choices that difflib does not find on its own.
ALIASES = {
    "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
    "flash_attention_2": "flash_attn", "flash-attn": "flash_attn", "flash": "flash_attn",
    "flash_attention": "flash_attn", "llama2": "llama2_chat", "llama3": "llama3_chat",
    "qwen": "qwen_chat", "qwen2": "qwen_chat", "internlm2": "internlm2_chat", "chatglm": "default",
    "4bits": "4bit", "8bits": "8bit", "nf4": "4bit", "int4": "4bit", "int8": "8bit",
    "mean": "token", "best_fit": "bfd",
    # Setting and lora-key names from HF Trainer / PEFT / TRL.
    "learning_rate": "lr", "num_train_epochs": "max_epochs", "epochs": "max_epochs",
    "gradient_accumulation_steps": "accumulative_counts", "per_device_train_batch_size": "batch_size",
    "torch_dtype": "dtype", "attn_implementation": "attn_backend", "max_seq_length": "max_length",
    "max_seq_len": "max_length", "packing": "pack_to_max_length", "template": "prompt_template",
    "system": "system_prompt", "max_grad_norm": "max_norm", "model_name_or_path": "pretrained_model_name_or_path",
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
}

# Names from XTuner configs that mean something else (or nothing) in packtune.
XTUNER_NAMES = {
    "SYSTEM": "rename it `system_prompt`",
    "data_path": "rename it `dataset`",
    "alpaca_en_path": "rename it `dataset`",
    "optim_type": "remove it: packtune always uses AdamW",
    "dataloader_num_workers": "remove it: packtune reads packed rows from memory",
    "lora_r": "put it inside `lora`: `lora = dict(r=...)`",
    "lora_alpha": "put it inside `lora`: `lora = dict(alpha=...)`",
    "lora_dropout": "put it inside `lora`: `lora = dict(dropout=...)`",
    "quantization": "put it inside `lora`: `lora = dict(quantization='4bit')` (QLoRA)",
    "target_modules": "put it inside `lora`: `lora = dict(target_modules=[...])`",
    "max_new_tokens_eval": "rename it `max_new_tokens`",
}
WIRING = {"model", "tokenizer", "train_dataloader", "optim_wrapper", "param_scheduler", "train_cfg",
          "custom_hooks", "default_hooks", "env_cfg", "visualizer", "log_level", "load_from",
          "resume", "randomness", "log_processor", "train_dataset", "sampler"}

class _Reject(Exception):
    """A value failed a check; ``detail`` says where (e.g. which list item), if not obvious."""

    def __init__(self, detail: str = "", fix: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


def type_name(value: Any) -> str:
    return type(value).__name__


def show(value: Any) -> str:
    """``'4' (str)``: the value and its type, short."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type_name(value)})"


def closest(word: str, choices: Iterable[str], n: int = 1) -> list[str]:
    """Nearest spellings of ``word`` among ``choices``: alias, case-insensitive, then difflib."""
    choices = [c for c in choices if isinstance(c, str)]
    if word in ALIASES and ALIASES[word] in choices:
        return [ALIASES[word]]
    folded = [c for c in choices if c.lower() == word.lower()]
    if folded:
        return folded[:n]
    return difflib.get_close_matches(word, choices, n=n, cutoff=0.6)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Check:
    """A check of one setting: ``expected`` (for messages), ``example`` (for fixes), ``run``."""

    def __init__(self, expected: str, example: Any, run: Callable[[Any], Any]) -> None:
        self.expected = expected
        self.example = example
        self.run = run

    def accepts(self, value: Any) -> bool:
        try:
            self.run(value)
        except _Reject:
            return False
        return True


def INT(low: int) -> Check:
    def run(v: Any) -> int:
        if not _is_int(v) or v < low:
            raise _Reject()
        return v
    return Check(f"an int >= {low}", low, run)


def OPTIONAL(check: Check) -> Check:
    return Check(f"None or {check.expected}", check.example, lambda v: None if v is None else check.run(v))


def NUMBER(low: float, high: float | None = None, low_open: bool = False, high_open: bool = True,
           example: float = 0.0) -> Check:
    """A finite number (int or float, not bool) in a range; normalised to float."""
    lo = f"> {low:g}" if low_open else f">= {low:g}"
    if high is None:
        expected = f"a number {lo}"
    else:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def run(v: Any) -> float:
        if not _is_number(v) or v < low or (low_open and v == low):
            raise _Reject()
        if high is not None and (v > high or (high_open and v == high)):
            raise _Reject()
        return float(v)
    return Check(expected, example, run)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Reject()
    return v


BOOL = Check("True or False", True, _bool)


def CHOICE(choices: tuple) -> Check:
    shown = ", ".join(repr(c) for c in choices)

    def run(v: Any) -> Any:
        # `in` alone would accept 1 == True style look-alikes; compare types too.
        if not any(v == c and type(v) is type(c) for c in choices):
            near = closest(v, choices) if isinstance(v, str) else []
            fix = f"did you mean {near[0]!r}? write `{{name}} = {near[0]!r}`" if near else ""
            raise _Reject("", fix)
        return v
    return Check(f"one of {shown}", choices[0], run)


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _Reject()
    return v


TEXT = Check("a non-empty string", "...", _text)
OPT_TEXT = OPTIONAL(TEXT)


def _any_str(v: Any) -> str | None:
    if v is not None and not isinstance(v, str):
        raise _Reject()
    return v


def _text_list(v: Any) -> list[str]:
    if isinstance(v, str):
        raise _Reject("a single string, not a list", f"wrap it in a list: `{{name}} = [{v!r}]`")
    if not isinstance(v, (list, tuple)):
        raise _Reject()
    for i, item in enumerate(v):
        if not isinstance(item, str) or not item.strip():
            raise _Reject(f"item {i} is {show(item)}")
    return list(v)


def _nonempty(v: list) -> list:
    if not v:
        raise _Reject("an empty list")
    return v


def _dataset(v: Any) -> str | list[str]:
    if isinstance(v, str):
        return _text(v)
    if isinstance(v, (list, tuple)) and v:
        for i, item in enumerate(v):
            if not isinstance(item, str) or not item.strip():
                raise _Reject(f"item {i} is {show(item)}")
        return list(v)
    raise _Reject()


def _betas(v: Any) -> tuple[float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise _Reject()
    for i, b in enumerate(v):
        if not _is_number(b) or not 0 <= b < 1:
            raise _Reject(f"item {i} is {show(b)}")
    return (float(v[0]), float(v[1]))


def _bundled_or_text(v: Any) -> str | None:
    if v is None:
        return None
    text = _text(v)
    if text.startswith(S.BUNDLED_SCHEME) and not text[len(S.BUNDLED_SCHEME):].strip("/"):
        raise _Reject("it names no bundled asset", f"write `{{name}} = '{S.BUNDLED_SCHEME}NAME'`")
    return text


CHECKS: dict[str, Check] = {
    "pretrained_model_name_or_path": Check("None or a non-empty string (HF id or local path)",
                                           "org/model", OPT_TEXT.run),
    "tokenizer_name_or_path": Check("None or a non-empty string (HF id, local path or packtune://NAME)",
                                    "packtune://mistral-v1", _bundled_or_text),
    "trust_remote_code": BOOL,
    "dtype": CHOICE(S.DTYPES),
    "use_varlen_attn": BOOL,
    "attn_backend": CHOICE(S.ATTN_BACKENDS),
    "gradient_checkpointing": BOOL,
    "dataset": Check("a non-empty string (HF id, local path or packtune://NAME) or a non-empty list of them",
                     "tatsu-lab/alpaca", _dataset),
    "dataset_format": CHOICE(S.DATASET_FORMATS),
    "dataset_split": TEXT,
    "dataset_streaming": BOOL,
    "max_samples": OPTIONAL(INT(1)),
    "prompt_template": CHOICE(S.PROMPT_TEMPLATES),
    "system_prompt": Check("None or a string", None, _any_str),
    "train_on_reasoning": BOOL,
    "max_length": INT(2),
    "pack_to_max_length": BOOL,
    "pack_strategy": CHOICE(S.PACK_STRATEGIES),
    "shuffle_before_pack": BOOL,
    "overflow": CHOICE(S.OVERFLOW_POLICIES),
    "on_bad_row": CHOICE(S.BAD_ROW_POLICIES),
    "num_proc": OPTIONAL(INT(1)),
    "data_cache_dir": OPT_TEXT,
    "batch_size": INT(1),
    "accumulative_counts": INT(1),
    "sequence_parallel_size": INT(1),
    "max_epochs": INT(1),
    "max_steps": OPTIONAL(INT(1)),
    "lr": NUMBER(0, 1, low_open=True, example=2e-5),
    "betas": Check("a pair of numbers in [0, 1)", (0.9, 0.999), _betas),
    "weight_decay": NUMBER(0, example=0.0),
    "max_norm": NUMBER(0, low_open=True, example=1.0),
    "warmup_ratio": NUMBER(0, 1, example=0.03),
    "loss_reduction": CHOICE(S.LOSS_REDUCTIONS),
    "loss_chunk_size": OPTIONAL(INT(1)),
    "on_nonfinite_loss": CHOICE(S.NONFINITE_LOSS_POLICIES),
    "balance_attention": BOOL,
    "save_steps": INT(1),
    "save_total_limit": INT(1),
    "log_steps": INT(1),
    "evaluation_freq": INT(1),
    "evaluation_inputs": Check("a list of non-empty strings", [], _text_list),
    "max_new_tokens": INT(1),
    "seed": INT(0),
    "method": CHOICE(S.METHODS),
    "dpo_loss": CHOICE(S.DPO_LOSSES),
    "beta": NUMBER(0, low_open=True, example=0.1),
    "simpo_gamma": NUMBER(0, example=0.5),
    "ref_model": OPT_TEXT,
    "precompute_ref_log_probs": BOOL,
    "center_rewards_coefficient": OPTIONAL(NUMBER(0, example=0.01)),
}

LORA_CHECKS: dict[str, Check] = {
    "r": INT(1),
    "alpha": INT(1),
    "dropout": NUMBER(0, 1, example=0.05),
    "target_modules": Check("'all-linear' or a non-empty list of module names", "all-linear",
                            lambda v: v if v == "all-linear" else _nonempty(_text_list(v))),
    "quantization": CHOICE(S.LORA_QUANTIZATION),
}


def _fix_for(name: str, value: Any, check: Check, default: Any, hint: str) -> str:
    """What to write instead: the unquoted literal, the int, or an example value."""
    if hint:
        return hint.replace("{name}", name)
    if isinstance(value, str):
        word = {"true": "True", "false": "False", "none": "None"}.get(value.strip().lower(), value)
        try:
            parsed = ast.literal_eval(word)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            parsed = MISSING
        if parsed is not MISSING and not isinstance(parsed, str) and check.accepts(parsed):
            return f"write `{name} = {parsed!r}` (without quotes)"
    if check is BOOL and _is_int(value) and value in (0, 1):
        return f"write `{name} = {bool(value)}` (a bool, not an int)"
    if isinstance(value, float) and value.is_integer() and check.accepts(int(value)):
        return f"write `{name} = {int(value)}` (an int, not a float)"
    example = default if check.accepts(default) else check.example
    return f"set `{name}` to {check.expected}, e.g. `{name} = {example!r}`"


def _check_value(name: str, value: Any, check: Check, default: Any, problems: list[Problem]) -> Any:
    """Run ``check``; on failure record a Problem and return ``MISSING``."""
    try:
        return check.run(value)
    except _Reject as bad:
        where = f"; {bad.detail}" if bad.detail else ""
        problems.append(Problem(name, f"`{name}` must be {check.expected}, got {show(value)}{where}",
                                _fix_for(name, value, check, default, bad.fix)))
        return MISSING


def unknown_name(name: str, known: Iterable[str], what: str = "setting") -> Problem:
    """An unknown setting, with a did-you-mean or the XTuner name it came from."""
    if what == "setting" and name in XTUNER_NAMES:
        return Problem(name, f"unknown setting `{name}` (an XTuner name)", XTUNER_NAMES[name])
    if what == "setting" and name in WIRING:
        return Problem(name, f"unknown setting `{name}`: packtune configs hold settings, not wiring",
                       f"remove `{name}` (packtune builds the model, data and loop from the settings), "
                       "or name it `_" + name + "` to keep it as a private helper")
    near = closest(name, known)
    if near:
        return Problem(name, f"unknown {what} `{name}`; did you mean `{near[0]}`?", f"rename it `{near[0]}`")
    if what == "setting":
        return Problem(name, f"unknown setting `{name}`",
                       "remove it, or start its name with `_` if it is a private helper "
                       "(packtune list-cfg and copy-cfg show the known settings)")
    return Problem(name, f"unknown {what} `{name}`", f"remove it; known keys: {', '.join(known)}")


def _check_lora(value: Any, problems: list[Problem]) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append(Problem("lora", f"`lora` must be None (full fine-tuning) or a dict, got {show(value)}",
                                "write `lora = None`, or `lora = dict(r=8, alpha=16)` for LoRA"))
        return MISSING
    ok = True
    out = dict(S.LORA_DEFAULTS)
    for key, v in value.items():
        if key not in S.LORA_DEFAULTS:
            p = unknown_name(str(key), S.LORA_DEFAULTS, what="lora key")
            problems.append(Problem(f"lora.{key}", p.message, p.fix))
            ok = False
            continue
        checked = _check_value(f"lora['{key}']", v, LORA_CHECKS[key], S.LORA_DEFAULTS[key], problems)
        if checked is MISSING:
            ok = False
        else:
            out[key] = checked
    return out if ok else MISSING


def _check_model_config(value: Any, problems: list[Problem]) -> Any:
    if value is None:
        return None
    example = "dict(model_type='llama', hidden_size=128, num_hidden_layers=2, ...)"
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        problems.append(Problem("model_config", f"`model_config` must be None or a dict with string keys, got {show(value)}",
                                f"write `model_config = {example}`"))
        return MISSING
    model_type = value.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        problems.append(Problem("model_config", "`model_config` has no `model_type` (it says which architecture to build)",
                                f"add it, e.g. `model_config = {example}`"))
        return MISSING
    known = _model_types()
    if known and model_type not in known:
        near = closest(model_type, known)
        hint = f"did you mean {near[0]!r}? " if near else ""
        problems.append(Problem("model_config", f"`model_config['model_type']` {model_type!r} is not a transformers architecture",
                                f"{hint}use a model_type of transformers.AutoConfig, e.g. 'llama', 'mistral', 'qwen2'"))
        return MISSING
    return dict(value)


def _model_types() -> frozenset[str]:
    # A plain name table; importing it does not build any model. Empty if transformers is absent.
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        return frozenset()
    return frozenset(CONFIG_MAPPING_NAMES)


def _combinations(v: Mapping[str, Any], problems: list[Problem], defaults: Mapping[str, Any]) -> None:
    """Rules across settings; a rule runs only when all its settings passed their checks."""

    def ok(*names: str) -> bool:
        return all(v.get(n, MISSING) is not MISSING for n in names)

    def add(key: str, message: str, fix: str) -> None:
        problems.append(Problem(key, message, fix))

    if ok("use_varlen_attn", "pack_to_max_length"):
        if v["use_varlen_attn"] and not v["pack_to_max_length"]:
            add("use_varlen_attn", "`use_varlen_attn = True` needs packed rows, but `pack_to_max_length = False`",
                "set `pack_to_max_length = True`, or `use_varlen_attn = False`")
        if v["pack_to_max_length"] and not v["use_varlen_attn"]:
            add("pack_to_max_length",
                "`pack_to_max_length = True` with `use_varlen_attn = False` lets packed samples attend to "
                "each other (a silent cross-sample leak)",
                "set `use_varlen_attn = True`, or `pack_to_max_length = False` for models without varlen support")
    if ok("pretrained_model_name_or_path", "model_config"):
        path, mcfg = v["pretrained_model_name_or_path"], v["model_config"]
        if path is not None and mcfg is not None:
            add("model_config", "both `pretrained_model_name_or_path` and `model_config` are set: which model?",
                "keep `pretrained_model_name_or_path` to fine-tune a model, or `model_config` (and "
                "`pretrained_model_name_or_path = None`) to train a randomly initialised one")
        if path is None and mcfg is None:
            add("pretrained_model_name_or_path", "no model: `pretrained_model_name_or_path` and `model_config` are both None",
                "set `pretrained_model_name_or_path = 'org/model'` (HF id or local path), or "
                "`model_config = dict(model_type=..., ...)` for a randomly initialised model")
        if mcfg is not None and path is None and ok("tokenizer_name_or_path") and v["tokenizer_name_or_path"] is None:
            add("tokenizer_name_or_path", "`model_config` builds a randomly initialised model, which has no tokenizer",
                "set `tokenizer_name_or_path`, e.g. 'packtune://mistral-v1' (bundled, vocab 32000)")
        if mcfg is not None and ok("max_length"):
            mpe = mcfg.get("max_position_embeddings")
            if _is_int(mpe) and mpe < v["max_length"]:
                add("model_config", f"`model_config['max_position_embeddings']` is {mpe}, shorter than `max_length = {v['max_length']}`",
                    f"set `max_position_embeddings` to at least {v['max_length']}, or lower `max_length`")
    if ok("sequence_parallel_size", "use_varlen_attn", "model_config") and v["sequence_parallel_size"] > 1:
        _check_sequence_parallel(v["sequence_parallel_size"], v["use_varlen_attn"], v["model_config"], add)
    if ok("pack_strategy", "pack_to_max_length") and v["pack_strategy"] == "concat" and not v["pack_to_max_length"]:
        add("pack_strategy", "`pack_strategy = 'concat'` cuts the token stream into packed rows, but `pack_to_max_length = False`",
            "set `pack_to_max_length = True` (with `use_varlen_attn = True`), or `pack_strategy = 'bfd'`")
    preference_problems(v, ok, add, defaults)
    if ok("lora", "model_config") and v["lora"] and v["lora"]["quantization"] and v["model_config"] is not None:
        add("lora", "`lora['quantization']` (QLoRA) quantizes pretrained weights at load time; a random-init "
            "`model_config` has none", "set `lora['quantization'] = None`, or fine-tune a pretrained model")


def _check_sequence_parallel(size: int, varlen: bool, model_config: dict | None, add) -> None:
    """``sequence_parallel_size > 1`` needs varlen rows and query heads it divides (known here
    for a ``model_config``; a pretrained model's heads are checked when it is loaded)."""
    if not varlen:
        add("sequence_parallel_size", f"`sequence_parallel_size = {size}` shards packed varlen rows, but `use_varlen_attn = False`",
            "set `use_varlen_attn = True` (with `pack_to_max_length = True`), or `sequence_parallel_size = 1`")
    heads = (model_config or {}).get("num_attention_heads", (model_config or {}).get("n_head"))
    problem = heads_problem(size, heads) if _is_int(heads) and heads > 0 else None
    if problem:
        add("sequence_parallel_size", f"`model_config`: {problem}",
            "set `sequence_parallel_size` to one of those (that also divides the number of processes)")


def check_values(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """Validate ``raw`` (setting name -> value) against the settings ``defaults`` names (every
    setting -> its default, ``MISSING`` for a required one); missing names take their defaults.

    Returns the normalised values (complete: every field) and every problem found; the values
    are only meaningful when the problem list is empty.
    """
    problems: list[Problem] = []
    names = tuple(defaults)
    for name in raw:
        if name not in defaults:
            problems.append(unknown_name(name, names))
    if "dataset" not in raw:
        problems.append(Problem("dataset", "`dataset` is not set (it is required)",
                                "set `dataset = 'tatsu-lab/alpaca'` (HF id, local path(s), or packtune://NAME)"))
    values: dict[str, Any] = {}
    for name in names:
        if name not in raw:
            values[name] = defaults[name]
            continue
        value = raw[name]
        if name == "lora":
            values[name] = _check_lora(value, problems)
        elif name == "model_config":
            values[name] = _check_model_config(value, problems)
        else:
            values[name] = _check_value(name, value, CHECKS[name], None if defaults[name] is MISSING else defaults[name], problems)
    _combinations(values, problems, defaults)
    return values, problems
