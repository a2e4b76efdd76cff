"""packtune's command line (``packtune <command>``); see ``packtune.cli.main``.

Helpers shared by command modules live here so each command declares its config arguments
the same way.
"""

from __future__ import annotations

import argparse

from packtune.cli.errors import CliError

__all__ = ["CliError", "add_config_arguments"]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``CONFIG`` (a built-in name or a .py path) and ``--cfg-options KEY=VALUE ...``.

    Pass them on as ``load_settings(args.config, args.cfg_options)``.
    """
    parser.add_argument("config", metavar="CONFIG",
                        help="a built-in config name (see packtune list-cfg) or the path to a config .py file")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override settings of the config: VALUE is a Python literal or a plain string; "
                             "dotted keys set one key of a dict setting, e.g. lr=1e-4 lora.r=16 dataset=org/data")
