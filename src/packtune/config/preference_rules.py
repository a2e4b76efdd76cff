"""Config rules of the preference settings (``method``, ``dpo_loss``, ``beta``, ...).

Called by ``packtune.config.validate`` with the checked values and the settings' defaults; no torch needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

#: Methods that train on preference pairs, and those that need a reference model.
PAIR_METHODS = ("dpo", "simpo", "orpo", "reward")
REFERENCE_METHODS = ("dpo",)
#: Which method uses each setting (a non-default value under another method is a mistake).
USED_BY: dict[str, tuple[str, ...]] = {
    "dpo_loss": ("dpo",),
    "simpo_gamma": ("simpo",),
    "ref_model": ("dpo",),
    "precompute_ref_log_probs": ("dpo",),
    "beta": ("dpo", "simpo", "orpo"),
    "center_rewards_coefficient": ("reward",),
    "loss_reduction": ("sft", "orpo"),
}


def preference_problems(
    v: Mapping[str, Any], ok: Callable[..., bool], add: Callable[[str, str, str], None], defaults: Mapping[str, Any]
) -> None:
    """Add a problem (with its fix) for every preference setting that does not fit ``method``."""
    if not ok("method"):
        return
    method = v["method"]
    for name, users in USED_BY.items():
        if ok(name) and method not in users and v[name] != defaults[name]:
            which = " or ".join(f"'{m}'" for m in users)
            add(name, f"`{name} = {v[name]!r}` has no effect under `method = '{method}'` (only {which} uses it)",
                f"remove `{name}`, or set `method` to {which}")
    if ok("dataset_format"):
        fmt = v["dataset_format"]
        if method in PAIR_METHODS and fmt not in ("auto", "preference"):
            add("dataset_format", f"`method = '{method}'` trains on preference pairs, but `dataset_format = '{fmt}'` has none",
                "set `dataset_format = 'preference'` (or 'auto') and a dataset with prompt/chosen/rejected rows, "
                "or `method = 'sft'`")
        if method == "sft" and fmt == "preference":
            add("method", "`dataset_format = 'preference'` holds pairs, which `method = 'sft'` cannot train on",
                "set `method` to 'dpo', 'simpo', 'orpo' or 'reward'")
    if method in PAIR_METHODS and ok("use_varlen_attn", "pack_to_max_length"):
        if not (v["use_varlen_attn"] and v["pack_to_max_length"]):
            add("method", f"`method = '{method}'` trains pairs in packed varlen rows",
                "set `use_varlen_attn = True` and `pack_to_max_length = True`")
    if method == "reward" and ok("evaluation_inputs") and v["evaluation_inputs"]:
        add("evaluation_inputs", "`method = 'reward'` trains a sequence classifier, which generates no text",
            "set `evaluation_inputs = []`")
    if method in PAIR_METHODS and ok("pack_strategy") and v["pack_strategy"] == "concat":
        add("pack_strategy", f"`pack_strategy = 'concat'` cuts samples across rows; `method = '{method}'` never splits a pair",
            "set `pack_strategy = 'bfd'` or 'sequential'")
