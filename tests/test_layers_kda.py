"""Kimi delta attention (kimi_linear, bailing_hybrid) trains packed exactly like its documents alone."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.kimi_linear import modeling_kimi_linear as kimi

from packed_reference import assert_close_scaled, assert_packed_equals_alone, build
from packtune.attention.varlen import CuSeqlens
from packtune.layers import VARLEN_LAYERS, install_varlen_layers
from packtune.layers.kda import CHUNK_SIZE, chunk_kda_varlen, kda_scan
from packtune.layers.segments import Segments

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=128,
    pad_token_id=0,  # the checkpoints' pad ids lie outside a tiny vocabulary
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    layer_types=["linear_attention", "full_attention"],
    mlp_layer_types=["dense", "sparse"],
    moe_intermediate_size=32,
    num_local_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
)
CONFIGS = {
    "kimi_linear": dict(_COMMON, linear_head_dim=16, linear_num_heads=4),
    "bailing_hybrid": dict(_COMMON, head_dim=16),  # its KDA heads are its attention heads
}
# Documents longer than a chunk (64), one of them starting at a large offset, so chunk boundaries
# fall inside documents and documents start inside chunks.
LONG = [[100, 17, 5, 70, 9]]


def _segments(lengths: list[int], rows: int = 1, device="cpu") -> Segments:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return Segments.build(CuSeqlens.validate("cu", cu, device=device), rows=rows, length=sum(lengths) // rows)


def _kda_inputs(total: int, heads: int = 2, dim: int = 8, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, total, heads, dim, generator=gen) for _ in range(3))
    # Log decays as the layers make them: negative, weak on some channels, down to -30 a step on
    # others (Kimi's gate is unbounded below), so decays summed over a chunk reach the hundreds.
    g = -torch.rand(1, total, heads, dim, generator=gen) * torch.tensor([0.05, 0.5, 5.0, 30.0]).repeat(dim // 4)
    beta = torch.rand(1, total, heads, generator=gen)
    return [x.to(device) for x in (q, k, v, g, beta)]


def _per_document(lengths, q, k, v, g, beta, chunk_size):
    """transformers' own chunked KDA run on each document alone, concatenated."""
    out, start = [], 0
    for n in lengths:
        part = slice(start, start + n)
        o, _ = kimi.chunk_kimi_delta_attention(
            q[:, part], k[:, part], v[:, part], g[:, part], beta[:, part],
            chunk_size=chunk_size, use_qk_l2norm_in_kernel=True,
        )
        out.append(o)
        start += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_install_switches_the_kda_layers_only(model_type):
    """The KDA mixer gets its varlen form; the MLA softmax attention beside it is not taken for one."""
    model = build(model_type, **CONFIGS[model_type])
    kind = {"kimi_linear": "KimiLinearDeltaAttention", "bailing_hybrid": "BailingHybridDeltaAttention"}[model_type]
    assert install_varlen_layers(model) == [kind]
    assert VARLEN_LAYERS[kind] == "packtune.layers.kda:varlen_kda_forward"
    assert "forward" in vars(model.model.layers[0].self_attn) and "forward" not in vars(model.model.layers[1].self_attn)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_model_packed_equals_documents_alone(model_type):
    assert_packed_equals_alone(build(model_type, **CONFIGS[model_type]), LONG)


def test_positions_alone_and_rows_equal_documents_alone():
    """Boundaries given by restarting position_ids only; two rows, one document crossing chunks."""
    model = build("kimi_linear", **CONFIGS["kimi_linear"])
    assert_packed_equals_alone(model, [[70, 31], [3, 98]], by_positions=True)


def test_transformers_layer_leaks_on_the_same_check(monkeypatch):
    """The contrast: with no boundaries reaching it, the layer runs transformers' own forward, which
    carries state (and convolution taps) from one document into the next; the check sees it."""
    from packtune.layers import kda

    monkeypatch.setattr(kda, "packed_segments", lambda module, rows, length, cache, kwargs: None)
    with pytest.raises(AssertionError, match="logits of row 0 tokens 100:117"):
        assert_packed_equals_alone(build("kimi_linear", **CONFIGS["kimi_linear"]), LONG)


