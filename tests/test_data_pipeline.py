"""The pipeline end to end: the report's counts add up (property-tested), packing is planned
over the whole dataset, packs re-ordered per epoch, workers give the same result as one
process, and the options reach the packer."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packtune.data import (
    DataError,
    DataOptions,
    DataReport,
    build_dataset,
    format_report,
    load_tokenizer,
    tokenizer_info,
)
from packtune.packing.packs import IGNORE_INDEX

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("packtune://mistral-v1", cache_dir=tmp_path_factory.getbasetemp() / "tokcache")


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


WORDS = ["alpha", "beta", "gamma", "delta", "packing", "row", "token", "model"]
GOOD = st.builds(
    lambda i, o, inp: {"instruction": " ".join(i), "input": " ".join(inp), "output": " ".join(o)},
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=60),
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=40),
    st.lists(st.sampled_from(WORDS), max_size=5),
)
# Bad rows of every kind an alpaca file can have, with the reason each must be counted under.
BAD = st.sampled_from([
    ({"instruction": "x", "input": ""}, "missing_field"),
    ({"input": "", "output": "y"}, "missing_field"),
    ({"instruction": "x", "input": "", "output": "  "}, "empty_reply"),
    ({"instruction": 3, "input": "", "output": "y"}, "non_string_content"),
    ({"instruction": "x", "input": "", "output": ["y"]}, "non_string_content"),
    ([1, 2], "not_an_object"),
    ("text", "not_an_object"),
])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.one_of(GOOD.map(lambda r: (r, None)), BAD), min_size=1, max_size=40),
       max_length=st.sampled_from([24, 64, 512]),
       overflow=st.sampled_from(["truncate", "drop"]),
       strategy=st.sampled_from(["bfd", "sequential"]),
       pack=st.booleans())
def test_report_counts_add_up(tok, rows, max_length, overflow, strategy, pack):
    with tempfile.TemporaryDirectory() as tmp:
        path = write_jsonl(Path(tmp) / "rows.jsonl", [r for r, _ in rows])
        opts = DataOptions(dataset=path, dataset_format="alpaca", prompt_template="default", max_length=max_length,
                           overflow=overflow, pack_strategy=strategy, pack_to_max_length=pack, data_cache_dir=tmp)
        ds = build_dataset(opts, tok)
    r = ds.report
    r.check()
    expected_skips: dict[str, int] = {}
    for _, reason in rows:
        if reason:
            expected_skips[reason] = expected_skips.get(reason, 0) + 1
    assert r.samples_read == len(rows)
    assert r.skipped == expected_skips
    assert r.kept == sum(1 for _, reason in rows if reason is None) == len(ds.samples)
    assert r.packed == r.documents == sum(int(np.diff(ds.layout.pack_offsets)[p]) for p in range(len(ds)))
    assert r.packs == len(ds)
    lengths = ds.pack_lengths()
    assert (lengths <= max_length).all() and int(lengths.sum()) == r.packed_tokens
    if not pack:
        assert (np.diff(ds.layout.pack_offsets) == 1).all()
    if overflow == "drop":
        assert r.truncated == 0
    trained = sum(int((ds[p]["labels"] != IGNORE_INDEX).sum()) for p in range(len(ds)))
    assert trained == r.trained_tokens


def test_shared_demo_shape_bfd_bound(tok, tmp_path):
    """BFD over the whole dataset reaches at most ceil(tokens / max_length) + 1 packs on a
    chat-like length distribution (many short samples, a few long ones)."""
    rng = np.random.default_rng(0)
    rows = [{"instruction": " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))), "input": "",
             "output": " ".join(rng.choice(WORDS, size=int(rng.geometric(1 / 150))))} for _ in range(1000)]
    ds = build_dataset(DataOptions(dataset=write_jsonl(tmp_path / "r.jsonl", rows), max_length=2048,
                                   data_cache_dir=str(tmp_path)), tok)
    r = ds.report
    assert r.packs <= math.ceil(r.packed_tokens / 2048) + 1 == r.min_packs + 1
    assert r.utilization > 0.99
    seq = build_dataset(DataOptions(dataset=str(tmp_path / "r.jsonl"), max_length=2048, pack_strategy="sequential",
                                    data_cache_dir=str(tmp_path)), tok)
    assert seq.report.packs > r.packs  # next-fit wastes more


def test_shuffle_and_seed_decide_which_samples_share_a_pack(tok, tmp_path):
    rows = [{"instruction": f"Item {i}", "input": "", "output": "ok " * (i % 7 + 1)} for i in range(200)]
    path = write_jsonl(tmp_path / "r.jsonl", rows)

    def groups(**kw):
        ds = build_dataset(DataOptions(dataset=path, max_length=128, pack_strategy="sequential",
                                       data_cache_dir=str(tmp_path), **kw), tok)
        return [sorted(ds.row_of_document(d) for d in range(a, b))
                for a, b in zip(ds.layout.pack_offsets[:-1], ds.layout.pack_offsets[1:])]

    assert groups(seed=1) == groups(seed=1)
    assert groups(seed=1) != groups(seed=2)
    assert groups(shuffle_before_pack=False)[0] == list(range(len(groups(shuffle_before_pack=False)[0])))


def test_epoch_order_is_a_fresh_permutation_every_epoch(tok, tmp_path):
    rows = [{"instruction": f"Item {i}", "input": "", "output": "ok " * 20} for i in range(300)]
    ds = build_dataset(DataOptions(dataset=write_jsonl(tmp_path / "r.jsonl", rows), max_length=64, seed=3,
                                   data_cache_dir=str(tmp_path)), tok)
    n = len(ds)
    orders = [ds.epoch_order(e) for e in range(3)]
    for o in orders:
        assert sorted(o.tolist()) == list(range(n))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert np.array_equal(ds.epoch_order(1), orders[1])
    with pytest.raises(IndexError):
        ds[n]


def test_workers_give_the_same_result_as_one_process(tok, tmp_path):
    rows = [{"instruction": f"Question {i}?", "input": "x" * (i % 5), "output": f"Answer {i}."} for i in range(4500)]
    rows[1234] = {"instruction": "bad"}
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    one = build_dataset(DataOptions(dataset=path, num_proc=1, data_cache_dir=str(tmp_path / "a")), tok)
    two = build_dataset(DataOptions(dataset=path, num_proc=2, data_cache_dir=str(tmp_path / "b")), tok)
    assert one.report.num_proc == 1 and two.report.num_proc == 2
    for name in ("input_ids", "labels", "offsets"):
        assert np.array_equal(getattr(one.samples, name), getattr(two.samples, name))
    assert np.array_equal(one.row_ids, two.row_ids)
    assert two.report.skipped == {"missing_field": 1} and two.report.kept == 4499
    assert two.report.tokenize_tokens_per_s > 0


def test_workers_report_bad_input_with_its_location(tok, tmp_path):
    lines = [json.dumps({"instruction": f"Q{i}", "input": "", "output": "A"}) for i in range(4200)]
    lines[4100] = '{"instruction": "broken'
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"r\.jsonl, line 4101: not valid JSON"):
        build_dataset(DataOptions(dataset=str(path), num_proc=2, data_cache_dir=str(tmp_path)), tok)


def test_overflow_policies(tok, tmp_path):
    rows = [{"instruction": "word " * 100, "input": "", "output": "answer " * 50},
            {"instruction": "short", "input": "", "output": "fine"}]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    base = dict(dataset=path, max_length=128, data_cache_dir=str(tmp_path))
    r = build_dataset(DataOptions(**base), tok).report
    assert r.truncated == 1 and r.truncated_tokens > 0 and r.packed == 2
    r = build_dataset(DataOptions(**base, overflow="drop"), tok).report
    assert r.dropped == {"too_long": 1} and r.packed == 1
    with pytest.raises(DataError, match="row 0 .* more than max_length=128"):
        build_dataset(DataOptions(**base, overflow="error"), tok)


def test_options_from_settings():
    s = SimpleNamespace(dataset="d.jsonl", max_length=512, seed=7, lr=1e-4, pack_strategy="sequential")
    opts = DataOptions.from_settings(s)
    assert (opts.dataset, opts.max_length, opts.seed, opts.pack_strategy, opts.prompt_template) == \
        ("d.jsonl", 512, 7, "sequential", "auto")
    assert DataOptions.from_settings({"dataset": "x"}).dataset == "x"
    assert DataOptions(dataset="x", pack_to_max_length=False).effective_strategy("alpaca") == "none"
    with pytest.raises(ValueError, match="no dataset"):
        DataOptions.from_settings(SimpleNamespace(max_length=3))


def test_options_match_the_config_settings():
    """The config's Settings has every DataOptions field with the same default."""
    import dataclasses

    from packtune.config import Settings

    fields = {f.name: f for f in dataclasses.fields(Settings)}
    for f in dataclasses.fields(DataOptions):
        assert f.name in fields, f.name
        if f.name != "dataset":
            assert fields[f.name].default == f.default, f.name


