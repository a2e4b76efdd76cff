"""``packtune log-dataset CONFIG [--show N] [--plot FILE.png]``: what the data pipeline makes
of a config's dataset.

Builds (or loads from the cache) the packed dataset exactly as ``train`` would, and prints
the report: rows read, skipped per reason (with the first such row and why, e.g. the chat
template's own error), tokens, truncated, dropped, packs, utilization, documents per pack and
tokenization speed. ``--show N`` prints the first N packs decoded, under a legend, with the
trained text marked (``«...»``, or green on a terminal): the way to check by eye what a new chat
template trains (each reply through its end-of-turn token, no user text); ``--plot`` writes a PNG of
the packs' document layout, one pack's causal and block-diagonal varlen masks, and a
histogram of the sample lengths.
"""

from __future__ import annotations

import argparse
import json
import sys

from packtune.cli import add_config_arguments
from packtune.cli.errors import CliError

HELP = "Show what the data pipeline makes of a config's dataset: counts, packs, decoded rows, a picture."
EXAMPLES = """\
packtune log-dataset tiny_mistral_full_demo
packtune log-dataset tiny_mistral_full_demo --show 2          # the first 2 packs, trained text in «...»
packtune log-dataset my_config.py --show 1 --max-chars 2000    # check what a new chat template trains
packtune log-dataset my_config.py --plot packs.png            # layout, varlen mask, length histogram
packtune log-dataset my_config.py --cfg-options max_length=1024 pack_strategy=sequential
python -m packtune log-dataset my_config.py --json            # the report as JSON
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG``, ``--cfg-options``, ``--show N``, ``--plot FILE``, ``--max-chars``, ``--json``."""
    add_config_arguments(parser)
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print the first N packs decoded, trained text in «...» (green on a terminal) "
                             "apart from context, under a legend")
    parser.add_argument("--max-chars", type=int, default=None, metavar="C",
                        help="with --show: cut each document's text after C characters")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="write a PNG: document layout of the first packs, the causal vs varlen "
                             "mask of one pack, and a histogram of sample lengths")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")


def run(args: argparse.Namespace) -> int:
    """Build the dataset of ``args.config`` and print what it holds."""
    from packtune.config import load_settings
    from packtune.data import DataError, DataOptions, format_report, load_tokenizer, show_packs
    from packtune.preference.data import dataset_builder  # pairs when method != 'sft'

    if args.show < 0:
        raise CliError(f"--show must be >= 0, got {args.show}")
    if args.max_chars is not None and args.max_chars < 1:
        raise CliError(f"--max-chars must be >= 1, got {args.max_chars}")
    settings = load_settings(args.config, list(getattr(args, "cfg_options", None) or []))
    name = getattr(settings, "tokenizer_name_or_path", None) or getattr(settings, "pretrained_model_name_or_path", None)
    if not name:
        raise CliError("the config names no tokenizer: set tokenizer_name_or_path (or pretrained_model_name_or_path)")
    try:
        tokenizer = load_tokenizer(name, trust_remote_code=bool(getattr(settings, "trust_remote_code", False)))
        dataset = dataset_builder(settings.method)(DataOptions.from_settings(settings), tokenizer)
    except DataError as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        print(json.dumps(dataset.report.as_dict(), indent=1))
    else:
        print(format_report(dataset.report))
    if args.show:
        print()
        print(show_packs(dataset, args.show, tokenizer, color=sys.stdout.isatty(), max_chars=args.max_chars))
    if args.plot:
        from packtune.data.plot import plot_packs

        try:
            path = plot_packs(dataset, args.plot)
        except OSError as exc:
            raise CliError(f"cannot write {args.plot}: {exc}") from exc
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0
