"""Labels: -100 everywhere except assistant replies. Every assistant turn of a multi-turn
conversation is trained with its end-of-turn token; the system prompt, user turns and tool
results never are. Checked on real tokens (Mistral v1 tokenizer) through the pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from packtune.data import DataOptions, build_dataset, get_template, load_tokenizer
from packtune.data.templates import TEMPLATES
from packtune.data.tokenize import encode_segments
from packtune.packing.packs import IGNORE_INDEX

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("packtune://mistral-v1", cache_dir=tmp_path_factory.getbasetemp() / "tokcache")


def trained_runs(tok, ids: np.ndarray, labels: np.ndarray) -> list[str]:
    """The trained stretches of a sample, decoded one by one."""
    mask = labels != IGNORE_INDEX
    assert (labels[mask] == ids[mask]).all()  # a trained label is the token itself (unshifted)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]


def sample(ds, i):
    s = ds.samples
    a, b = int(s.offsets[i]), int(s.offsets[i + 1])
    return np.asarray(s.input_ids[a:b]), np.asarray(s.labels[a:b])


@pytest.fixture(scope="module")
def sharegpt(tok, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return build_dataset(DataOptions(dataset=str(FIXTURES / "sharegpt.json"), prompt_template="chatml",
                                     data_cache_dir=str(cache), max_length=512), tok)


def test_every_reply_trained_with_its_end_of_turn(tok, sharegpt):
    ids, labels = sample(sharegpt, 0)
    assert trained_runs(tok, ids, labels) == [
        "Hello! How can I help?<|im_end|>",
        '{"name": "get_weather", "arguments": {"city": "Paris"}}<|im_end|>',
        "It is 21 degrees and clear in Paris.<|im_end|>",
    ]


def test_system_tools_users_and_tool_results_are_never_trained(tok, sharegpt):
    for i in range(len(sharegpt.samples)):
        ids, labels = sample(sharegpt, i)
        trained = "".join(trained_runs(tok, ids, labels))
        context = tok.decode(ids[labels == IGNORE_INDEX].tolist())
        for text in ("You can call these tools", "temperature", "Hi there", "What is 2+2?", "You are terse.",
                     "A top-level system prompt.", "<|im_start|>"):
            assert text not in trained
        assert "system" in context or "user" in context


def test_system_prompt_option_is_context(tok, tmp_path):
    ds = build_dataset(DataOptions(dataset=str(FIXTURES / "alpaca.json"), prompt_template="mistral",
                                   system_prompt="Answer like a pirate.", data_cache_dir=str(tmp_path)), tok)
    ids, labels = sample(ds, 0)
    assert "Answer like a pirate." in tok.decode(ids.tolist())
    assert trained_runs(tok, ids, labels) == ["5</s>"]
    # A sample with its own system prompt keeps it.
    ids, labels = sample(ds, 2)
    text = tok.decode(ids.tolist())
    assert "Be polite." in text and "pirate" not in text


def test_multi_turn_alpaca_history_trains_every_reply(tok, tmp_path):
    ds = build_dataset(DataOptions(dataset=str(FIXTURES / "alpaca.json"), prompt_template="llama2_chat",
                                   data_cache_dir=str(tmp_path)), tok)
    ids, labels = sample(ds, 3)  # the row with history
    assert [r.strip() for r in trained_runs(tok, ids, labels)] == ["One. </s>", "Two. </s>", "Three. </s>"]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_token_labels_follow_the_segments_for_every_template(tok, name):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    segs = get_template(name, tok).render(conv)
    ids, labels, lengths = encode_segments(tok, [segs])
    # The same tokens as tokenizing the whole text at once.
    whole = tok("".join(t for t, _ in segs), add_special_tokens=False)["input_ids"]
    assert ids.tolist() == whole and lengths.tolist() == [len(whole)]
    runs = trained_runs(tok, ids, labels)
    assert len(runs) == 2
    assert runs[0].lstrip().startswith("Hello!") and runs[1].lstrip().startswith("Goodbye.")
    context = tok.decode(ids[labels == IGNORE_INDEX].tolist())
    assert "Be brief." in context and "Hi" in context and "Bye" in context
    if get_template(name, tok).stop[0] == "</s>":
        assert runs[0].endswith("</s>") and runs[1].endswith("</s>")


def test_first_label_of_each_packed_document_is_masked(tok, sharegpt):
    for p in range(len(sharegpt)):
        pack = sharegpt[p]
        assert (pack["labels"][pack["cu_seqlens"][:-1]] == IGNORE_INDEX).all()


def test_nothing_trainable_after_truncation_is_dropped_and_counted(tok, tmp_path):
    long_prompt = "word " * 300
    path = tmp_path / "long.jsonl"
    path.write_text(f'{{"instruction": "{long_prompt}", "input": "", "output": "ok"}}\n'
                    '{"instruction": "short", "input": "", "output": "fine"}\n')
    ds = build_dataset(DataOptions(dataset=str(path), max_length=64, data_cache_dir=str(tmp_path / "c")), tok)
    r = ds.report
    assert r.dropped == {"no_trainable_token": 1} and r.kept == 2 and r.packed == 1
    assert r.kept == r.packed + sum(r.dropped.values())
