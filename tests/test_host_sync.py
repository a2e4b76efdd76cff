"""A varlen forward reads its document boundaries on the host once, not once per layer.

On CUDA every host read of a device tensor (``.tolist()``, ``.item()``, ``int(t)``,
``bool(t)``, ...) waits for the GPU: a read per attention layer is a device sync per layer.
``enable_varlen``'s boundary hook validates ``cu_seqlens`` and computes ``max_seqlen`` once
where the batch enters the model and hands every layer the validated ``Boundaries``. These
tests count every host read during one forward (and backward) of the same model at 4 and 8
layers: the count must not grow with depth. It is counted on the CPU, where the same code runs.
"""

from __future__ import annotations

import types

import pytest
import torch

from helpers import tiny_model
from packtune.modeling import enable_varlen

LENGTHS = [5, 9, 3, 7]


def _batch(explicit: bool):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (1, sum(LENGTHS)), generator=gen)
    pos = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    kwargs = dict(input_ids=ids, position_ids=pos, use_cache=False)
    if explicit:  # packtune's batch format (the training loop's); int64 on purpose
        cu = torch.tensor([0, 5, 14, 17, 24])
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    return kwargs


def _reads_of_one_step(model_type: str, layers: int, explicit: bool, checkpointing: bool, counts) -> int:
    extra = {"layer_types": ["sliding_attention", "full_attention"] * (layers // 2)} if model_type == "gemma2" else {}
    model = tiny_model(model_type, "packtune_varlen", num_hidden_layers=layers, **extra)
    enable_varlen(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = _batch(explicit)
    counts.clear()
    logits = model(**batch).logits
    logits.float().square().mean().backward()
    return sum(counts.values())


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])  # gemma2: soft-capping, the math path
@pytest.mark.parametrize("explicit", [True, False], ids=["cu_seq_lens", "position_ids"])
def test_host_reads_do_not_grow_with_depth(host_reads, model_type, explicit):
    shallow = _reads_of_one_step(model_type, 4, explicit, False, host_reads)
    deep = _reads_of_one_step(model_type, 8, explicit, False, host_reads)
    assert deep == shallow, f"{shallow} host reads at 4 layers, {deep} at 8: a read per layer ({dict(host_reads)})"
    # The boundary hook validates them once: a handful of reads per forward, whatever the depth.
    assert shallow <= 4, f"{shallow} host reads in one training step ({dict(host_reads)})"


def test_recomputed_layers_read_nothing_either(host_reads):
    """Gradient checkpointing replays each layer with the same validated boundaries."""
    shallow = _reads_of_one_step("llama", 4, True, True, host_reads)
    deep = _reads_of_one_step("llama", 8, True, True, host_reads)
    assert deep == shallow <= 4, (shallow, deep, dict(host_reads))


def test_the_counter_sees_a_read_per_layer_without_the_hook(host_reads):
    """Without ``enable_varlen`` each layer validates on its own: the count grows with depth,
    which shows the counter can see what the tests above rule out."""

    def reads(layers: int) -> int:
        model = tiny_model("llama", "packtune_varlen", num_hidden_layers=layers)
        host_reads.clear()
        with torch.no_grad():
            model(**_batch(True))
        return sum(host_reads.values())

    assert reads(8) - reads(4) >= 4


def test_validated_boundaries_survive_fsdp_input_casting(host_reads):
    """FSDP2 with a half ``param_dtype`` rebuilds every decoder layer's keyword arguments
    (dataclasses included) to cast float tensors; the boundaries' int32 tensor stays the same
    object, so the layers still use the validated boundaries without a host read."""
    from torch.distributed.utils import _apply_to_tensors  # what FSDP2's cast_forward_inputs runs

    from packtune.attention.hf import BOUNDARIES_KWARG, forward_boundaries, packtune_attention_forward

    bounds = forward_boundaries(torch.tensor([0, 5, 14, 17, 24]), torch.tensor([0, 5, 14, 17, 24]), torch.device("cpu"))
    kwargs = {"cu_seq_lens_q": bounds.q.tensor, "cu_seq_lens_k": bounds.k.tensor, BOUNDARIES_KWARG: bounds}
    cast = _apply_to_tensors(lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t, kwargs)
    assert cast[BOUNDARIES_KWARG] is not bounds and cast[BOUNDARIES_KWARG].q.tensor is kwargs["cu_seq_lens_q"]
    module = types.SimpleNamespace(is_causal=True, config=types.SimpleNamespace())
    q = torch.randn(1, 4, 24, 8)
    host_reads.clear()
    out, _ = packtune_attention_forward(module, q, q, q, None, **cast)
    assert sum(host_reads.values()) == 0, dict(host_reads)
    assert out.shape == (1, 24, 4, 8)
