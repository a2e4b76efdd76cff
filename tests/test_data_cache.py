"""The on-disk cache: a second run with the same settings is a hit (nothing re-tokenized,
arrays memory-mapped); changing the data, the tokenizer or any setting that changes the
result rebuilds, and only what it must."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import packtune.data.dataset as dataset_mod
from packtune.data import DataOptions, build_dataset, load_tokenizer
from packtune.data.cache import DataCache, cache_key

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("packtune://mistral-v1", cache_dir=tmp_path_factory.getbasetemp() / "tokcache")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.json"
    shutil.copy(FIXTURES / "sharegpt.json", path)
    return path


@pytest.fixture
def count_tokenize(monkeypatch):
    """How many times the rows were tokenized."""
    calls = []
    real = dataset_mod.tokenize_batches

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(dataset_mod, "tokenize_batches", counting)
    return calls


def opts(data, tmp_path, **kw):
    kw.setdefault("max_length", 256)
    return DataOptions(dataset=str(data), data_cache_dir=str(tmp_path / "cache"), **kw)


def same(a, b) -> bool:
    return all(np.array_equal(getattr(a.samples, n), getattr(b.samples, n)) for n in ("input_ids", "labels", "offsets")) \
        and np.array_equal(a.layout.doc_start, b.layout.doc_start) and np.array_equal(a.layout.pack_offsets, b.layout.pack_offsets)


def test_second_run_is_a_hit(tok, data, tmp_path, count_tokenize):
    first = build_dataset(opts(data, tmp_path), tok)
    assert not first.report.cache_hit and len(count_tokenize) == 1
    second = build_dataset(opts(data, tmp_path), tok)
    assert second.report.cache_hit and second.report.tokenize_cache_hit and len(count_tokenize) == 1
    assert same(first, second)
    assert isinstance(second.samples.input_ids, np.memmap) or isinstance(second.samples.input_ids.base, np.memmap)
    # The report survives the cache (all but the hit flags).
    a, b = first.report.as_dict(), second.report.as_dict()
    for k in ("cache_hit", "tokenize_cache_hit"):
        a.pop(k), b.pop(k)
    assert a == b
    # num_proc and on_bad_row do not change the result: still a hit.
    assert build_dataset(opts(data, tmp_path, num_proc=3, on_bad_row="skip"), tok).report.cache_hit


@pytest.mark.parametrize("change", [
    dict(prompt_template="chatml"),
    dict(system_prompt="Be brief."),
    dict(dataset_format="sharegpt"),
    dict(max_samples=5),
])
def test_a_setting_that_changes_tokens_rebuilds(tok, data, tmp_path, count_tokenize, change):
    build_dataset(opts(data, tmp_path), tok)
    ds = build_dataset(opts(data, tmp_path, **change), tok)
    assert not ds.report.cache_hit and not ds.report.tokenize_cache_hit and len(count_tokenize) == 2
    assert build_dataset(opts(data, tmp_path, **change), tok).report.cache_hit


@pytest.mark.parametrize("change", [
    dict(max_length=128),
    dict(pack_strategy="sequential"),
    dict(overflow="drop"),
    dict(shuffle_before_pack=False),
    dict(seed=5),
    dict(pack_to_max_length=False),
])
def test_a_packing_setting_repacks_without_retokenizing(tok, data, tmp_path, count_tokenize, change):
    build_dataset(opts(data, tmp_path), tok)
    ds = build_dataset(opts(data, tmp_path, **change), tok)
    assert ds.report.tokenize_cache_hit and not ds.report.cache_hit and len(count_tokenize) == 1
    for k, v in change.items():
        if k == "max_length":
            assert ds.report.max_length == v
        if k == "pack_strategy":
            assert ds.report.strategy == v
        if k == "pack_to_max_length":
            assert ds.report.strategy == "none"
    assert build_dataset(opts(data, tmp_path, **change), tok).report.cache_hit


def test_another_tokenizer_rebuilds(tok, data, tmp_path, count_tokenize):
    build_dataset(opts(data, tmp_path), tok)
    other = copy.deepcopy(tok)
    other.add_tokens(["<|im_end|>"], special_tokens=True)
    ds = build_dataset(opts(data, tmp_path, prompt_template="default"), other)
    assert not ds.report.tokenize_cache_hit and len(count_tokenize) == 2
    with_template = copy.deepcopy(tok)
    with_template.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ds = build_dataset(opts(data, tmp_path, prompt_template="default"), with_template)
    assert not ds.report.tokenize_cache_hit and len(count_tokenize) == 3


def test_changed_data_content_rebuilds(tok, data, tmp_path, count_tokenize):
    first = build_dataset(opts(data, tmp_path), tok)
    rows = json.loads(data.read_text())
    rows[0]["conversations"][1]["value"] = "A different reply, longer than before."
    data.write_text(json.dumps(rows))
    second = build_dataset(opts(data, tmp_path), tok)
    assert not second.report.tokenize_cache_hit and len(count_tokenize) == 2
    assert not same(first, second)
    # Same content under another name: a hit (the key is the content).
    renamed = tmp_path / "renamed.json"
    shutil.copy(data, renamed)
    assert build_dataset(opts(renamed, tmp_path), tok).report.cache_hit


def test_broken_entry_is_rebuilt(tok, data, tmp_path, count_tokenize):
    build_dataset(opts(data, tmp_path), tok)
    cache = DataCache(tmp_path / "cache")
    for entry in cache.dir.glob("tok-*"):
        (entry / "labels.npy").unlink()
    ds = build_dataset(opts(data, tmp_path), tok)
    assert not ds.report.tokenize_cache_hit and len(count_tokenize) == 2


def test_unwritable_cache_warns_and_goes_on(tok, data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not write the data cache"):
        ds = build_dataset(DataOptions(dataset=str(data), data_cache_dir=str(blocker)), tok)
    assert ds.report.kept == 3


def test_default_cache_dir_from_environment(tok, data, tmp_path, monkeypatch):
    monkeypatch.setenv("PACKTUNE_CACHE", str(tmp_path / "envcache"))
    build_dataset(DataOptions(dataset=str(data)), tok)
    assert any((tmp_path / "envcache" / "data").glob("pack-*"))


def test_cache_key_is_order_free():
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})
