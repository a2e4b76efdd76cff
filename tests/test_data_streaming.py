"""Building the data cache in bounded memory (issue 12, section 3).

Tokenized batches are streamed into on-disk arrays, the packing plan works on per-sample
arrays and reads the tokens in pieces, and a ``datasets.IterableDataset`` is tokenized as it
is read. Each result must equal the in-memory one exactly, and a build that fails or is
killed half-way must leave no cache entry behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import naive_bfd

import packtune.data.dataset as dataset_mod
import packtune.data.sources as sources_mod
import packtune.data.tokenize as tokenize_mod
import packtune.packing.chunks as chunks_mod
from packtune.config import ConfigError, Settings
from packtune.data import (
    DataError,
    DataOptions,
    build_dataset,
    get_template,
    load_tokenizer,
)
from packtune.data.cache import NpyAppender
from packtune.data.sources import iter_batches, resolve
from packtune.data.tokenize import Encoder
from packtune.packing import plan_array
from packtune.packing.packs import IGNORE_INDEX, TokenizedSamples, layout_packs

FIXTURES = Path(__file__).parent / "fixtures" / "data"
# Four formats, plus 2,292 rows of the bundled demo tasks: enough batches for the worker pool.
SOURCES = [str(FIXTURES / n) for n in ("alpaca.json", "sharegpt.json", "messages.jsonl", "oasst1.jsonl")] + [
    "packtune://demo_tasks.jsonl"]
WORDS = ["red", "river", "stone", "cow", "moo", "hot", "cold", "green", "castle", "song"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("packtune://mistral-v1", cache_dir=tmp_path_factory.getbasetemp() / "tokcache")


def in_memory(tok, opts: DataOptions) -> tuple[TokenizedSamples, np.ndarray, int]:
    """The tokenized samples as they were built before streaming: every batch encoded in this
    process and the batches concatenated in memory. Also the row ids and the rows read."""
    parts = resolve(opts.dataset, opts.dataset_split)
    encoder = Encoder(tok, get_template(opts.prompt_template, tok), opts.system_prompt)
    batches = iter_batches(parts, dataset_mod._formats(parts, opts.dataset_format), opts.dataset_split,
                           opts.max_samples, dataset_mod.BATCH_SIZE)
    encs = [encoder(b) for b in batches]
    lengths = np.concatenate([e.lengths for e in encs])
    samples = TokenizedSamples(np.concatenate([e.input_ids for e in encs]), np.concatenate([e.labels for e in encs]),
                               np.concatenate([[0], np.cumsum(lengths)]))
    return samples, np.concatenate([e.row_ids for e in encs]), sum(e.rows for e in encs)


def assert_same_layout(a, b) -> None:
    for name in ("doc_start", "doc_end", "pack_offsets"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def cache_folders(root: Path) -> list[str]:
    folder = root / "data"
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "digests") if folder.is_dir() else []


# --- the cache built streaming equals the in-memory result ------------------------------------


@pytest.mark.parametrize("num_proc", [1, 2])
def test_streamed_cache_equals_in_memory_result(tok, tmp_path, monkeypatch, num_proc):
    monkeypatch.setattr(dataset_mod, "BATCH_SIZE", 50)  # 50 batches: the pool runs with num_proc=2
    monkeypatch.setattr(chunks_mod, "CHUNK_TOKENS", 1000)  # many pieces in each pass over the tokens
    opts = DataOptions(dataset=SOURCES, prompt_template="default", max_length=256, num_proc=num_proc,
                       data_cache_dir=str(tmp_path / "cache"))
    ds = build_dataset(opts, tok)
    assert ds.report.num_proc == num_proc and not ds.report.tokenize_cache_hit
    ref, row_ids, read = in_memory(tok, opts)
    assert len(ref) > 2000 and ds.report.samples_read == read
    for name in ("input_ids", "labels", "offsets"):
        assert np.array_equal(getattr(ds.samples, name), getattr(ref, name)), name
    assert ds.samples.input_ids.dtype == ds.samples.labels.dtype == np.int32
    assert np.array_equal(ds.row_ids, row_ids)
    # Mapped from the cache entry's files, not held in memory.
    assert isinstance(ds.samples.input_ids.base, np.memmap) and isinstance(ds.samples.labels.base, np.memmap)
    order = np.random.default_rng(opts.seed).permutation(len(ref))  # shuffle_before_pack
    layout, pr = layout_packs(ref, 256, "bfd", "truncate", order)
    assert_same_layout(ds.layout, layout)
    r = ds.report
    assert (r.packs, r.packed, r.trained_tokens, r.truncated, r.dropped) == (
        pr.packs, pr.packed, pr.trained_tokens, pr.truncated, pr.dropped)
    hit = build_dataset(opts, tok)
    assert hit.report.cache_hit and np.array_equal(hit.samples.labels, ref.labels)
    assert_same_layout(hit.layout, layout)


# --- IterableDataset sources ------------------------------------------------------------------


class Produced:
    """How many rows the generator below has handed out (read in this process)."""

    n = 0


def alpaca_rows(n: int):
    for i in range(n):
        Produced.n += 1
        words = " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 2 + i % 7))
        yield {"instruction": f"Repeat after me: {words}", "input": "", "output": words}


@pytest.mark.parametrize("num_proc", [1, 2])
def test_iterable_dataset_is_tokenized_as_it_is_read(tok, tmp_path, monkeypatch, num_proc):
    n, batch = 2000, 20
    monkeypatch.setattr(dataset_mod, "BATCH_SIZE", batch)
    seen = []
    real_run = tokenize_mod._run

    def spy(*args, **kwargs):
        for i, item in enumerate(real_run(*args, **kwargs)):
            if i == 0:
                seen.append(Produced.n)  # rows read when the first tokenized batch comes back
            yield item

    monkeypatch.setattr(tokenize_mod, "_run", spy)
    stream = datasets.IterableDataset.from_generator(alpaca_rows, gen_kwargs={"n": n})
    Produced.n = 0
    opts = DataOptions(dataset=stream, prompt_template="default", max_length=128, num_proc=num_proc,
                       data_cache_dir=str(tmp_path / "cache"))
    ds = build_dataset(opts, tok)
    assert ds.report.samples_read == n and ds.report.num_proc == num_proc
    # Format detection reads 100 rows; tokenization then starts after a few batches (the ones
    # in flight), never after the whole stream.
    assert seen and seen[0] <= 100 + 10 * batch < n, seen
    # The same rows from a file go through the same path to the same arrays and packs.
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows(n)))
    from_file = build_dataset(DataOptions(dataset=str(path), prompt_template="default", max_length=128,
                                          data_cache_dir=str(tmp_path / "cache")), tok)
    for name in ("input_ids", "labels", "offsets"):
        assert np.array_equal(getattr(ds.samples, name), getattr(from_file.samples, name)), name
    assert_same_layout(ds.layout, from_file.layout)
    # Cached under the stream's fingerprint: the second build reads no row at all.
    Produced.n = 0
    again = build_dataset(opts, tok)
    assert again.report.cache_hit and Produced.n == 0


def test_dataset_streaming_setting_streams_hub_datasets(tok, tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(path, split=None, streaming=False, **kwargs):  # the hub, offline
        calls.append((path, split, streaming))
        if streaming:
            return datasets.IterableDataset.from_generator(alpaca_rows, gen_kwargs={"n": 300})
        return datasets.Dataset.from_list(list(alpaca_rows(300)))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    settings_ = Settings(pretrained_model_name_or_path="org/model", dataset="org/rows", dataset_streaming=True,
                         prompt_template="default", max_length=128, data_cache_dir=str(tmp_path / "cache"))
    streamed = build_dataset(DataOptions.from_settings(settings_), tok)
    assert calls == [("org/rows", "train", True)]
    whole = build_dataset(DataOptions.from_settings(settings_, dataset_streaming=False), tok)
    assert calls[-1] == ("org/rows", "train", False) and not whole.report.tokenize_cache_hit
    for name in ("input_ids", "labels", "offsets"):
        assert np.array_equal(getattr(streamed.samples, name), getattr(whole.samples, name)), name
    assert_same_layout(streamed.layout, whole.layout)
    with pytest.raises(ConfigError, match="dataset_streaming"):
        Settings(pretrained_model_name_or_path="org/model", dataset="org/rows", dataset_streaming="yes")


def test_a_dataset_object_takes_no_split_and_an_unknown_entry_is_refused(tok, tmp_path):
    ds = datasets.Dataset.from_list([{"instruction": "a", "input": "", "output": "b"}])
    with pytest.raises(DataError, match="does not apply to a Dataset object"):
        build_dataset(DataOptions(dataset=ds, dataset_split="train[:1]", data_cache_dir=str(tmp_path)), tok)
    with pytest.raises(DataError, match="not int"):
        build_dataset(DataOptions(dataset=[str(FIXTURES / "alpaca.json"), 3], data_cache_dir=str(tmp_path)), tok)


def test_a_stream_without_fingerprint_is_built_but_not_cached(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "dataset_fingerprint", lambda ds: None)
    system_tmp = tmp_path / "systmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    stream = datasets.IterableDataset.from_generator(alpaca_rows, gen_kwargs={"n": 200})
    opts = DataOptions(dataset=stream, prompt_template="default", max_length=128,
                       data_cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="not cached"):
        ds = build_dataset(opts, tok)
    assert ds.report.samples_read == 200 and len(ds) > 0 and ds[0]["input_ids"].size > 0
    assert cache_folders(tmp_path / "cache") == [] and list(system_tmp.iterdir()) == []


# --- a crash mid-build leaves no cache entry --------------------------------------------------


def rows_file(path: Path, n: int, broken_line: int | None = None) -> str:
    lines = [json.dumps(r) for r in alpaca_rows(n)]
    if broken_line is not None:
        lines[broken_line - 1] = '{"instruction": "cut'
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("crash", ["bad_json", "worker_error", "interrupt"])
def test_a_failed_build_leaves_no_entry(tok, tmp_path, monkeypatch, crash):
    monkeypatch.setattr(dataset_mod, "BATCH_SIZE", 20)
    path = rows_file(tmp_path / "rows.jsonl", 400, broken_line=330 if crash == "bad_json" else None)
    if crash == "worker_error":
        real_call = Encoder.__call__

        def failing(self, batch):  # runs in the forked workers
            if batch.start >= 200:
                raise RuntimeError("worker died")
            return real_call(self, batch)

        monkeypatch.setattr(Encoder, "__call__", failing)
    if crash == "interrupt":
        real_append = NpyAppender.append
        calls = []

        def interrupted(self, values):  # Ctrl-C half-way through writing the arrays
            calls.append(1)
            if len(calls) > 40:
                raise KeyboardInterrupt
            real_append(self, values)

        monkeypatch.setattr(NpyAppender, "append", interrupted)
    cache = tmp_path / "cache"
    expected = {"bad_json": (DataError, "line 330"), "worker_error": (RuntimeError, "worker died"),
                "interrupt": (KeyboardInterrupt, None)}[crash]
    with pytest.raises(expected[0], match=expected[1]):
        build_dataset(DataOptions(dataset=path, prompt_template="default", num_proc=2, data_cache_dir=str(cache)), tok)
    assert cache_folders(cache) == []  # neither an entry nor an unfinished folder


KILLED_BUILD = textwrap.dedent(
    """
    import os, signal, sys
    import packtune.data.dataset as dataset_mod
    from packtune.data import DataOptions, build_dataset, load_tokenizer
    from packtune.data.cache import NpyAppender

    path, cache, tokcache = sys.argv[1:4]
    dataset_mod.BATCH_SIZE = 20
    real_append, calls = NpyAppender.append, []

    def append(self, values):
        calls.append(1)
        if len(calls) > 60:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind can run
        real_append(self, values)

    NpyAppender.append = append
    tok = load_tokenizer("packtune://mistral-v1", cache_dir=tokcache)
    build_dataset(DataOptions(dataset=path, prompt_template="default", num_proc=1, data_cache_dir=cache), tok)
    """
)


def test_a_killed_build_leaves_no_entry_and_its_leftovers_are_swept(tok, tmp_path):
    path = rows_file(tmp_path / "rows.jsonl", 400)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, path, str(cache), str(tmp_path / "tokcache")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = cache_folders(cache)
    assert len(left) == 1 and left[0].startswith(".tok-"), left  # unfinished, hidden: never loaded
    assert (cache / "data" / left[0] / "input_ids.npy").stat().st_size > 128  # it died mid-write
    ds = build_dataset(DataOptions(dataset=path, prompt_template="default", data_cache_dir=str(cache)), tok)
    assert not ds.report.tokenize_cache_hit and ds.report.samples_read == 400
    ref, _, _ = in_memory(tok, DataOptions(dataset=path, prompt_template="default"))
    assert np.array_equal(ds.samples.input_ids, ref.input_ids) and np.array_equal(ds.samples.labels, ref.labels)
    assert [f for f in cache_folders(cache) if f.startswith(".")] == []  # the dead build's folder is gone


# --- the packing plan on int32 lengths, reading the tokens in pieces --------------------------


def next_fit(lengths, max_length):
    packs, used = [], max_length + 1
    for i, n in enumerate(lengths):
        if used + n > max_length:
            packs.append([])
            used = 0
        packs[-1].append(i)
        used += n
    return packs


def reference_layout(lengths, labels, max_length, strategy, overflow, order):
    """The layout by its definition, sample by sample in plain Python."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    docs, dropped, trained, truncated = [], {}, 0, 0
    for i in order:
        a, n = offsets[i], lengths[i]
        if n == 0:
            dropped["empty"] = dropped.get("empty", 0) + 1
            continue
        if strategy == "concat":
            docs.append((a, a + n))
            continue
        if n > max_length and overflow == "drop":
            dropped["too_long"] = dropped.get("too_long", 0) + 1
            continue
        b = a + min(n, max_length)
        count = sum(x != IGNORE_INDEX for x in labels[a + 1:b])
        if count == 0:
            dropped["no_trainable_token"] = dropped.get("no_trainable_token", 0) + 1
            continue
        docs.append((a, b))
        trained += count
        truncated += n > max_length
    if strategy == "concat":  # the stream of kept samples cut every max_length tokens
        cut, rows, pos = [], [], 0
        for a, b in docs:
            while a < b:
                take = min(b - a, max_length - pos % max_length)
                if pos % max_length == 0:
                    rows.append(len(cut))
                cut.append((a, a + take))
                trained += sum(x != IGNORE_INDEX for x in labels[a + 1:a + take])
                a, pos = a + take, pos + take
        return cut, rows + [len(cut)], dropped, trained, 0
    plan = {"bfd": naive_bfd, "sequential": next_fit}.get(strategy, lambda ls, m: [[i] for i in range(len(ls))])(
        [b - a for a, b in docs], max_length)
    return [docs[i] for p in plan for i in p], np.cumsum([0] + [len(p) for p in plan]).tolist(), dropped, trained, truncated


