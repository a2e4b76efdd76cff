"""The error the data pipeline raises for bad input: ``DataError``."""

from __future__ import annotations


class DataError(ValueError):
    """Input the pipeline cannot use: a file that does not parse (named with its line), a bad
    row under ``on_bad_row="error"`` (named with its file and line), an unknown format or
    template name (listing the known ones), a dataset that does not exist."""
