"""``packtune <command> ...``: dispatch to one module per command.

A command module (listed in ``COMMANDS``, imported only when needed) exposes:

``HELP``
    one line, shown in ``packtune --help`` and as the command's description.
``EXAMPLES``
    example invocations, one a line (a string, or a list of strings); shown in the command's
    ``--help`` and, the first two, in ``packtune --help``. Lines starting with ``#`` are comments.
``add_arguments(parser)``
    declares the command's arguments on its ``argparse`` parser.
``run(args) -> int``
    does the work; returns the exit code.

Errors are one line on stderr: ``CliError`` and usage errors exit 2, a ``ConfigError`` prints
its header and one line per problem (exit 2), anything unexpected prints its type and message
(exit 1). ``--debug`` adds the traceback. A worker started by torchrun also hands its error to
the launcher (``packtune.distributed.record_failure``), which ends the job with it.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from types import ModuleType

from packtune.cli.errors import CliError
from packtune.config import ConfigError

PROG = "packtune"

#: Command name -> module, in workflow order.
COMMANDS: dict[str, str] = {
    "list-cfg": "packtune.cli.list_cfg",
    "copy-cfg": "packtune.cli.copy_cfg",
    "train": "packtune.cli.train",
    "convert": "packtune.cli.convert",
    "chat": "packtune.cli.chat",
    "log-dataset": "packtune.cli.log_dataset",
}

DESCRIPTION = (
    "Fine-tune causal language models on packed rows with exact variable-length attention.\n\n"
    "workflow: list-cfg -> copy-cfg -> edit the copy (use_varlen_attn = True, ...) -> train\n"
    "          -> convert pth_to_hf -> chat"
)


class UsageError(Exception):
    """A command line argparse rejected: ``prog`` is the (sub)command's program name."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog
        self.message = message


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised (and printed by ``main`` as one line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(self.prog, message)


def is_available(name: str) -> bool:
    """Whether command ``name``'s module exists (commands are added by separate modules)."""
    try:
        return importlib.util.find_spec(COMMANDS[name]) is not None
    except (ImportError, ValueError):
        return False


def available_commands() -> list[str]:
    """Names of the commands whose modules exist, in workflow order."""
    return [name for name in COMMANDS if is_available(name)]


def examples(module: ModuleType) -> list[str]:
    """The module's ``EXAMPLES`` as a list of lines (blank lines dropped)."""
    raw = getattr(module, "EXAMPLES", "")
    lines = raw.splitlines() if isinstance(raw, str) else [str(x) for x in raw]
    return [line.strip() for line in lines if line.strip()]


def _epilog(lines: list[str]) -> str | None:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines) if lines else None


def _load(names: list[str], debug: bool) -> tuple[dict[str, ModuleType], dict[str, str]]:
    """Import the command modules; a module that fails to import is reported, not fatal."""
    modules, broken = {}, {}
    for name in names:
        try:
            modules[name] = importlib.import_module(COMMANDS[name])
        except Exception as exc:  # a broken command must not take --help of the others down
            if debug:
                traceback.print_exc()
            broken[name] = f"{type(exc).__name__}: {exc}"
    return modules, broken