@settings(max_examples=120, deadline=None)
@given(
    spec=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), max_size=40),
    max_length=st.integers(2, 40),
    strategy=st.sampled_from(["bfd", "sequential", "concat", "none"]),
    overflow=st.sampled_from(["truncate", "drop"]),
    shuffle=st.booleans(),
    chunk=st.integers(1, 9),
)
def test_layout_on_int32_pieces_equals_its_definition(spec, max_length, strategy, overflow, shuffle, chunk):
    lengths = [n for n, _ in spec]
    labels = [IGNORE_INDEX if t < prompt else 7 + t for n, prompt in spec for t in range(n)]
    order = np.random.default_rng(len(spec)).permutation(len(spec)) if shuffle else None
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "labels.npy", np.asarray(labels, dtype=np.int32))
        mapped = np.load(Path(folder) / "labels.npy", mmap_mode="r")
        samples = TokenizedSamples(mapped, mapped, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
        old_chunk, chunks_mod.CHUNK_TOKENS = chunks_mod.CHUNK_TOKENS, chunk  # pieces of `chunk` tokens
        try:
            layout, report = layout_packs(samples, max_length, strategy, overflow, order)
        finally:
            chunks_mod.CHUNK_TOKENS = old_chunk
        del samples, mapped
    docs, pack_offsets, dropped, trained, truncated = reference_layout(
        lengths, labels, max_length, strategy, overflow, range(len(spec)) if order is None else order.tolist())
    assert list(zip(layout.doc_start.tolist(), layout.doc_end.tolist())) == docs
    assert layout.pack_offsets.tolist() == pack_offsets
    assert (report.dropped, report.trained_tokens, report.truncated) == (dropped, trained, truncated)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 50).flatmap(lambda m: st.tuples(st.just(m), st.lists(st.integers(0, m), max_size=80))))
