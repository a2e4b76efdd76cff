"""Preference training on packed rows equals one pair per padded batch (issue 17, Exactness).

The reference (``preference_reference.plain_step``) is written independently of
packtune.preference: each pair alone as a padded batch of two rows through the model's own sdpa
forward with full logits, TRL 1.16's formulas, the mean over the pairs of the step.
"""

from __future__ import annotations

import pytest
import torch
from preference_reference import packed_step, pair_dataset, plain_step, random_pairs, tiny_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from packtune.preference.objective import Objective

CASES = [
    Objective("dpo", "sigmoid", beta=0.3),
    Objective("dpo", "ipo", beta=0.3),
    Objective("dpo", "hinge", beta=0.3),
    Objective("simpo", beta=2.0, simpo_gamma=0.4),
    Objective("orpo", beta=0.5),
    Objective("orpo", beta=0.5, loss_reduction="sample"),
    Objective("reward"),
    Objective("reward", center_rewards_coefficient=0.1),
]


@pytest.fixture(scope="module")
def models():
    """(packed policy, padded policy, packed ref, padded ref) for causal LMs and reward models."""
    out = {}
    for cls in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        packed, padded = tiny_model(cls, "packtune_varlen", 0), tiny_model(cls, "sdpa", 0)
        padded.load_state_dict(packed.state_dict())
        ref_packed, ref_padded = tiny_model(cls, "packtune_varlen", 1), tiny_model(cls, "sdpa", 1)
        ref_padded.load_state_dict(ref_packed.state_dict())
        out[cls] = (packed, padded, ref_packed.eval(), ref_padded.eval())
    return out


@pytest.mark.parametrize("objective", CASES, ids=lambda o: f"{o.method}-{o.dpo_loss}-{o.loss_reduction}-{o.center_rewards_coefficient}")
@pytest.mark.parametrize("max_length,batch_size,chunk", [(40, 1, 1024), (24, 2, 3), (64, 3, None)])
def test_packed_equals_one_pair_per_padded_batch(models, objective, max_length, batch_size, chunk):
    cls = AutoModelForSequenceClassification if objective.method == "reward" else AutoModelForCausalLM
    packed, padded, ref_packed, ref_padded = models[cls]
    samples, margins = random_pairs(seed=max_length)
    want_loss, want_grads, want_acc = plain_step(objective, padded, ref_padded, samples, margins)
    dataset = pair_dataset(samples, margins, max_length)
    accumulation = -(-len(dataset) // batch_size) + 1  # one empty micro-batch too (an epoch's end)
    result, grads = packed_step(objective, packed, ref_packed, dataset, batch_size, accumulation, chunk)
    assert result.pairs == len(margins)
    assert result.loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert torch.allclose(grads, want_grads, rtol=1e-5, atol=1e-6), float((grads - want_grads).abs().max())
    key = "accuracy" if objective.method == "reward" else "rewards/accuracies"
    assert result.metrics[key] == pytest.approx(want_acc)


def test_pairs_never_split(models):
    samples, margins = random_pairs(seed=3, n=20)
    dataset = pair_dataset(samples, margins, 32)
    seen = []
    for p in range(len(dataset)):
        pack = dataset[p]
        cu = pack["cu_seqlens"]
        assert (len(cu) - 1) == 2 * len(pack["pair_ids"])
        for k, pair in enumerate(pack["pair_ids"]):
            for side in (0, 1):
                s = 2 * pair + side
                a, b = int(cu[2 * k + side]), int(cu[2 * k + side + 1])
                assert pack["input_ids"][a:b].tolist() == samples.input_ids[samples.offsets[s]:samples.offsets[s + 1]].tolist()
                assert pack["position_ids"][a:b].tolist() == list(range(b - a))
            seen.append(int(pair))
    assert sorted(seen) == list(range(20))
