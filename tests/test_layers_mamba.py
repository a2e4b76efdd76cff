"""Mamba1 and Mamba2 layers over packed rows equal their documents alone.

Reference: each document run alone through the model's own unmodified forward (a deep copy, no
``enable_varlen``), and for the scans, transformers' own torch scan on each document alone.
Chunk sizes are 8, so documents span several chunks and start at offsets inside chunks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.bamba.modeling_bamba import mamba2_chunk_scan
from transformers.models.mamba.modeling_mamba import mamba_selective_scan

from packtune.attention.varlen import CuSeqlens
from packtune.layers import VARLEN_LAYERS, Segments
from packtune.layers.mamba1 import documents_as_rows, rows_from_documents, varlen_selective_scan
from packtune.layers.mamba2 import mamba2_mixer_forward, varlen_ssd_scan
from packtune.modeling import check_no_leak, enable_varlen

_COMMON = dict(
    hidden_size=64, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False
)
_ATTN = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
_MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8)
_MAMBA1 = dict(num_hidden_layers=2, state_size=8, intermediate_size=128, time_step_rank=8)

# One layer of each kind per family; every Mamba2 mixer with 8-token chunks and 2 B/C groups.
CONFIGS = {
    "bamba": dict(**_ATTN, **_MAMBA2, num_hidden_layers=2, attn_layer_indices=[1]),
    "granitemoehybrid": dict(
        **_ATTN, **_MAMBA2, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
        num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32,
    ),  # fmt: skip
    "nemotron_h": dict(
        **_ATTN, head_dim=16, layers_block_type=["linear_attention", "full_attention", "moe"],
        mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=8, chunk_size=8,
        n_routed_experts=4, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
    ),  # fmt: skip
    # Falcon-H1 with multipliers away from 1, so that a form that dropped one would show.
    "falcon_h1": dict(
        **_ATTN, **{**_MAMBA2, "mamba_d_ssm": 128}, num_hidden_layers=2, mamba_rms_norm=True,
        ssm_multipliers=[0.5, 1.5, 0.7, 1.2, 0.9], ssm_in_multiplier=1.3, ssm_out_multiplier=0.8,
    ),  # fmt: skip
    "falcon_h1_no_norm": dict(
        **_ATTN, **{**_MAMBA2, "mamba_d_ssm": 128}, num_hidden_layers=1, mamba_rms_norm=False,
        ssm_multipliers=[0.5, 1.5, 0.7, 1.2, 0.9], ssm_in_multiplier=1.3,
    ),  # fmt: skip
    "zamba2": dict(
        num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, num_hidden_layers=2,
        layers_block_type=["linear_attention", "hybrid"], n_mamba_heads=8, mamba_headdim=16, mamba_ngroups=2,
        mamba_d_state=8, chunk_size=8, attention_hidden_size=128, attention_head_dim=32, adapter_rank=8,
    ),  # fmt: skip
    "mamba2": dict(num_hidden_layers=2, num_heads=8, head_dim=16, n_groups=2, state_size=8, chunk_size=8),
    "jamba": dict(
        **_ATTN, num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, num_experts=2, mamba_d_state=8, mamba_dt_rank=8,
    ),  # fmt: skip
    "mamba": _MAMBA1,
    "falcon_mamba": _MAMBA1,
    "zamba": dict(
        num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, num_hidden_layers=3,
        attn_layer_period=3, attn_layer_offset=2, attention_hidden_size=128, attention_head_dim=32,
        n_mamba_heads=2, mamba_dt_rank=8, mamba_d_state=8,
    ),  # fmt: skip
}


def _tiny(name: str, seed: int = 0, **overrides):
    model_type = "falcon_h1" if name.startswith("falcon_h1") else name
    cfg = AutoConfig.for_model(model_type, **_COMMON, **{**CONFIGS[name], **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _packed_vs_alone(model, reference, lengths, seed=1):
    """Largest relative difference of the logits, and of any parameter's gradient, between the
    packed row (through ``model``) and each document alone (through ``reference``)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (1, sum(lengths)), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    weights = torch.randn(packed.shape, generator=gen)
    (packed * weights).sum().backward()
    logit_err, start = 0.0, 0
    for n in lengths:
        alone = reference(input_ids=ids[:, start : start + n], position_ids=pos[:, start : start + n], use_cache=False)
        (alone.logits * weights[:, start : start + n]).sum().backward()
        logit_err = max(logit_err, _rel(packed[:, start : start + n].detach(), alone.logits.detach()))
        start += n
    grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters(), strict=True)]
    assert all((p is None) == (q is None) for p, q in grads)
    grad_err = max(_rel(p, q) for p, q in grads if q is not None and q.abs().max() > 0)
    return logit_err, grad_err