def test_plan_on_int32_lengths_equals_the_int64_plan(case):
    max_length, lengths = case
    plans = [plan_array(np.asarray(lengths, dtype=dtype), max_length, strategy)
             for strategy in ("bfd", "sequential") for dtype in (np.int32, np.int64)]
    assert all(np.array_equal(a, b) for a, b in zip(plans[0], plans[1]))
    assert all(np.array_equal(a, b) for a, b in zip(plans[2], plans[3]))
    samples, offsets = plans[0]
    got = [samples[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert got == naive_bfd(lengths, max_length)
    samples, offsets = plans[2]
    assert [samples[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == next_fit(lengths, max_length)


BIG_LAYOUT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import numpy as np
    from packtune.data.cache import NpyAppender
    from packtune.packing.packs import TokenizedSamples, layout_packs

    folder, n_tokens, per = Path(sys.argv[1]), int(sys.argv[2]), 256
    piece = np.where(np.arange(1 << 20) % per < per // 2, -100, 7).astype(np.int32)  # second halves trained
    f = NpyAppender(folder / "labels.npy", np.int32)
    for _ in range(n_tokens >> 20):
        f.append(piece)
    f.close()
    labels = np.load(folder / "labels.npy", mmap_mode="r")
    samples = TokenizedSamples(labels, labels, np.arange(0, n_tokens + 1, per, dtype=np.int64))
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = peak()
    out = {}
    for strategy in ("bfd", "concat"):
        layout, report = layout_packs(samples, 2048, strategy)
        out[strategy] = [report.trained_tokens, report.packs, int(layout.doc_end[-1] - layout.doc_start[0]) > 0]
    out["grew_mb"] = peak() - before
    print(json.dumps(out))
    """
)


def test_packing_a_mapped_dataset_holds_no_token_sized_array(tmp_path):
    """32M tokens (128 MB of labels, memory-mapped): planning grows the peak RSS by a few MB
    of per-sample arrays; whole-array temporaries (int64 masks and cumsums) would take 768 MB."""
    n_tokens = 1 << 25
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        proc = subprocess.run([sys.executable, "-c", BIG_LAYOUT, str(tmp_path), str(n_tokens)], capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        (tmp_path / "labels.npy").unlink(missing_ok=True)
    # Every sample: 256 tokens, the last 128 trained; 8 samples fill a pack exactly.
    assert out["bfd"] == out["concat"] == [n_tokens // 2, n_tokens // 2048, True]
    assert out["grew_mb"] < 64, out


def test_pages_of_a_writable_mapping_are_never_dropped(tmp_path):
    """Only read-only mappings have their pages released: a copy-on-write mapping keeps its
    changes through a pass over it."""
    np.save(tmp_path / "x.npy", np.arange(10, dtype=np.int32))
    changed = np.load(tmp_path / "x.npy", mmap_mode="c")
    changed[3] = -100
    assert [a for a, _ in chunks_mod.iter_chunks(changed, 4)] == [0, 4, 8]
    assert changed[3] == -100 and chunks_mod.trained_before(changed, np.array([10]))[0] == 9
    read_only = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert chunks_mod._mapping(read_only) is not None and chunks_mod._mapping(changed) is None
