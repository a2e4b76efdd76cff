"""Formats and sources: every format read from a fixture (bad rows of every kind counted per
reason), detection, errors naming the file and line, and every kind of source."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from packtune.data import (
    BAD_ROW_REASONS,
    DataError,
    DataOptions,
    build_dataset,
    detect_format,
    get_template,
    load_tokenizer,
    to_sample,
)
from packtune.data.sources import assets_dir, iter_batches, parse_split, resolve

FIXTURES = Path(__file__).parent / "fixtures" / "data"

# fixture -> (detected format, rows read, rows kept, skipped per reason)
EXPECTED = {
    "alpaca.json": ("alpaca", 9, 4, {"missing_field": 1, "empty_reply": 1, "non_string_content": 2, "not_an_object": 1}),
    "sharegpt.json": ("sharegpt", 10, 3, {"ends_with_user": 1, "empty_reply": 1, "unknown_role": 1,
                                          "non_string_content": 1, "no_turns": 1, "missing_field": 1,
                                          "ends_with_tool": 1}),
    "messages.jsonl": ("messages", 7, 2, {"non_string_content": 1, "ends_with_user": 1, "missing_field": 1,
                                          "unknown_role": 1, "no_reply": 1}),
    "oasst1.jsonl": ("oasst1", 7, 2, {"ends_with_user": 1, "no_turns": 1, "non_string_content": 1,
                                      "missing_field": 1, "empty_reply": 1}),
    "text.jsonl": ("text", 4, 2, {"empty_text": 1, "missing_field": 1}),
    "text.txt": ("text", 3, 3, {}),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("packtune://mistral-v1", cache_dir=tmp_path_factory.getbasetemp() / "tokcache")


def build(tok, tmp_path, dataset, **kw):
    kw.setdefault("max_length", 256)
    return build_dataset(DataOptions(dataset=dataset, data_cache_dir=str(tmp_path / "cache"), **kw), tok)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_format_is_read_and_bad_rows_counted(tok, tmp_path, name):
    fmt, read, kept, skipped = EXPECTED[name]
    ds = build(tok, tmp_path, str(FIXTURES / name))
    r = ds.report
    assert r.formats == {fmt: read}
    assert (r.samples_read, r.kept, r.skipped) == (read, kept, skipped)
    assert r.samples_read == r.kept + sum(r.skipped.values())
    assert r.kept == r.packed + sum(r.dropped.values())
    assert set(r.skipped) <= set(BAD_ROW_REASONS)
    assert len(ds) >= 1 and ds[0]["input_ids"].size > 0
    # Chosen by name, the same format gives the same result.
    again = build(tok, tmp_path / "named", str(FIXTURES / name), dataset_format=fmt)
    assert (again.report.kept, again.report.skipped) == (kept, skipped)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_detection(name):
    fmt = EXPECTED[name][0]
    part = resolve(str(FIXTURES / name))[0]
    assert (detect_format(part.head()) if not name.endswith(".txt") else "text") == fmt


def test_detection_failures_name_the_formats():
    with pytest.raises(ValueError, match="cannot detect the format .* from its fields \\(a, b\\); set dataset_format to one of alpaca"):
        detect_format([{"a": 1, "b": 2}])
    with pytest.raises(ValueError, match="no JSON object"):
        detect_format(["x", 3])


def test_alpaca_prompt_is_instruction_plus_newline_and_input():
    conv = to_sample({"instruction": "Translate.", "input": "chat", "output": "cat"}, "alpaca")
    assert conv.messages == [{"role": "user", "content": "Translate.\nchat"}, {"role": "assistant", "content": "cat"}]
    conv = to_sample({"instruction": "Say hi.", "input": "", "output": "Hi"}, "alpaca")
    assert conv.messages[0]["content"] == "Say hi."
    conv = to_sample({"instruction": "Q", "output": "A", "system": "S", "history": [["q0", "a0"]]}, "alpaca")
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_sharegpt_roles_and_tools():
    row = json.loads((FIXTURES / "sharegpt.json").read_text())[0]
    conv = to_sample(row, "sharegpt")
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant", "tool", "assistant"]
    assert conv.messages[3]["content"].startswith('{"name": "get_weather"')  # the call is a reply
    assert conv.tools.startswith('[{"name": "get_weather"')
    # An empty tools list adds nothing.
    assert to_sample(json.loads((FIXTURES / "sharegpt.json").read_text())[2], "sharegpt").tools is None


def test_messages_tool_calls_become_the_reply():
    row = json.loads((FIXTURES / "messages.jsonl").read_text().splitlines()[1])
    conv = to_sample(row, "messages")
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    # Kept as they are, for a chat template that writes tool calls its own way ...
    assert conv.messages[1] == {"role": "assistant", "content": "", "tool_calls": row["messages"][1]["tool_calls"]}
    # ... and written as JSON by the built-in templates.
    trained = [t for t, tr in get_template("chatml", bos="", eos="").render(conv.messages) if tr]
    assert json.loads(trained[0].removesuffix("<|im_end|>")) == [{"name": "get_weather", "arguments": '{"city": "Rome"}'}]


def test_messages_reasoning_is_kept():
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4", "reasoning_content": "Add them."}]}
    assert to_sample(row, "messages").messages[1] == {"role": "assistant", "content": "4", "reasoning_content": "Add them."}
    bad = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": 4}]}
    assert to_sample(bad, "messages").reason == "non_string_content"
    # A reply with no text, no reasoning and no tool call is empty.
    empty = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": " "}]}
    assert to_sample(empty, "messages").reason == "empty_reply"


def test_oasst1_turns():
    conv = to_sample({"text": "### Human: a?### Assistant: b.### Human: c?### Assistant: d."}, "oasst1")
    assert conv.messages == [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b."},
                             {"role": "user", "content": "c?"}, {"role": "assistant", "content": "d."}]


def test_text_uses_concat_packing_and_trains_every_token(tok, tmp_path):
    ds = build(tok, tmp_path, str(FIXTURES / "text.txt"), max_length=16)
    assert ds.report.strategy == "concat"
    assert all(ds[p]["input_ids"].size == 16 for p in range(len(ds) - 1))  # rows cut at max_length
    s = ds.samples
    ids, labels = s.input_ids[s.offsets[0]:s.offsets[1]], s.labels[s.offsets[0]:s.offsets[1]]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert (labels[1:] == ids[1:]).all()  # everything after BOS is trained
    assert ds.report.packed_tokens == ds.report.tokens  # concat loses nothing


def test_malformed_jsonl_names_file_and_line(tok, tmp_path):
    with pytest.raises(DataError, match=r"malformed\.jsonl, line 3: not valid JSON"):
        build(tok, tmp_path, str(FIXTURES / "malformed.jsonl"))


def test_malformed_json_array_names_file_and_line(tok, tmp_path):
    with pytest.raises(DataError, match=r"malformed\.json, line 4: not valid JSON"):
        build(tok, tmp_path, str(FIXTURES / "malformed.json"))


def test_on_bad_row_error_names_the_row(tok, tmp_path):
    with pytest.raises(DataError, match=r"alpaca\.json, line 5: bad row \(missing_field: no 'output'\)"):
        build(tok, tmp_path, str(FIXTURES / "alpaca.json"), on_bad_row="error")
    with pytest.raises(DataError, match=r"messages\.jsonl, line 3: bad row \(non_string_content"):
        build(tok, tmp_path, str(FIXTURES / "messages.jsonl"), on_bad_row="error")


def test_unknown_names_list_the_known_ones(tok, tmp_path):
    with pytest.raises(DataError, match="unknown dataset_format 'csv'; known: auto, alpaca, sharegpt, messages, oasst1, text"):
        build(tok, tmp_path, str(FIXTURES / "alpaca.json"), dataset_format="csv")
    with pytest.raises(DataError, match="unknown pack_strategy 'ffd'; known: bfd, sequential, concat"):
        build(tok, tmp_path, str(FIXTURES / "alpaca.json"), pack_strategy="ffd")


def test_several_files_each_detected(tok, tmp_path):
    ds = build(tok, tmp_path, [str(FIXTURES / "alpaca.json"), str(FIXTURES / "sharegpt.json")])
    assert ds.report.formats == {"alpaca": 9, "sharegpt": 10}
    assert ds.report.samples_read == 19 and ds.report.kept == 7
    assert ds.row_ids.tolist() == [0, 1, 2, 8, 9, 10, 11]


def test_jsonl_parquet_gzip_directory_and_glob(tok, tmp_path):
    rows = json.loads((FIXTURES / "alpaca.json").read_text())
    good = [r for r in rows if isinstance(r, dict) and isinstance(r.get("output"), str) and r["output"].strip()
            and isinstance(r["instruction"], str)]
    folder = tmp_path / "data"
    folder.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"instruction": r["instruction"], "input": r.get("input", ""),
                                          "output": r["output"]} for r in good]), folder / "a.parquet")
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in good) + "\n")
    (folder / "notes.md").write_text("ignored")
    ds = build(tok, tmp_path, str(folder))
    assert ds.report.formats == {"alpaca": 2 * len(good)} and ds.report.kept == 2 * len(good)
    ds = build(tok, tmp_path, str(folder / "*.parquet"))
    assert ds.report.samples_read == len(good)


def test_split_slice_and_max_samples(tok, tmp_path):
    path = str(FIXTURES / "alpaca.json")
    assert build(tok, tmp_path, path, max_samples=3).report.samples_read == 3
    ds = build(tok, tmp_path, path, dataset_split="train[2:5]")
    assert ds.report.samples_read == 3 and ds.row_ids.tolist() == [0]
    ds = build(tok, tmp_path, path, dataset_split="train[1:]", max_samples=2)
    assert ds.report.samples_read == 2
    assert parse_split("train") == ("train", None, None)
    with pytest.raises(DataError, match="only the split 'train'"):
        build(tok, tmp_path, path, dataset_split="test")


def test_missing_file_and_unsupported_type(tok, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        build(tok, tmp_path, str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        build(tok, tmp_path, str(tmp_path / "x.csv"))


def test_bundled_scheme(tok, tmp_path, monkeypatch):
    fake_assets = tmp_path / "assets"
    fake_assets.mkdir()
    shutil.copy(FIXTURES / "messages.jsonl", fake_assets / "demo.jsonl")
    monkeypatch.setattr("packtune.data.sources.assets_dir", lambda: fake_assets)
    ds = build(tok, tmp_path, "packtune://demo.jsonl")
    assert ds.report.kept == 2
    with pytest.raises(DataError, match="no bundled dataset 'other.jsonl'; known: demo.jsonl"):
        build(tok, tmp_path, "packtune://other.jsonl")
    assert assets_dir().name == "assets"


def test_hub_dataset_through_load_dataset(tok, tmp_path, monkeypatch):
    import datasets

    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(25)]
    calls = []

    def fake_load_dataset(path, split=None, **kw):
        calls.append((path, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = build(tok, tmp_path, "tatsu-lab/alpaca", max_samples=10)
    assert calls[0] == ("tatsu-lab/alpaca", "train")
    assert ds.report.samples_read == 10 and ds.report.formats == {"alpaca": 10}
    # A second run is a cache hit (keyed by the dataset's fingerprint).
    assert build(tok, tmp_path, "tatsu-lab/alpaca", max_samples=10).report.cache_hit


def test_batches_never_span_parts_and_keep_line_numbers():
    parts = resolve([str(FIXTURES / "messages.jsonl"), str(FIXTURES / "oasst1.jsonl")])
    batches = list(iter_batches(parts, ["messages", "oasst1"], "train", None, batch_size=4))
    assert [len(b.items) for b in batches] == [4, 3, 4, 3]
    assert batches[1].lines == [6, 7, 8]  # line 5 is blank
    assert batches[1].location(0).endswith("messages.jsonl, line 6")
    assert [b.start for b in batches] == [0, 4, 7, 11]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_json_arrays_are_streamed_across_chunk_boundaries(tmp_path, chunk):
    from packtune.data.sources import _iter_json_array

    rows = [{"instruction": "x" * i, "n": 12345 * i, "f": 1.5e10, "nested": [{"a": None}, True]} for i in range(6)]
    rows.insert(2, 42)  # a bare number, cut by the chunk end
    text = "[\n" + ",\n".join(json.dumps(r, indent=None if i % 2 else 2) for i, r in enumerate(rows)) + "\n]\n"
    path = tmp_path / "rows.json"
    path.write_text(text)
    got = list(_iter_json_array(path, chunk=chunk))
    assert [obj for _, obj in got] == json.loads(text)
    # Each element is numbered by the line it starts on.
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if line.startswith(("{", "42"))]
    assert [line for line, _ in got] == starts
    path.write_text(text.replace('"n": 0', '"n": 0,,'))
    with pytest.raises(DataError, match=r"rows\.json, line 4: not valid JSON"):
        list(_iter_json_array(path, chunk=chunk))