# Documents longer than the chunk (8), starting inside chunks; the second case puts short
# documents after a long one at large offsets.
LENGTHS = [(17, 5, 30, 9), (70, 3, 21, 12)]


@pytest.mark.parametrize("lengths", LENGTHS, ids=["17-5-30-9", "70-3-21-12"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_row_equals_documents_alone(name, lengths):
    model = _tiny(name)
    reference = copy.deepcopy(model)
    enable_varlen(model)
    model.train(), reference.train()
    logit_err, grad_err = _packed_vs_alone(model, reference, lengths)
    assert logit_err < 2e-5 and grad_err < 2e-5, (logit_err, grad_err)


@pytest.mark.parametrize("name", ["bamba", "jamba", "mamba"])
def test_without_the_varlen_forms_the_comparison_fails(name):
    """The same comparison catches a layer whose state crosses documents (the model's own forms,
    attention still varlen): the test above can fail."""
    model = _tiny(name)
    reference = copy.deepcopy(model)
    enable_varlen(model)
    for module in model.modules():
        module.__dict__.pop("forward", None)  # back to the classes' own forward
    logit_err, grad_err = _packed_vs_alone(model, reference, LENGTHS[0])
    assert logit_err > 1e-3 and grad_err > 1e-3


@pytest.mark.parametrize("name", ["jamba", "mamba", "bamba"])
def test_gradient_checkpointing_recomputes_per_document(name):
    """The checkpointed unit (Jamba's decoder layer, Mamba's block) gets no boundaries from its
    caller; its replay in the backward pass must still restart at every document."""
    model = _tiny(name)
    reference = copy.deepcopy(model)
    enable_varlen(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(), reference.train()
    logit_err, grad_err = _packed_vs_alone(model, reference, LENGTHS[0])
    assert logit_err < 2e-5 and grad_err < 2e-5, (logit_err, grad_err)


def test_batch_of_packed_rows():
    """Two packed rows: every row restarts too (documents are counted over the flattened rows)."""
    model = _tiny("bamba")
    reference = copy.deepcopy(model)
    enable_varlen(model).eval(), reference.eval()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 24), generator=gen)
    pos = torch.tensor([list(range(11)) + list(range(13)), list(range(24))])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits
        for row, cuts in ((0, (0, 11, 24)), (1, (0, 24))):
            for a, b in zip(cuts, cuts[1:]):
                alone = reference(input_ids=ids[row : row + 1, a:b], position_ids=pos[row : row + 1, a:b]).logits
                assert _rel(packed[row : row + 1, a:b], alone) < 2e-5


def test_check_no_leak_passes():
    for name in ("bamba", "jamba", "mamba"):
        check_no_leak(enable_varlen(_tiny(name)))


def test_packed_row_cannot_fill_a_cache():
    model = _tiny("bamba")
    mixer = model.model.layers[0].mamba
    seg_kwargs = _boundaries_kwargs([3, 5])
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        mamba2_mixer_forward(mixer, torch.randn(1, 8, 64), cache=object(), **seg_kwargs)


def test_every_family_has_a_row():
    for kind in (
        "BambaMixer", "GraniteMoeHybridMambaLayer", "NemotronHMamba2Mixer", "FalconH1Mixer", "Zamba2MambaMixer",
        "Mamba2Mixer", "JambaMambaDecoderLayer", "MambaForCausalLM", "FalconMambaForCausalLM", "ZambaMambaMixer",
    ):  # fmt: skip
        assert kind in VARLEN_LAYERS


# ----------------------------------------------------------------------------- the scans alone


def _boundaries_kwargs(lengths):
    from packtune.attention.hf import BOUNDARIES_KWARG, Boundaries

    cu = CuSeqlens.validate("cu", torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]))
    return {BOUNDARIES_KWARG: Boundaries(cu, cu)}


