"""The data pipeline: datasets in, packed training rows out, with nothing lost silently.

>>> from packtune.data import DataOptions, build_dataset, load_tokenizer   # doctest: +SKIP
>>> tok = load_tokenizer("packtune://mistral-v1")                          # doctest: +SKIP
>>> ds = build_dataset(DataOptions(dataset=["alpaca.json", "glaive.json"]), tok)  # doctest: +SKIP
>>> print(format_report(ds.report))                                        # doctest: +SKIP

* ``sources``: local ``.json``/``.jsonl``/``.parquet``/``.txt`` files, ``packtune://NAME``
  assets, or a Hugging Face dataset id; streamed in batches.
* ``formats``: ``alpaca``, ``sharegpt``, ``messages``, ``oasst1``, ``text`` (auto-detected per
  file); bad rows are skipped and counted per reason, or an error (``on_bad_row``).
* ``templates``: the tokenizer's chat template, or a built-in one; only assistant replies
  (with their end-of-turn) are trained.
* ``turns``: where each reply lies in a chat template's rendering, found by structure.
* ``tokenize``: batched, in parallel, into flat arrays (``TokenizedSamples``).
* ``cache``: tokenized samples and pack layouts on disk, keyed by content and settings.
* ``dataset``: ``build_dataset`` -> ``PackedDataset`` (packs planned over the whole dataset).
* ``report`` and ``plot``: what packing did, as text and as a picture.
"""

from packtune.data.dataset import PackedDataset, build_dataset, render_prompt
from packtune.data.errors import DataError
from packtune.data.formats import BAD_ROW_REASONS, FORMAT_NAMES, FORMATS, detect_format, to_sample
from packtune.data.options import DataOptions
from packtune.data.report import DataReport, format_report, show_packs
from packtune.data.templates import TEMPLATE_NAMES, TEMPLATES, Template, get_template
from packtune.data.tokenizer_loader import default_cache_dir, load_tokenizer, tokenizer_fingerprint, tokenizer_info

__all__ = [
    "BAD_ROW_REASONS",
    "FORMATS",
    "FORMAT_NAMES",
    "TEMPLATES",
    "TEMPLATE_NAMES",
    "DataError",
    "DataOptions",
    "DataReport",
    "PackedDataset",
    "Template",
    "build_dataset",
    "default_cache_dir",
    "detect_format",
    "format_report",
    "get_template",
    "load_tokenizer",
    "render_prompt",
    "show_packs",
    "to_sample",
    "tokenizer_fingerprint",
    "tokenizer_info",
]
