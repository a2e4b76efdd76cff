"""``DataOptions``: every setting of the data pipeline, with its default.

Its fields are the ``Settings`` fields named in ``DATA_SETTINGS``, derived from ``Settings``
(same names, types and defaults: nothing declared twice), so
``DataOptions.from_settings(settings)`` copies them over.

>>> opts = DataOptions(dataset="data.jsonl", max_length=512)
>>> opts.pack_strategy, opts.effective_strategy("alpaca"), opts.effective_strategy("text")
('bfd', 'bfd', 'concat')
"""

from __future__ import annotations

import dataclasses
from typing import Any

from packtune.config.settings import Settings

#: The settings the data pipeline reads: ``DataOptions`` has exactly these fields.
DATA_SETTINGS = (
    "dataset", "dataset_format", "dataset_split", "dataset_streaming", "max_samples", "prompt_template",
    "system_prompt", "train_on_reasoning", "max_length", "pack_to_max_length", "pack_strategy",
    "shuffle_before_pack", "overflow", "on_bad_row", "num_proc", "data_cache_dir", "seed",
)


class _DataOptions:
    """Data settings (see the module docstring of ``packtune.data``).

    ``prompt_template="auto"``: the tokenizer's chat template when it has one, else
    ``"default"``. ``system_prompt``: used for every sample that has no system message of its
    own. ``train_on_reasoning=False``: the replies' reasoning (``<think>...</think>``, or a
    ``reasoning_content`` field) is context instead of trained. ``pack_to_max_length=False``: one sample per row (layout strategy ``"none"``).
    ``num_proc=None``: as many worker processes as CPUs (at most 8). ``data_cache_dir=None``:
    ``$PACKTUNE_CACHE`` or ``~/.cache/packtune``. ``dataset_streaming=True``: hub datasets
    are read as ``datasets`` streams (``IterableDataset``), never downloaded or held whole;
    from Python, ``dataset`` may also be a ``datasets.Dataset`` or ``IterableDataset``.
    """

    @classmethod
    def from_settings(cls, obj: Any, **overrides: Any) -> DataOptions:
        """Copy the same-named attributes of ``obj`` (a ``Settings``, a namespace, a dict)."""
        get = obj.get if isinstance(obj, dict) else (lambda k, d: getattr(obj, k, d))
        missing = object()
        values = {}
        for f in dataclasses.fields(cls):
            v = get(f.name, missing)
            if v is not missing:
                values[f.name] = v
        values.update(overrides)
        if "dataset" not in values:
            raise ValueError("the settings name no dataset")
        return cls(**values)

    def effective_strategy(self, fmt: str | None = None) -> str:
        """The ``layout_packs`` strategy: ``"none"`` without packing; ``"concat"`` for raw text."""
        if not self.pack_to_max_length:
            return "none"
        if fmt == "text":
            return "concat"
        return self.pack_strategy


def _fields() -> list[tuple]:
    """``DATA_SETTINGS`` as ``make_dataclass`` fields, with the settings' types and defaults."""
    by_name = {f.name: f for f in dataclasses.fields(Settings)}
    out: list[tuple] = []
    for name in DATA_SETTINGS:
        f = by_name[name]
        # From Python, ``dataset`` may also be a ``datasets.Dataset`` or ``IterableDataset``.
        kind = "str | list[str] | Any" if name == "dataset" else f.type
        if f.default is not dataclasses.MISSING:
            out.append((name, kind, dataclasses.field(default=f.default)))
        elif f.default_factory is not dataclasses.MISSING:
            out.append((name, kind, dataclasses.field(default_factory=f.default_factory)))
        else:
            out.append((name, kind))
    return out


DataOptions = dataclasses.make_dataclass("DataOptions", _fields(), bases=(_DataOptions,))
DataOptions.__module__ = __name__  # where pickle and the docs find it
DataOptions.__doc__ = _DataOptions.__doc__