def _segments(lengths, rows=1):
    cu = CuSeqlens.validate("cu", torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]))
    return Segments.build(cu, rows=rows, length=sum(lengths) // rows)


def _ssd_inputs(total, heads=4, head_dim=3, groups=2, state=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, total, heads, head_dim, generator=gen, dtype=torch.float32)
    dt = torch.randn(1, total, heads, generator=gen, dtype=torch.float32)
    A = -torch.rand(heads, generator=gen, dtype=torch.float32) * 2
    B = torch.randn(1, total, groups, state, generator=gen, dtype=torch.float32)
    C = torch.randn(1, total, groups, state, generator=gen, dtype=torch.float32)
    D = torch.randn(heads, generator=gen, dtype=torch.float32)
    dt_bias = torch.randn(heads, generator=gen, dtype=torch.float32)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]


def _ssd(x, dt, A, B, C, D, dt_bias, chunk, seg=None):
    kwargs = dict(D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.0, float("inf")))
    if seg is None:
        return mamba2_chunk_scan(x, dt, A, B, C, chunk, **kwargs)
    return varlen_ssd_scan(x, dt, A, B, C, seg, chunk, **kwargs)


def _per_document(fn, lengths, tensors, token_dim):
    """``fn`` on each document's slice of the token-indexed ``tensors``, concatenated."""
    outs, start = [], 0
    for n in lengths:
        sliced = [t.narrow(token_dim, start, n) if t.dim() > 2 else t for t in tensors]
        outs.append(fn(*sliced))
        start += n
    return torch.cat(outs, dim=token_dim)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    chunk=st.sampled_from([1, 4, 8, 16]),
    seed=st.integers(0, 2**16),
)
def test_ssd_scan_equals_transformers_scan_per_document(lengths, chunk, seed):
    inputs = _ssd_inputs(sum(lengths), seed=seed)
    packed = _ssd(*inputs, chunk, seg=_segments(lengths))
    alone = _per_document(lambda *t: _ssd(*t, chunk), lengths, inputs, token_dim=1)
    # Both compute in fp32 (transformers' scan casts to it), with chunks cut at other places.
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(packed)
    got = torch.autograd.grad(packed, inputs, grad)
    want = torch.autograd.grad(alone, inputs, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))


def test_ssd_scan_cuts_are_exact_zeros():
    """Nothing of one document reaches another: the gradient of a later document's output with
    respect to an earlier document's inputs is exactly zero, and nothing is NaN."""
    lengths = (19, 13)
    x, dt, A, B, C, D, dt_bias = _ssd_inputs(sum(lengths))
    with torch.no_grad():
        dt[:, :19] += 30.0  # steep decays: exp underflows to exactly 0 within the document
    out = _ssd(x, dt, A, B, C, D, dt_bias, 8, seg=_segments(lengths))
    gx, gb = torch.autograd.grad(out[:, 19:].sum(), (x, B))
    assert torch.isfinite(out).all()
    assert gx[:, :19].abs().max() == 0 and gb[:, :19].abs().max() == 0