def build_parser(modules: dict[str, ModuleType], broken: dict[str, str] | None = None
                 ) -> tuple[Parser, dict[str, Parser]]:
    """The top-level parser and one sub-parser per loaded command module."""
    lines = []
    for name, module in modules.items():
        lines.append(f"  {name:<12} {getattr(module, 'HELP', '')}")
        lines += [f"  {'':<12}   {ex}" for ex in examples(module)[:2]]
    for name, why in (broken or {}).items():
        lines.append(f"  {name:<12} (cannot be loaded: {why})")
    epilog = "commands:\n" + "\n".join(lines) + f"\n\nrun '{PROG} COMMAND --help' for a command's options and examples"
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=epilog,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser,
                                help="one of the commands below")
    parsers = {}
    for name, module in modules.items():
        p = sub.add_parser(name, description=getattr(module, "HELP", None), epilog=_epilog(examples(module)),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        # SUPPRESS: a sub-parser default must not reset `packtune --debug COMMAND` to False.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print tracebacks of errors")
        module.add_arguments(p)
        parsers[name] = p
    return parser, parsers


def _version() -> str:
    from packtune import __version__

    return __version__


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _say(prog: str, message: str) -> None:
    print(f"{prog}: error: {_one_line(message)}", file=sys.stderr)


def _report(prog: str, message: str, code: int) -> None:
    """Hand the error line to a torchrun parent, which ends the job with it (exit ``code``).

    Only a worker started by torchrun has ``TORCHELASTIC_ERROR_FILE``; there torch is loaded
    already, so importing ``packtune.distributed`` costs nothing.
    """
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from packtune.distributed import record_failure

        record_failure(f"{prog}: error: {_one_line(message)}", _one_line(message), code)


def _usage_message(exc: UsageError, modules: dict[str, ModuleType]) -> str:
    """argparse's message, with a did-you-mean for a mistyped command."""
    message = exc.message
    bad = re.match(r"argument COMMAND: invalid choice: '([^']*)'", message)
    if bad:
        word = bad.group(1)
        if word in COMMANDS:
            return f"command '{word}' is not available: its module {COMMANDS[word]} is not installed"
        near = difflib.get_close_matches(word, list(COMMANDS), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        return f"unknown command '{word}'; {hint}commands: {', '.join(modules)}"
    return f"{message} (see {exc.prog} --help)"


def _requested(argv: list[str]) -> str | None:
    """The command named on the line (the first word that is not an option), if any.

    None when top-level help is asked for first (``packtune --help train``): it lists them all.
    """
    for arg in argv:
        if arg in ("-h", "--help"):
            return None
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    """Run ``packtune`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    wanted = _requested(argv)
    # Import only the named command's module: `packtune train` need not import `chat`.
    names = [wanted] if wanted in COMMANDS and is_available(wanted) else available_commands()
    modules, broken = _load(names, debug)
    if wanted in broken:
        _say(f"{PROG} {wanted}", f"the command cannot be loaded: {broken[wanted]}")
        return 1
    parser, parsers = build_parser(modules, broken)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            # Blame the parser the stray word was given to: before the command, the top level.
            command = getattr(args, "command", None)
            before = command is None or argv.index(extra[0]) < argv.index(command)
            owner = parser if before else parsers[command]
            owner.error(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as exc:
        _say(exc.prog, _usage_message(exc, modules))
        return 2
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else 0
    debug = bool(getattr(args, "debug", False))
    args.argv = argv  # the command line as given, for commands that relaunch themselves
    if not args.command:
        _say(PROG, f"missing command; one of: {', '.join(modules)} (see {PROG} --help)")
        return 2
    prog = f"{PROG} {args.command}"
    try:
        return int(modules[args.command].run(args) or 0)
    except CliError as exc:
        if debug:
            traceback.print_exc()
        _say(prog, str(exc))
        _report(prog, str(exc), exc.exit_code)
        return exc.exit_code
    except ConfigError as exc:
        if debug:
            traceback.print_exc()
        if len(exc.problems) == 1 and not exc.source:
            _say(prog, str(exc.problems[0]))
            _report(prog, str(exc.problems[0]), 2)
        else:
            _say(prog, exc.header())
            for line in exc.lines():
                print(f"  - {_one_line(line)}", file=sys.stderr)
            _report(prog, f"{exc.header()} {'; '.join(exc.lines())}", 2)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # the reader of stdout left: main_entry exits quietly
    except Exception as exc:
        if debug:
            traceback.print_exc()
        hint = "" if debug else f" (run '{PROG} --debug {args.command} ...' for the traceback)"
        _say(prog, f"{type(exc).__name__}: {exc}{hint}")
        _report(prog, f"{type(exc).__name__}: {exc}{hint}", 1)
        return 1


def main_entry() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # `packtune list-cfg | head`: the reader left; exit quietly instead of a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    sys.exit(code)
