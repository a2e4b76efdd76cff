"""The DeepSpeed config of a run: a built-in JSON or the user's, its ``"auto"`` values filled.

``--deepspeed NAME`` picks a built-in JSON (``deepspeed_zero1``, ``deepspeed_zero2``,
``deepspeed_zero3``, ``deepspeed_zero2_offload``, ``deepspeed_zero3_offload``, shipped in
``packtune/configs/deepspeed/``); anything else is a path to the user's JSON. ``"auto"``
values are filled from the config:

=================================  ===================================================
``train_micro_batch_size_per_gpu``  ``batch_size``
``gradient_accumulation_steps``     ``accumulative_counts``
``train_batch_size``                micro batch x accumulation x processes
``gradient_clipping``               ``max_norm``
``fp16.enabled`` / ``bf16.enabled`` the compute dtype (``dtype``)
``reduce_bucket_size`` and the      from the model's hidden size, as Hugging Face's
ZeRO-3 bucket/threshold sizes       Trainer does
=================================  ===================================================

The batch geometry is the recipe's (``StepPlan``): an explicit micro batch or accumulation in
the JSON that disagrees with the config is an error, not a silent second opinion. Nothing here
imports DeepSpeed beyond checking that it is installed (``require_deepspeed``), so the command
line can check ``--deepspeed`` before any model is loaded.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import torch

from packtune.config.settings import Settings

INSTALL_HINT = "--deepspeed needs DeepSpeed, which is not installed: pip install 'packtune[deepspeed]' (or pip install deepspeed)"

BUILTIN = (
    "deepspeed_zero1",
    "deepspeed_zero2",
    "deepspeed_zero3",
    "deepspeed_zero2_offload",
    "deepspeed_zero3_offload",
)
#: ``packtune/configs/deepspeed/``
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "deepspeed")


def require_deepspeed():
    """``import deepspeed``, or an ``ImportError`` whose message says how to install it."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError(INSTALL_HINT)
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} (importing it failed: {exc})") from exc
    return deepspeed


def builtin_path(name: str) -> str | None:
    """The JSON of built-in config ``name`` (``deepspeed_zero2`` or ``deepspeed_zero2.json``)."""
    stem = name[:-5] if name.endswith(".json") else name
    if stem in BUILTIN:
        return os.path.join(CONFIG_DIR, stem + ".json")
    return None


def resolve_deepspeed_config(name_or_path: str | dict) -> dict:
    """The DeepSpeed config dict for a built-in name, a JSON path, or a dict (copied).

    Also checks that DeepSpeed is installed, so ``packtune train --deepspeed ...`` fails in
    one line before any model is loaded. Raises ``ImportError``, ``FileNotFoundError`` or
    ``ValueError`` with a message meant for the user.
    """
    require_deepspeed()
    if isinstance(name_or_path, dict):
        return copy.deepcopy(name_or_path)
    # A built-in name wins over a path of the same name: `--work-dir deepspeed_zero2
    # --deepspeed deepspeed_zero2` names the built-in config, not the work dir.
    path = builtin_path(name_or_path) or name_or_path
    if not os.path.isfile(path):
        what = "a directory, " if os.path.isdir(path) else ""
        raise FileNotFoundError(
            f"--deepspeed {name_or_path}: {what}not a built-in config ({', '.join(BUILTIN)}) nor a JSON file"
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--deepspeed {path}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed {path}: the JSON must be an object, got {type(config).__name__}")
    return config


def _is_auto(value) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def _fill_geometry(config: dict, key: str, want: int, problems: list[str], what: str) -> None:
    value = config.get(key, "auto")
    if _is_auto(value):
        config[key] = want
    elif value != want:
        problems.append(f'"{key}": {value} disagrees with {what} = {want}; set it to "auto" (or to {want})')


def fill_auto(config: dict, *, micro_batch: int, accumulation: int, world_size: int, max_norm: float,
              dtype: torch.dtype, hidden_size: int | None = None) -> dict:
    """A copy of ``config`` with every ``"auto"`` replaced by the value packtune uses.

    >>> c = fill_auto({"train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"}},
    ...               micro_batch=2, accumulation=4, world_size=8, max_norm=1.0, dtype=torch.bfloat16)
    >>> c["train_batch_size"], c["gradient_accumulation_steps"], c["gradient_clipping"], c["bf16"]["enabled"]
    (64, 4, 1.0, True)
    """
    config = copy.deepcopy(config)
    problems: list[str] = []
    _fill_geometry(config, "train_micro_batch_size_per_gpu", micro_batch, problems, "batch_size")
    _fill_geometry(config, "gradient_accumulation_steps", accumulation, problems, "accumulative_counts")
    _fill_geometry(config, "train_batch_size", micro_batch * accumulation * world_size, problems,
                   "batch_size x accumulative_counts x processes")
    if _is_auto(config.get("gradient_clipping", "auto")):
        config["gradient_clipping"] = float(max_norm)
    for key, half in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        section = config.setdefault(key, {})
        if _is_auto(section.get("enabled", "auto")):
            section["enabled"] = dtype == half
    if config["fp16"]["enabled"] and config["bf16"]["enabled"]:
        problems.append('"fp16" and "bf16" are both enabled; enable at most one')
    zero = config.get("zero_optimization", {})
    sizes = {
        "reduce_bucket_size": lambda h: h * h,
        "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    for key, size in sizes.items():
        if _is_auto(zero.get(key)):
            if hidden_size:
                zero[key] = size(hidden_size)
            else:
                del zero[key]  # DeepSpeed's default
    left = sorted(_auto_keys(config))
    if left:
        problems.append(f"packtune cannot fill these \"auto\" values: {', '.join(left)}; give numbers")
    if problems:
        raise ValueError("DeepSpeed config: " + "; ".join(problems))
    return config


def run_config(deepspeed_config: str | dict | None, settings: Settings, world_size: int, dtype: torch.dtype,
               hidden_size: int | None) -> dict:
    """The DeepSpeed config of a run: ``--deepspeed`` (default ``deepspeed_zero2``) with every
    ``"auto"`` filled from the settings (``fill_auto``)."""
    return fill_auto(
        resolve_deepspeed_config(deepspeed_config or "deepspeed_zero2"),
        micro_batch=settings.batch_size,
        accumulation=settings.accumulative_counts,
        world_size=world_size,
        max_norm=settings.max_norm,
        dtype=dtype,
        hidden_size=hidden_size,
    )


def _auto_keys(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _auto_keys(value, f"{prefix}{key}.")
    elif _is_auto(node):
        yield prefix.rstrip(".")


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))