def test_format_report_lists_everything(tok, tmp_path):
    ds = build_dataset(DataOptions(dataset=str(FIXTURES / "sharegpt.json"), data_cache_dir=str(tmp_path)), tok)
    text = format_report(ds.report)
    for word in ("samples read", "skipped", "ends_with_user", "tokens", "truncated", "dropped", "packs",
                 "utilization", "docs per pack", "tokens/s"):
        assert word in text
    assert DataReport.from_dict(ds.report.as_dict()) == ds.report


def test_sft_and_preference_reports_name_their_reading_alike(tok, tmp_path):
    """Both builders fill the report's reading fields in one place (``DataReport.add_reading``):
    the same dataset names, tokenizer, template and first-bad-row form."""
    from packtune.data.sources import describe_dataset
    from packtune.preference.data import build_preference_dataset

    user = {"role": "user", "content": "2+2?"}
    sft = [write_jsonl(tmp_path / f"sft{i}.jsonl", [{"messages": [user, {"role": "assistant", "content": "4"}]},
                                                    {"messages": [user]}]) for i in range(2)]
    pairs = [write_jsonl(tmp_path / f"pairs{i}.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
                                                        {"chosen": "4"}]) for i in range(2)]
    for build, paths in ((build_dataset, sft), (build_preference_dataset, pairs)):
        r = build(DataOptions(dataset=paths, prompt_template="mistral", data_cache_dir=str(tmp_path / "cache")),
                  tok).report
        assert (r.dataset, r.tokenizer, r.template) == (", ".join(paths), "packtune://mistral-v1", "mistral")
        assert r.samples_read == 4 and r.skipped_total == 2 and sum(r.formats.values()) == 4
        (example,) = r.skip_examples.values()
        assert example.startswith(f"{paths[0]}, line 2: "), example
        assert r.tokenize_seconds > 0 and r.tokenize_tokens_per_s > 0
    assert describe_dataset(sft, "test") == f"{sft[0]}, {sft[1]} [test]"


def test_load_tokenizer_bundled(tok, tmp_path_factory):
    assert len(tok) == 32000 and (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "</s>")
    assert tok.name_or_path == "packtune://mistral-v1"
    folder = tmp_path_factory.getbasetemp() / "tokcache" / "tokenizers" / "mistral-v1"
    assert (folder / "tokenizer.model").is_file() and (folder / "tokenizer.json").is_file()  # converted once
    with pytest.raises(DataError, match="no bundled tokenizer 'gpt-9'; known: packtune://mistral-v1"):
        load_tokenizer("packtune://gpt-9")
    info = tokenizer_info(tok)
    assert info["vocab_size"] == 32000 and info["pad_token_id"] == 2 and len(info["fingerprint"]) == 32
