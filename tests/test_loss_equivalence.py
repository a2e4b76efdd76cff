"""One optimizer step's gradient does not depend on packing (issue 2, section 5)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

import packtune  # noqa: F401  (registers packtune_varlen)
from helpers import random_samples
from packtune.distributed import DistEnv
from packtune.loss import REDUCTIONS, target_weights
from packtune.packing.collate import collate_padded, collate_varlen
from packtune.packing.packs import get_pack, layout_packs
from packtune.recipe.engines.plain import PlainEngine
from packtune.recipe.step import accumulate_gradients

VOCAB = 96


def _config():
    return AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    varlen = AutoModelForCausalLM.from_config(copy.deepcopy(_config()), attn_implementation="packtune_varlen")
    padded = AutoModelForCausalLM.from_config(copy.deepcopy(_config()), attn_implementation="sdpa")
    padded.load_state_dict(varlen.state_dict())
    return varlen, padded


def _engine(model):
    settings = SimpleNamespace(max_norm=0.0, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, warmup_ratio=0.0, lora=None, model_config=None)
    return PlainEngine(model, DistEnv(), settings, total_steps=1, compute_dtype=torch.float32)


def _step_grads(model, batches, reduction):
    engine = _engine(model)
    model.zero_grad(set_to_none=True)
    result = accumulate_gradients(engine, batches, reduction)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return result.loss, grads


def _reference(models, samples, reduction):
    """Every sample alone in its own padded row, one micro-batch, plain sdpa attention."""
    _, padded = models
    layout, _ = layout_packs(samples, 64, "none")
    batch = collate_padded([get_pack(samples, layout, p) for p in range(len(layout))])
    return _step_grads(padded, [batch], reduction)


def _packed(models, samples, reduction, strategy, max_length, batch_size):
    """Packed with varlen: ``batch_size`` packs flattened per row, each row one micro-batch."""
    varlen, _ = models
    layout, report = layout_packs(samples, max_length, strategy)
    assert report.packed == len(samples)
    packs = [get_pack(samples, layout, p) for p in range(len(layout))]
    micro_batches = [collate_varlen(packs[i : i + batch_size]) for i in range(0, len(packs), batch_size)]
    return _step_grads(varlen, micro_batches, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "strategy,max_length,batch_size",
    [("bfd", 16, 1), ("bfd", 24, 2), ("sequential", 20, 1), ("bfd", 40, 3), ("sequential", 16, 100)],
)
def test_packed_step_gradient_equals_unpacked(models, reduction, strategy, max_length, batch_size):
    samples = random_samples(seed=max_length + batch_size)
    ref_loss, ref = _reference(models, samples, reduction)
    loss, got = _packed(models, samples, reduction, strategy, max_length, batch_size)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10_000),
    reduction=st.sampled_from(REDUCTIONS),
    strategy=st.sampled_from(["bfd", "sequential"]),
    max_length=st.integers(13, 48),
    batch_size=st.integers(1, 4),
)
def test_packing_never_changes_the_step(models, seed, reduction, strategy, max_length, batch_size):
    samples = random_samples(seed, n=5)
    ref_loss, ref = _reference(models, samples, reduction)
    loss, got = _packed(models, samples, reduction, strategy, max_length, batch_size)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_reductions_weigh_samples_as_documented():
    # Two samples: 1 trained target and 3 trained targets.
    labels = torch.tensor([[-100, 5, -100, 7, 8, 9]])
    cu = torch.tensor([0, 2, 6])
    _, token = target_weights(labels, cu, "token")
    _, sample = target_weights(labels, cu, "sample")
    _, square = target_weights(labels, cu, "square")
    assert token.tolist() == [1, 0, 1, 1, 1, 0]
    assert sample.tolist() == pytest.approx([1, 0, 1 / 3, 1 / 3, 1 / 3, 0])
    assert square.tolist() == pytest.approx([1, 0, 3**-0.5, 3**-0.5, 3**-0.5, 0])
    with pytest.raises(ValueError, match="unknown loss_reduction 'mean'"):
        target_weights(labels, cu, "mean")


def test_logits_are_computed_only_at_trained_positions(models):
    """The vocabulary projection runs on trained positions only, with the same loss."""
    from transformers import AutoModelForCausalLM

    from helpers import FAMILIES, tiny_config
    from packtune.loss import weighted_loss_sum
    from packtune.loss_head import takes_logits_mask
    from packtune.recipe.step import forward_loss_sum

    for family in FAMILIES:  # every family of the equivalence tests takes the mask
        assert takes_logits_mask(type(AutoModelForCausalLM.from_config(tiny_config(family)))), family
    varlen, _ = models
    samples = random_samples(seed=3)
    layout, _ = layout_packs(samples, 32, "bfd")
    batch = collate_varlen([get_pack(samples, layout, p) for p in range(len(layout))])
    targets, weights = target_weights(batch.labels, batch.cu_seqlens, "token")
    seen = []
    # What the output layer is handed (its input: the plain head projects it whole, the
    # chunked head of packtune.loss_head chunk by chunk).
    hook = varlen.lm_head.register_forward_pre_hook(lambda m, i: seen.append(i[0].shape))
    try:
        kept = forward_loss_sum(varlen, batch, targets, weights)
    finally:
        hook.remove()
    full = weighted_loss_sum(varlen(**batch.model_inputs()).logits, targets, weights)
    assert seen[0][-2] == int((targets != -100).sum()) < batch.input_ids.numel()
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-6)
