"""``packtune copy-cfg NAME DIR``: write built-in config NAME to ``DIR/NAME_copy.py`` to edit.

The file is the catalog entry rendered as a readable settings file (``config_source``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from packtune.cli.errors import CliError
from packtune.config import ConfigError, config_source, find_config

HELP = "Copy built-in config NAME to DIR/NAME_copy.py (DIR is created), to edit and train with."
EXAMPLES = """\
packtune copy-cfg tiny_mistral_full_demo .
packtune copy-cfg llama2_7b_lora_alpaca_e3 ./my_configs
packtune copy-cfg internlm_7b_full_oasst1_e3 .        # -> ./internlm_7b_full_oasst1_e3_copy.py
packtune copy-cfg qwen2_5_7b_instruct_full_oasst1_e3 . --force   # overwrite an earlier copy
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``NAME DIR [--force]``."""
    parser.add_argument("name", metavar="NAME", help="a built-in config name (see packtune list-cfg)")
    parser.add_argument("dir", metavar="DIR", help="folder to write NAME_copy.py into (created if missing)")
    parser.add_argument("--force", action="store_true", help="overwrite DIR/NAME_copy.py if it exists")


def run(args: argparse.Namespace) -> int:
    """Write the file; print where it went and what to run next."""
    try:
        name = find_config(args.name)
    except ConfigError as exc:
        raise CliError(str(exc.problems[0])) from exc
    folder = Path(args.dir).expanduser()
    dest = folder / f"{name}_copy.py"
    if folder.exists() and not folder.is_dir():
        raise CliError(f"{str(folder)!r} is a file, not a folder; give a folder for DIR")
    # Refuse to clobber a copy the user may have edited; --force says they mean it.
    if dest.exists() and not args.force:
        raise CliError(f"{str(dest)!r} already exists; pass --force to overwrite it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        dest.write_text(config_source(name), encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot write {str(dest)!r}: {exc.strerror or exc}") from exc
    print(f"Copied {name} to {dest}")
    print(f"Next: edit it, then run 'packtune train {dest}'")
    return 0
