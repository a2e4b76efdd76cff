"""The one exception type commands raise for problems the user can fix."""

from __future__ import annotations


class CliError(Exception):
    """A user-facing error.

    ``packtune.cli.main`` prints it as one line, ``packtune <command>: error: <message>``, and
    exits with ``exit_code`` (2 by default, as for a usage error). No traceback unless
    ``--debug``.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
