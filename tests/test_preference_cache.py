"""Preference pairs and precomputed reference log-probs in the data cache (issue 17, Settings
``precompute_ref_log_probs``: "computed once before training and cached with the packed data").

* Pairs are cached like SFT data: a second build reads both levels from the cache (the rows are
  not encoded again) and gives the same arrays and report; a packing setting re-packs only.
* Reference log-probs are stored beside the pairs: a second run on the same pairs and reference
  loads them without running the reference, bit for bit; another reference's weights, or another
  compute dtype, computes them again.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import packtune.preference.data as pdata
from packtune.data import DataOptions, load_tokenizer
from packtune.preference.data import build_preference_dataset
from packtune.preference.model import Reference, precompute_reference, weights_fingerprint
from packtune.preference.objective import Objective
from packtune.preference.step import collate_pairs, sequence_scores

ROWS = [{"prompt": f"What is {a} + {b}?", "chosen": str(a + b), "rejected": str(a + b + 1 + a % 3)}
        for a in range(6) for b in range(3)]
DPO = Objective("dpo", "sigmoid", beta=0.1)
PARTS = {"dtype": "torch.float32", "device": "cpu", "use_varlen_attn": True, "attn_backend": "auto",
         "loss_chunk_size": 7, "sequence_parallel_size": 1}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("packtune://mistral-v1")


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _options(path, cache, **kw) -> DataOptions:
    return DataOptions(dataset=str(path), max_length=kw.pop("max_length", 64), prompt_template="mistral",
                       data_cache_dir=str(cache), shuffle_before_pack=True, **kw)


def _counting_encoder(monkeypatch) -> list[int]:
    calls: list[int] = []
    encode = pdata.PairEncoder.encode

    def counted(self, rows):
        calls.append(len(rows))
        return encode(self, rows)

    monkeypatch.setattr(pdata.PairEncoder, "encode", counted)
    return calls


def _same_data(a, b) -> None:
    for name in ("input_ids", "labels", "offsets"):
        assert np.array_equal(getattr(a.samples, name), getattr(b.samples, name)), name
    for name in ("doc_start", "doc_end", "pack_offsets"):
        assert np.array_equal(getattr(a.layout, name), getattr(b.layout, name)), name
    assert np.array_equal(a.margins, b.margins) and np.array_equal(a.row_ids, b.row_ids)
    assert [a[p]["pair_ids"].tolist() for p in range(len(a))] == [b[p]["pair_ids"].tolist() for p in range(len(b))]


def test_pairs_are_cached_like_sft_data(tok, pairs_file, tmp_path, monkeypatch):
    calls = _counting_encoder(monkeypatch)
    cache = tmp_path / "cache"
    first = build_preference_dataset(_options(pairs_file, cache), tok)
    assert calls and not first.report.cache_hit and not first.report.tokenize_cache_hit
    assert first.cache_key is not None and first.report.cache_dir == str(cache / "data")
    calls.clear()
    second = build_preference_dataset(_options(pairs_file, cache), tok)
    assert calls == [] and second.report.cache_hit and second.report.tokenize_cache_hit
    assert second.cache_key == first.cache_key
    _same_data(first, second)
    skip = {"cache_hit", "tokenize_cache_hit"}
    assert {k: v for k, v in second.report.as_dict().items() if k not in skip} == \
        {k: v for k, v in first.report.as_dict().items() if k not in skip}
    # A packing setting re-packs the cached pairs; the rows are not encoded again.
    repacked = build_preference_dataset(_options(pairs_file, cache, max_length=48), tok)
    assert calls == [] and repacked.report.tokenize_cache_hit and not repacked.report.cache_hit
    assert repacked.cache_key != first.cache_key and repacked.report.max_length == 48
    # Other rows are other data.
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:-1]))
    fewer = build_preference_dataset(_options(pairs_file, cache), tok)
    assert calls and not fewer.report.tokenize_cache_hit and fewer.report.kept == len(ROWS) - 1


def _model(seed: int, vocab: int):
    cfg = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=128)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="packtune_varlen").eval()


def _reference(module, calls: list[int]) -> Reference:
    def fn(mb, layout):
        calls.append(mb.pairs)
        with torch.no_grad():
            return sequence_scores(module, mb, layout, DPO, torch.float32, 7, None)
    return Reference(fn, module)


def test_reference_log_probs_are_cached_beside_the_pairs(tok, pairs_file, tmp_path):
    cache = tmp_path / "cache"
    policy_start = _model(0, len(tok))
    calls: list[int] = []
    first = build_preference_dataset(_options(pairs_file, cache), tok)
    assert precompute_reference(first, _reference(policy_start, calls), collate_pairs, torch.device("cpu"), PARTS) is False
    assert sum(calls) == len(ROWS)
    computed = np.array(first.ref_logps)
    assert computed.shape == (2 * len(ROWS),) and np.isfinite(computed).all()
    assert list((cache / "data").glob("reflogps-*"))

    # A second run: the pairs and the same reference weights (another copy) come from the cache.
    calls.clear()
    again = build_preference_dataset(_options(pairs_file, cache), tok)
    assert again.report.cache_hit
    same = copy.deepcopy(policy_start)
    assert precompute_reference(again, _reference(same, calls), collate_pairs, torch.device("cpu"), PARTS) is True
    assert calls == [] and np.array_equal(again.ref_logps, computed)
    pack = again[0]
    assert np.array_equal(pack["ref_logps"], computed.reshape(-1, 2)[pack["pair_ids"]].reshape(-1))

    # Another reference (one weight moved), or another compute dtype, computes them again.
    with torch.no_grad():
        same.model.norm.weight[0] += 1e-3
    moved = build_preference_dataset(_options(pairs_file, cache), tok)
    assert precompute_reference(moved, _reference(same, calls), collate_pairs, torch.device("cpu"), PARTS) is False
    assert sum(calls) == len(ROWS) and not np.array_equal(moved.ref_logps, computed)
    calls.clear()
    other = build_preference_dataset(_options(pairs_file, cache), tok)
    assert precompute_reference(other, _reference(policy_start, calls), collate_pairs, torch.device("cpu"),
                                {**PARTS, "dtype": "torch.bfloat16"}) is False
    assert sum(calls) == len(ROWS) and np.array_equal(other.ref_logps, computed)  # same fp32 model: same values
    # Other pairs (another layout) are never given these log-probs.
    calls.clear()
    repacked = build_preference_dataset(_options(pairs_file, cache, max_length=48), tok)
    assert precompute_reference(repacked, _reference(policy_start, calls), collate_pairs, torch.device("cpu"), PARTS) is False
    assert sum(calls) == len(ROWS)


def test_weights_fingerprint_sees_weights_config_and_skips_the_adapter():
    a, b = _model(0, 64), _model(0, 64)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    assert weights_fingerprint(a) != weights_fingerprint(_model(1, 64))
    assert weights_fingerprint(a) != weights_fingerprint(a.to(torch.bfloat16))
    from packtune.recipe.model_setup import apply_lora

    base = _model(0, 64)
    lora = apply_lora(copy.deepcopy(base), {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"]})
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    before = weights_fingerprint(lora, skip="lora_")
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.add_(1.0)  # the adapter trains: the reference (adapter disabled) is the same
    assert weights_fingerprint(lora, skip="lora_") == before
    assert weights_fingerprint(lora) != before
