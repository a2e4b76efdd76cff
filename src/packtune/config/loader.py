"""Config files: find them in the catalog, run them, apply ``--cfg-options``, write them back.

A built-in config (``list_configs()``) is a name anywhere a config path is accepted; its text is
rendered from the catalog table (``packtune.config.catalog``).

A config file is Python whose module-level assignments are the settings. Loading runs it in a
fresh namespace and keeps every name that does not start with ``_`` and is not a module,
function or class, so a config may import helpers and keep private variables (``_base``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import runpy
import traceback
from pathlib import Path
from typing import Any

from packtune.config import settings as S
from packtune.config.catalog import catalog_names, render_config
from packtune.config.settings import FIELD_NAMES, ConfigError, Problem, Settings, check_settings, setting_defaults

def list_configs(pattern: str | None = None) -> list[str]:
    """Names of the built-in configs containing ``pattern`` (case-insensitive), sorted."""
    names = catalog_names()
    if pattern:
        names = [n for n in names if pattern.lower() in n.lower()]
    return names


def closest_configs(name: str, n: int = 3) -> list[str]:
    """Built-in config names nearest to ``name``: those containing all its parts, then difflib."""
    names = list_configs()
    parts = [p for p in name.lower().replace("-", "_").split("_") if p]
    # Most similar first: "internlm_7b_ful..." means internlm_7b_full... more than internlm2_7b_full...
    containing = sorted((c for c in names if parts and all(p in c for p in parts)),
                        key=lambda c: -difflib.SequenceMatcher(None, name.lower(), c).ratio())
    fuzzy = difflib.get_close_matches(name.lower(), names, n=n, cutoff=0.5)
    out = []
    for c in [*containing, *fuzzy]:
        if c not in out:
            out.append(c)
    return out[:n]


def find_config(name: str) -> str:
    """The built-in config called ``name`` (a trailing ``.py`` is allowed): its canonical name.

    Raises ``ConfigError`` naming the closest built-in configs.
    """
    stem = name[:-3] if name.endswith(".py") else name
    if stem in list_configs():
        return stem
    near = closest_configs(stem)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise ConfigError([Problem("config", f"no built-in config named {name!r}",
                               f"{hint}run `packtune list-cfg` to see them all")])


def config_source(name: str) -> str:
    """The settings file of built-in config ``name``, as ``packtune copy-cfg`` writes it."""
    return render_config(find_config(name))


def _is_setting(name: str, value: Any) -> bool:
    # Modules, functions and classes are tools the file used, not settings.
    return not name.startswith("_") and not (
        inspect.ismodule(value) or inspect.isroutine(value) or inspect.isclass(value))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Run config file ``path`` and return its settings (unvalidated), in file order.

    Raises ``ConfigError`` when the file is missing or raises while running.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([Problem("config", f"config file {str(path)!r} does not exist",
                                   "check the path, or pass a built-in config name (packtune list-cfg)")])
    return _run_config(lambda: runpy.run_path(str(path), run_name="__packtune_config__"), str(path),
                       lambda filename: Path(filename).resolve() == path.resolve())


def read_builtin_config(name: str) -> dict[str, Any]:
    """The settings (unvalidated) of built-in config ``name``: its rendered file, run."""
    where = f"<built-in config {find_config(name)}>"
    code = compile(config_source(name), where, "exec")
    namespace: dict[str, Any] = {"__name__": "__packtune_config__"}
    return _run_config(lambda: exec(code, namespace) or namespace, where, lambda filename: filename == where)


def _run_config(run: Any, where: str, is_config_frame: Any) -> dict[str, Any]:
    """The settings a config leaves in its namespace (``run()``); errors name the config's line."""
    try:
        namespace = run()
    except SyntaxError as exc:
        raise ConfigError([Problem("config", f"{where}:{exc.lineno}: SyntaxError: {exc.msg}",
                                   "fix the Python syntax on that line")]) from exc
    except Exception as exc:
        line = next((f.lineno for f in reversed(traceback.extract_tb(exc.__traceback__))
                     if is_config_frame(f.filename)), None)
        at = f"{where}:{line}" if line else where
        raise ConfigError([Problem("config", f"{at}: running the config raised {type(exc).__name__}: {exc}",
                                   "fix that line; a config is plain assignments of settings")]) from exc
    return {k: v for k, v in namespace.items() if _is_setting(k, v)}