def test_unpacked_input_runs_the_layers_own_forward():
    model = build("bailing_hybrid", **CONFIGS["bailing_hybrid"]).eval()
    ids = torch.randint(3, 128, (2, 40))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        from packtune.modeling import enable_varlen

        enable_varlen(model)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_packed_row_refuses_to_fill_a_cache():
    from packtune.modeling import enable_varlen

    model = enable_varlen(build("kimi_linear", **CONFIGS["kimi_linear"]).eval())
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with pytest.raises(NotImplementedError, match="KimiLinearDeltaAttention: a packed row of several documents cannot fill a recurrent cache"):
        model(input_ids=torch.randint(3, 128, (1, 12)), position_ids=pos, use_cache=True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    chunk_size=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 2**16),
)
def test_scan_equals_transformers_scan_per_document(lengths, chunk_size, seed):
    total = sum(lengths)
    q, k, v, g, beta = _kda_inputs(total, seed=seed)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
    out = chunk_kda_varlen(*leaves, _segments(lengths), chunk_size=chunk_size)
    ref = _per_document(lengths, *ref_leaves, chunk_size=chunk_size)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    for name, mine, theirs in zip(("q", "k", "v", "g", "beta"), leaves, ref_leaves):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_scan_over_rows_is_the_flattened_scan():
    """Rows are scanned as one sequence, as the boundaries count them: a document may cross rows."""
    lengths = [30, 50, 16]  # 96 tokens in 2 rows of 48: the second document crosses the row break
    q, k, v, g, beta = _kda_inputs(sum(lengths), seed=3)
    rows = [x.reshape(2, 48, *x.shape[2:]) for x in (q, k, v, g, beta)]
    out = chunk_kda_varlen(*rows, _segments(lengths, rows=2), chunk_size=CHUNK_SIZE)
    ref = _per_document(lengths, q, k, v, g, beta, chunk_size=CHUNK_SIZE)
    torch.testing.assert_close(out.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_fla_chunk_kda_with_cu_seqlens_equals_documents_alone():
    pytest.importorskip("fla")
    lengths = [100, 17, 5, 70, 9, 200]
    inputs = _kda_inputs(sum(lengths), heads=4, dim=64, device="cuda")
    leaves = [x.clone().requires_grad_() for x in inputs]
    ref_leaves = [x.detach().cpu().requires_grad_() for x in inputs]
    out = kda_scan(*leaves, _segments(lengths, device="cuda"))
    ref = _per_document(lengths, *ref_leaves, chunk_size=CHUNK_SIZE)
    # fla's Triton kernels take their fp32 dot products in tf32: 1e-2 of the largest value, where a
    # leak between documents is of the order of the values themselves.
    torch.testing.assert_close(out.float().cpu(), ref, rtol=1e-2, atol=1e-2)
    grad = torch.randn_like(ref)
    (out.float() * grad.cuda()).sum().backward()
    (ref * grad).sum().backward()
    for name, mine, theirs in zip(("q", "k", "v", "g", "beta"), leaves, ref_leaves):
        scale = float(theirs.grad.abs().max())
        torch.testing.assert_close(
            mine.grad.cpu(), theirs.grad, rtol=1e-2, atol=1e-2 * scale, msg=lambda m, n=name: f"d{n}: {m}"
        )


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_model_on_cuda_packed_equals_documents_alone(model_type):
    """On CUDA: fla's chunk_kda with cu_seqlens and causal_conv1d with seq_idx where installed,
    against the documents alone through transformers' layers (fla/causal_conv1d there too)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build(model_type, **CONFIGS[model_type]).cuda()
    assert_packed_equals_alone(model, LONG, rtol=1e-2)  # tf32 dots inside the Triton kernels


def _glm5_next_layer():
    from transformers.models.glm5_next.configuration_glm5_next import Glm5NextTextConfig
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextLinearAttention

    cfg = Glm5NextTextConfig(
        hidden_size=64, num_hidden_layers=2, linear_head_dim=16, linear_num_heads=4, vocab_size=128, pad_token_id=0
    )
    return Glm5NextTextLinearAttention(cfg, layer_idx=0)


def _model_layer(model_type):
    return build(model_type, **CONFIGS[model_type]).model.layers[0].self_attn


LAYERS = {"kimi_linear": _model_layer, "bailing_hybrid": _model_layer, "glm5_next_text": lambda _: _glm5_next_layer()}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_packed_equals_its_forward_per_document(kind):
    """Each KDA layer class alone: the varlen form on a packed row against the class's own forward
    on each document (glm5_next's text model, whose other layers are sparse attention, included)."""
    from packtune.attention.hf import BOUNDARIES_KWARG, Boundaries

    torch.manual_seed(0)
    layer = LAYERS[kind](kind).float()
    for name, param in layer.named_parameters():
        if not param.is_floating_point() or name.endswith(("A_log", "dt_bias")):
            continue
        torch.nn.init.normal_(param, std=0.3)  # random weights, also where init left ones or zeros
    with torch.no_grad():
        layer.forget_gate.A_log.uniform_(0.0, 1.5)
        layer.forget_gate.dt_bias.uniform_(-3.0, 1.0)
    lengths = [100, 17, 5, 70, 9]
    hidden = torch.randn(1, sum(lengths), 64)
    cu = CuSeqlens.validate("cu", torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]))
    reference = copy.deepcopy(layer)
    assert install_varlen_layers(layer) == [type(layer).__name__]
    mine = hidden.clone().requires_grad_()
    out = layer(mine, **{BOUNDARIES_KWARG: Boundaries(cu, cu)})
    theirs = hidden.clone().requires_grad_()
    alone = torch.cat([reference(d) for d in theirs.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(alone)
    (out * grad).sum().backward()
    (alone * grad).sum().backward()
    assert_close_scaled("input gradient", mine.grad, theirs.grad)
    for (name, p), (_, q) in zip(layer.named_parameters(), reference.named_parameters()):
        assert_close_scaled(f"gradient of {name}", p.grad, q.grad)
