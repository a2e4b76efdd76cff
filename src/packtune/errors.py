"""Errors that end a run in one clear line (exit code 2), shared by the layers that raise them."""

from __future__ import annotations


class SetupError(RuntimeError):
    """The run cannot start as configured on this machine (one clear line, exit code 2)."""
