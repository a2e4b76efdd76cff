"""``packtune list-cfg [-p PATTERN]``: the names of the built-in configs, one a line."""

from __future__ import annotations

import argparse

from packtune.cli.errors import CliError
from packtune.config import list_configs

HELP = "List the built-in configs (names containing PATTERN with -p), one per line, sorted."
EXAMPLES = """\
packtune list-cfg
packtune list-cfg -p tiny        # tiny models that train offline on a CPU in minutes
packtune list-cfg -p qwen2_5
packtune list-cfg -p internlm    # InternLM 1 and 2, through packtune's native ports
packtune list-cfg -p lora_alpaca
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``-p/--pattern``."""
    parser.add_argument("-p", "--pattern", default=None,
                        help="show only names containing PATTERN (case-insensitive)")


def run(args: argparse.Namespace) -> int:
    """Print the matching names; no match is an error (exit 1) so scripts notice."""
    names = list_configs(args.pattern)
    if not names:
        # Exit 1, not 2: the command line was fine, the search found nothing.
        raise CliError(f"no built-in config name contains {args.pattern!r} "
                       f"(run 'packtune list-cfg' to see all {len(list_configs())})", exit_code=1)
    print("\n".join(names))
    return 0