def _selective_inputs(total, channels=6, state=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(1, channels, total, generator=gen, dtype=torch.float64)
    delta = torch.randn(1, channels, total, generator=gen, dtype=torch.float64)
    A = -torch.rand(channels, state, generator=gen, dtype=torch.float64) * 2
    B = torch.randn(1, state, total, generator=gen, dtype=torch.float64)
    C = torch.randn(1, state, total, generator=gen, dtype=torch.float64)
    D = torch.randn(channels, generator=gen, dtype=torch.float64)
    z = torch.randn(1, channels, total, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]


def _selective(u, delta, A, B, C, D, z, bias, seg=None):
    kwargs = dict(D=D, z=z, delta_bias=bias, delta_softplus=True)
    if seg is None:
        return mamba_selective_scan(u, delta, A, B, C, **kwargs)
    return varlen_selective_scan(u, delta, A, B, C, seg, **kwargs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_selective_scan_equals_transformers_scan_per_document(lengths, seed):
    inputs = _selective_inputs(sum(lengths), seed=seed)
    packed = _selective(*inputs, seg=_segments(lengths))
    # transformers' loop carries the state in the input dtype: the reference runs in float64 too.
    alone = _per_document(_selective, lengths, inputs, token_dim=2)
    torch.testing.assert_close(packed, alone, rtol=1e-9, atol=1e-9)
    grad = torch.randn_like(packed)
    for g, w in zip(torch.autograd.grad(packed, inputs, grad), torch.autograd.grad(alone, inputs, grad)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=2, max_size=6), seed=st.integers(0, 2**16))
def test_documents_laid_one_per_row_scan_alone(lengths, seed):
    """The CUDA path's layout, with transformers' torch scan standing in for the kernel: the
    documents padded one per row and scanned at once equal each document alone."""
    rows = 2 if sum(lengths) % 2 == 0 else 1
    seg = _segments(lengths, rows=rows)
    inputs = _selective_inputs(sum(lengths), seed=seed)
    u, delta, A, B, C, D, z, bias = [t.detach() for t in inputs]
    as_rows = [t.reshape(t.shape[1], rows, -1).transpose(0, 1) for t in (u, delta, B, C, z)]
    docs = [documents_as_rows(t, seg) for t in as_rows]
    out = rows_from_documents(_selective(docs[0], docs[1], A, docs[2], docs[3], D, docs[4], bias), seg)
    alone = _per_document(_selective, lengths, [u, delta, A, B, C, D, z, bias], token_dim=2)
    torch.testing.assert_close(out.transpose(0, 1).reshape(alone.shape), alone, rtol=1e-9, atol=1e-9)
    assert torch.equal(rows_from_documents(documents_as_rows(as_rows[0], seg), seg), as_rows[0])


# ----------------------------------------------------------------------------- CUDA
# The kernels' Triton blocks want dimensions of at least 16: chunks and states of 16 here.


def _cuda_segments(lengths):
    cu = CuSeqlens.validate("cu", _segments(lengths).cu.tensor, device="cuda")
    return Segments.build(cu, rows=1, length=sum(lengths))


@pytest.mark.gpu
def test_cuda_ssd_scan_with_seq_idx_equals_documents_alone():
    pytest.importorskip("mamba_ssm")
    lengths = (37, 5, 70, 12)
    inputs = [t.detach().cuda() for t in _ssd_inputs(sum(lengths), heads=4, head_dim=16, state=16)]
    packed = _ssd(*inputs, 16, seg=_cuda_segments(lengths))
    alone = _per_document(lambda *t: _ssd(*[x.cpu() for x in t], 16), lengths, inputs, token_dim=1)
    assert _rel(packed.cpu(), alone) < 5e-3


@pytest.mark.gpu
def test_cuda_selective_scan_equals_documents_alone():
    pytest.importorskip("mamba_ssm")
    lengths = (37, 5, 70, 12)
    inputs = [t.detach().float().cuda() for t in _selective_inputs(sum(lengths), state=16)]
    packed = _selective(*inputs, seg=_cuda_segments(lengths))
    alone = _per_document(_selective, lengths, [t.cpu() for t in inputs], token_dim=2)
    assert _rel(packed.cpu(), alone) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name, overrides",
    [
        ("bamba", dict(mamba_chunk_size=16, mamba_d_state=16)),
        ("nemotron_h", dict(chunk_size=16, ssm_state_size=16)),
        ("jamba", dict(mamba_d_state=16)),
        ("mamba", dict(state_size=16)),
    ],
)
def test_cuda_packed_row_equals_documents_alone(name, overrides):
    pytest.importorskip("mamba_ssm")
    pytest.importorskip("causal_conv1d")
    model = _tiny(name, **overrides).cuda()
    reference = copy.deepcopy(model)
    enable_varlen(model).eval(), reference.eval()
    lengths = LENGTHS[1]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (1, sum(lengths)), generator=gen).cuda()
    pos = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        start = 0
        for n in lengths:
            alone = reference(input_ids=ids[:, start : start + n], position_ids=pos[:, start : start + n]).logits
            assert _rel(packed[:, start : start + n], alone) < 5e-3
            start += n


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_packed_row_equals_documents_alone_through_peft(task_type):
    """LoRA on the mixers' projections; a PeftModel made without a task type calls the LM
    directly, past its LoraModel: the boundaries must reach the mixers either way."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["in_proj"], init_lora_weights=False, task_type=task_type)
    model = peft.get_peft_model(_tiny("bamba"), config)
    reference = copy.deepcopy(model)
    enable_varlen(model)
    logit_err, grad_err = _packed_vs_alone(model, reference, LENGTHS[0])
    assert logit_err < 2e-5 and grad_err < 2e-5, (logit_err, grad_err)
