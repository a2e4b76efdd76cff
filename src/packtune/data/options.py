"""``DataOptions``: every setting of the data pipeline, with its default.

The names match the config's ``Settings`` attributes, so ``DataOptions.from_settings(settings)``
copies them over.

>>> opts = DataOptions(dataset="data.jsonl", max_length=512)
>>> opts.pack_strategy, opts.effective_strategy("alpaca"), opts.effective_strategy("text")
('bfd', 'bfd', 'concat')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PACK_STRATEGIES = ("bfd", "sequential", "concat")


@dataclass
class DataOptions:
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

    dataset: str | list[str] | Any
    dataset_format: str = "auto"
    dataset_split: str = "train"
    dataset_streaming: bool = False
    max_samples: int | None = None
    prompt_template: str = "auto"
    system_prompt: str | None = None
    train_on_reasoning: bool = True
    max_length: int = 2048
    pack_to_max_length: bool = True
    pack_strategy: str = "bfd"
    shuffle_before_pack: bool = True
    overflow: str = "truncate"
    on_bad_row: str = "skip"
    num_proc: int | None = None
    data_cache_dir: str | None = None
    seed: int = 0

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
