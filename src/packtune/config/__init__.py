"""Typed, validated settings for packtune runs, loaded from XTuner-style config files.

>>> from packtune.config import load_settings
>>> s = load_settings("tiny_mistral_full_demo", ["lr=5e-4", "lora.r=4"])  # doctest: +SKIP

``load_settings`` accepts a built-in config name (``list_configs()``) or a path to a ``.py``
file, applies ``--cfg-options`` style ``KEY=VALUE`` overrides, and returns a ``Settings`` or
raises ``ConfigError`` listing every problem with its fix. No model or data is touched.
"""

from packtune.config.loader import (
    apply_overrides,
    closest_configs,
    config_source,
    find_config,
    list_configs,
    load_settings,
    parse_value,
    read_builtin_config,
    read_config_file,
    settings_to_dict,
    settings_to_source,
)
from packtune.config.settings import LORA_DEFAULTS, ConfigError, Problem, Settings, check_settings

__all__ = [
    "LORA_DEFAULTS",
    "ConfigError",
    "Problem",
    "Settings",
    "apply_overrides",
    "check_settings",
    "closest_configs",
    "config_source",
    "find_config",
    "list_configs",
    "load_settings",
    "parse_value",
    "read_builtin_config",
    "read_config_file",
    "settings_to_dict",
    "settings_to_source",
]
