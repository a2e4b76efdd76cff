"""The DPO reference (issue 17, Settings ``ref_model`` / ``precompute_ref_log_probs``, Errors).

* With LoRA the reference is the base with the adapter disabled: the packed step equals one
  pair per padded batch whose reference is a separate copy of the base.
* Precomputed reference log-probs give the step that computing them in the step gives.
* A reference whose vocabulary or tokenizer differs from the policy's is refused in one line.

(``ref_model`` loaded from a folder, and the frozen copy, are trained end to end in
``tests/test_preference_train.py``.)
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from packtune.data import load_tokenizer
from packtune.preference.model import check_same_vocabulary, make_reference, precompute_reference
from packtune.preference.objective import Objective
from packtune.preference.step import collate_pairs, sequence_scores
from packtune.errors import SetupError
from packtune.recipe.model_setup import apply_lora
from preference_reference import packed_step, pair_dataset, plain_engine, plain_step, random_pairs, tiny_model

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
DPO = Objective("dpo", "sigmoid", beta=0.3)


def _settings(**kw):
    base = dict(ref_model=None, lora=None, loss_chunk_size=5, method="dpo", dpo_loss=DPO.dpo_loss, beta=DPO.beta,
                simpo_gamma=0.5, center_rewards_coefficient=None, loss_reduction="token", trust_remote_code=False)
    return SimpleNamespace(**{**base, **kw})


def test_lora_reference_is_the_base_with_the_adapter_disabled():
    packed_base, padded_base = tiny_model(AutoModelForCausalLM, "packtune_varlen", 0), tiny_model(AutoModelForCausalLM, "sdpa", 0)
    padded_base.load_state_dict(packed_base.state_dict())
    reference_copy = copy.deepcopy(padded_base).eval()  # the plain reference: a separate copy of the base
    packed, padded = apply_lora(packed_base, LORA), apply_lora(padded_base, LORA)
    with torch.no_grad():  # a trained adapter (B = 0 at init would make the policy the base)
        torch.manual_seed(5)
        for name, p in packed.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    padded.load_state_dict(packed.state_dict())
    samples, margins = random_pairs(seed=11)
    want_loss, want_grads, want_acc = plain_step(DPO, padded, reference_copy, samples, margins)
    reference = make_reference(_settings(lora=LORA), plain_engine(packed), None, None, torch.device("cpu"), torch.float32, build_model=None)
    dataset = pair_dataset(samples, margins, 32)
    result, grads = packed_step(DPO, packed, None, dataset, 2, -(-len(dataset) // 2), 5, reference=reference)
    assert result.loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert torch.allclose(grads, want_grads, rtol=1e-5, atol=1e-6), float((grads - want_grads).abs().max())
    assert result.metrics["rewards/accuracies"] == pytest.approx(want_acc)
    assert abs(result.metrics["rewards/margins"]) > 1e-3  # the adapter is on for the policy, off for the reference
    assert all(p.grad is None for n, p in packed.named_parameters() if "lora_" not in n)


def test_precomputed_reference_gives_the_same_step():
    policy = tiny_model(AutoModelForCausalLM, "packtune_varlen", 0)
    ref = tiny_model(AutoModelForCausalLM, "packtune_varlen", 1).eval()
    samples, margins = random_pairs(seed=12)

    def reference(mb, layout):
        with torch.no_grad():
            return sequence_scores(ref, mb, layout, DPO, torch.float32, 5, None)

    live = pair_dataset(samples, margins, 40)
    want, want_grads = packed_step(DPO, policy, None, live, 2, -(-len(live) // 2), 5, reference=reference)
    cached = pair_dataset(samples, margins, 40, seed=1)  # packed in another order: the cache is per pair
    precompute_reference(cached, reference, lambda packs: collate_pairs(packs), torch.device("cpu"))
    assert cached.ref_logps.shape == (2 * margins.size,) and np.isfinite(cached.ref_logps).all()

    def never(mb, layout):
        raise AssertionError("the reference ran although its log-probs were precomputed")

    got, grads = packed_step(DPO, policy, None, cached, 3, -(-len(cached) // 3), 5, reference=never)
    assert got.loss == pytest.approx(want.loss, rel=1e-6)
    assert torch.allclose(grads, want_grads, rtol=1e-5, atol=1e-7)
    assert got.metrics == pytest.approx(want.metrics, rel=1e-6, abs=1e-9)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("packtune://mistral-v1")


def _llama(vocab: int):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, vocab_size=vocab)
    return AutoModelForCausalLM.from_config(cfg)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_reference_of_another_vocabulary_is_refused(tokenizer, tmp_path):
    with pytest.raises(SetupError) as exc:
        check_same_vocabulary(tokenizer, str(tmp_path), _llama(32001), _llama(32000))
    assert "vocabulary of 32001 tokens, the policy 32000" in _one_line(exc)


def test_reference_with_another_tokenizer_is_refused(tokenizer, tmp_path):
    import json

    tokenizer.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (next(w for w, i in vocab.items() if i == k) for k in (1000, 1001))
    vocab[a], vocab[b] = 1001, 1000  # the same size and strings, two ids swapped
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(SetupError) as exc:
        check_same_vocabulary(tokenizer, str(tmp_path), _llama(32000), _llama(32000))
    assert "another tokenizer than the policy" in _one_line(exc)
    same = tmp_path / "same"
    tokenizer.save_pretrained(same)
    check_same_vocabulary(tokenizer, str(same), _llama(32000), _llama(32000))  # the same tokenizer passes
    weights = tmp_path / "weights"
    weights.mkdir()
    check_same_vocabulary(tokenizer, str(weights), _llama(32000), _llama(32000))  # weights alone: the size decides