def parse_value(text: str) -> Any:
    """A ``--cfg-options`` value: a Python literal when it parses as one, else the raw string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[Problem]:
    """Apply ``KEY=VALUE`` strings to ``raw`` in place; return the problems with the options.

    ``lora.r=16`` sets a key inside a dict setting (any depth). Unknown top-level keys are left
    for validation, which reports them with a did-you-mean.
    """
    problems = []
    defaults = {k: v for k, v in setting_defaults().items() if v is not dataclasses.MISSING}
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append(Problem("cfg-options", f"option {item!r} is not KEY=VALUE",
                                    "write it as KEY=VALUE, e.g. `--cfg-options lr=1e-4 lora.r=16`"))
            continue
        path = key.split(".")
        if any(not p for p in path):
            problems.append(Problem("cfg-options", f"option key {key!r} has an empty part",
                                    "write dotted keys as `lora.r=16`"))
            continue
        target: Any = raw
        for depth, part in enumerate(path[:-1]):
            # A setting the file leaves out has its default (None for lora and model_config).
            current = target.get(part, defaults.get(part) if depth == 0 else None)
            if current is None and depth == 0 and part == "lora":
                problems.append(Problem(key, f"`{key}` needs LoRA, but this config has `lora = None` (full fine-tuning)",
                                        f"turn LoRA on with `--cfg-options \"lora={{'{path[-1]}': {text}}}\"`, or drop the option"))
                break
            # Unknown names get a dict too, so validation reports them with a did-you-mean.
            if current is None and (depth > 0 or part == "model_config" or part not in FIELD_NAMES):
                current = {}
            if not isinstance(current, dict):
                dotted = ".".join(path[: depth + 1])
                problems.append(Problem(key, f"`{dotted}` is {current!r}, not a dict, so `{key}` cannot be set",
                                        f"set `{dotted}` as a whole, e.g. `--cfg-options {dotted}=...`"))
                break
            # Copy so the file's own objects (shared between names) are never mutated.
            current = target[part] = dict(current)
            target = current
        else:
            target[path[-1]] = parse_value(text)
    return problems


def load_settings(name_or_path: str, overrides: list[str] | None = None) -> Settings:
    """Load, override and validate a config: a built-in name or a path to a ``.py`` file.

    Raises ``ConfigError`` with every problem (file, options and settings) at once. Nothing is
    loaded besides the config file itself: no model, tokenizer or data.
    """
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    # File problems (missing, syntax) name the file themselves: one line, no header.
    if candidate.is_file() or text.endswith(".py") or "/" in text or os.sep in text:
        raw = read_config_file(candidate)  # a path that does not exist is reported there
    else:
        raw = read_builtin_config(text)
    problems = apply_overrides(raw, list(overrides or []))
    values, more = check_settings(raw)
    problems += more
    if problems:
        raise ConfigError(problems, str(candidate) if candidate.is_file() else text)
    return Settings(**values)


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    """Every setting as plain, JSON-serialisable Python values (tuples become lists).

    ``Settings(**settings_to_dict(s)) == s``.
    """
    out = dataclasses.asdict(settings)
    out["betas"] = list(out["betas"])
    return out


def format_value(value: Any) -> str:
    """A setting as Python source: dicts as ``dict(k=v)``, long lists one item a line."""
    if isinstance(value, dict) and all(isinstance(k, str) and k.isidentifier() for k in value):
        return "dict(" + ", ".join(f"{k}={format_value(v)}" for k, v in value.items()) + ")"
    if isinstance(value, list) and len(repr(value)) > 80:
        return "[\n" + "".join(f"    {format_value(v)},\n" for v in value) + "]"
    return repr(value)


def settings_to_source(settings: Settings, title: str = "") -> str:
    """A complete config file for ``settings``, in the five-part layout; loads back equal.

    For example from the ``settings`` a checkpoint's meta records (``settings_to_dict``).
    """
    lines = [f'"""{title}"""' if title else '"""Settings of a packtune run (every setting, defaults included)."""', ""]
    by_part: dict[int, list[dataclasses.Field]] = {}
    for f in dataclasses.fields(Settings):
        by_part.setdefault(f.metadata["part"], []).append(f)
    for number, part in enumerate(S.PARTS, start=1):
        bar = "#" * 72
        lines += [bar, f"#{f'PART {number}  {part}':^70}#", bar]
        for f in by_part.get(number, []):
            lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{f.name} = {format_value(getattr(settings, f.name))}")
        lines.append("")
    return "\n".join(lines)
