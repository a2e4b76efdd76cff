"""Preference rows, pairs in packs, config checks (issue 17, Settings and Data)."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from packtune.config.settings import ConfigError, Settings
from packtune.data import DataOptions, load_tokenizer
from packtune.data.formats import detect_format
from packtune.data.templates import get_template
from packtune.demo_data import build_demo_pairs
from packtune.packing.packs import IGNORE_INDEX
from packtune.preference.data import PairEncoder, build_preference_dataset, to_pair, truncate_pair

ROWS = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}]},
    {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
     "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
    {"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
     "rejected": {"from": "gpt", "value": "5"}},
    # UltraFeedback binarized (train_prefs): a `prompt` string beside whole conversations.
    {"prompt": "2+2?", "prompt_id": "a1", "score_chosen": 8.0, "score_rejected": 2.0,
     "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
     "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
     "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]
BASE = dict(dataset="x.jsonl", model_config=dict(model_type="llama"), tokenizer_name_or_path="packtune://mistral-v1")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("packtune://mistral-v1")


@pytest.mark.parametrize("row", ROWS, ids=["strings", "trl-prompt", "trl-whole", "llamafactory", "ultrafeedback"])
def test_every_shape_is_the_same_pair(row, tok):
    assert detect_format([row]) == "preference"
    assert to_pair(row)[:3] == to_pair(ROWS[0])[:3]
    enc = PairEncoder(tok, get_template("mistral", tok))
    ids, labels, lengths, margins, bad, kept = enc.encode([row])
    assert not bad and lengths.tolist()[0] == lengths.tolist()[1]
    chosen = labels[:lengths[0]]
    # exactly the reply and its end-of-turn are trained, as for an SFT reply
    assert tok.decode([t for t in chosen if t != IGNORE_INDEX]) == "4</s>"


def test_multi_turn_prompt_replies_are_context(tok):
    row = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                      {"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}
    ids, labels, lengths, *_ = PairEncoder(tok, get_template("mistral", tok)).encode([row])
    assert tok.decode([t for t in labels[:lengths[0]] if t != IGNORE_INDEX]) == "4</s>"


def test_bad_rows_are_counted_per_reason(tmp_path, tok):
    rows = ROWS + [{"prompt": "a", "chosen": "b"}, {"prompt": "a", "chosen": "b", "rejected": "b"},
                   {"prompt": "a", "chosen": "", "rejected": "c"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = build_preference_dataset(DataOptions(dataset=str(path), max_length=64, prompt_template="mistral", data_cache_dir=str(tmp_path)), tok)
    r = ds.report
    assert r.samples_read == 8 and r.kept == 5 and r.packed == 5 and r.documents == 10
    assert r.skipped == {"missing_field": 1, "identical_completions": 1, "empty_reply": 1}


def test_overflow_every_pair_accounted_for(tmp_path, tok):
    rows = [{"prompt": "Say it", "chosen": " ".join(["word"] * n), "rejected": "no"} for n in (2, 40, 80)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for overflow, packed in (("truncate", 3), ("drop", 1)):
        ds = build_preference_dataset(DataOptions(dataset=str(path), max_length=48, prompt_template="mistral", data_cache_dir=str(tmp_path),
                                                  overflow=overflow), tok)
        assert ds.report.packed == packed and ds.report.kept == ds.report.packed + sum(ds.report.dropped.values())
        assert all(int(ds[p]["cu_seqlens"][-1]) <= 48 for p in range(len(ds)))
    with pytest.raises(ValueError, match="overflow = 'error'"):
        build_preference_dataset(DataOptions(dataset=str(path), max_length=48, prompt_template="mistral", data_cache_dir=str(tmp_path),
                                             overflow="error"), tok)
    assert truncate_pair(30, 10, 24) == (14, 10)


@pytest.mark.parametrize("bad,key", [
    (dict(method="dpo", dataset_format="alpaca"), "dataset_format"),
    (dict(method="sft", dataset_format="preference"), "method"),
    (dict(method="orpo", dpo_loss="ipo"), "dpo_loss"),
    (dict(method="dpo", simpo_gamma=1.0), "simpo_gamma"),
    (dict(method="simpo", ref_model="org/ref"), "ref_model"),
    (dict(method="orpo", precompute_ref_log_probs=True), "precompute_ref_log_probs"),
    (dict(method="sft", beta=0.2), "beta"),
    (dict(method="reward", beta=0.2), "beta"),
    (dict(method="dpo", loss_reduction="sample"), "loss_reduction"),
    (dict(method="dpo", center_rewards_coefficient=0.1), "center_rewards_coefficient"),
    (dict(method="dpo", pack_strategy="concat"), "pack_strategy"),
    (dict(method="kto"), "method"),
    (dict(method="reward", evaluation_inputs=["Hi"]), "evaluation_inputs"),
])
def test_invalid_combinations_are_rejected_with_a_fix(bad, key):
    with pytest.raises(ConfigError) as err:
        Settings(**BASE, **bad)
    assert key in [p.key for p in err.value.problems] and all(p.fix for p in err.value.problems)


def test_valid_preference_settings():
    s = Settings(**BASE, method="orpo", beta=0.2, loss_reduction="sample", dataset_format="preference")
    assert (s.method, s.beta, s.loss_reduction) == ("orpo", 0.2, "sample")
    Settings(**BASE, method="reward", center_rewards_coefficient=0.01)


def test_bundled_demo_pairs_are_build_demo_pairs():
    text = resources.files("packtune").joinpath("assets/demo_pairs.jsonl").read_text()
    assert [json.loads(line) for line in text.splitlines()] == build_demo_pairs()


def test_log_dataset_shows_pairs(tmp_path, monkeypatch, capsys):
    """``packtune log-dataset`` on a DPO config packs and shows pairs: each pair's chosen then
    rejected sequence, the reply marked as trained, the report counting pairs."""
    from packtune.cli.main import main

    monkeypatch.setenv("PACKTUNE_CACHE", str(tmp_path / "cache"))
    assert main(["log-dataset", "tiny_mistral_dpo_demo", "--show", "1", "--cfg-options", "max_samples=8"]) == 0
    out = capsys.readouterr().out
    assert "(whole pairs)" in out  # the report of the pair packer
    docs = [line for line in out.splitlines() if line.startswith("--- document")]
    roles = [line.split(", ")[1] for line in docs]
    assert len(docs) % 2 == 0 and len(docs) >= 4
    for chosen, rejected in zip(roles[0::2], roles[1::2]):
        pair = chosen.removesuffix(" chosen")
        assert chosen.endswith(" chosen") and rejected == f"{pair} rejected"
    assert out.count("[/INST]«") == len(docs)  # every completion trained from the end of its prompt
