"""MiniMax lightning attention trains packed exactly like its documents alone."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packed_reference import assert_packed_equals_alone, build
from packtune.attention.varlen import CuSeqlens
from packtune.layers import VARLEN_LAYERS, install_varlen_layers
from packtune.layers.lightning import lightning_attention_varlen
from packtune.layers.segments import Segments

BLOCK = 16
CONFIG = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    num_local_experts=4,
    num_experts_per_tok=2,
    # Two lightning layers (their slopes shrink with depth), one softmax attention layer; blocks of
    # 16 tokens (the checkpoints' 256 would hold every test document in one block).
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    block_size=BLOCK,
)
# Documents longer than a block, at large offsets: blocks end inside documents, documents start inside blocks.
LONG = [[40, 17, 5, 33, 9, 24]]


@functools.lru_cache(maxsize=None)
def _layer(block_size: int, heads: int = 2, head_dim: int = 8):
    """A real ``MiniMaxLightningAttention`` (layer 0: the strongest decays), for its decay buffers."""
    from transformers import AutoConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    cfg = AutoConfig.for_model(
        "minimax", **dict(CONFIG, num_attention_heads=heads, head_dim=head_dim, block_size=block_size)
    )
    return MiniMaxLightningAttention(cfg, layer_idx=0)


def _decays(layer):
    return layer.slope_rate, layer.query_decay, layer.key_decay, layer.diagonal_decay


def _segments(lengths: list[int], rows: int = 1) -> Segments:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return Segments.build(CuSeqlens.validate("cu", cu), rows=rows, length=sum(lengths) // rows)


def _per_document(lengths, q, k, v, slope):
    """The definition, per document, in float64: o_i = sum_{j<=i} exp(-s (i - j)) (q_i . k_j) v_j."""
    out, start = [], 0
    for n in lengths:
        part = slice(start, start + n)
        i = torch.arange(n, dtype=torch.float64)
        gap = i[:, None] - i[None, :]
        decay = torch.where(gap >= 0, torch.exp(-slope.double() * gap), torch.zeros((), dtype=torch.float64))
        scores = q[:, :, part].double() @ k[:, :, part].double().transpose(-1, -2)
        out.append((scores * decay) @ v[:, :, part].double())
        start += n
    return torch.cat(out, dim=-2)


def test_install_switches_the_lightning_layers():
    model = build("minimax", **CONFIG)
    assert install_varlen_layers(model) == ["MiniMaxLightningAttention"]
    assert VARLEN_LAYERS["MiniMaxLightningAttention"] == "packtune.layers.lightning:varlen_lightning_forward"
    switched = ["forward" in vars(layer.self_attn) for layer in model.model.layers]
    assert switched == [True, False, True]


def test_model_packed_equals_documents_alone():
    assert_packed_equals_alone(build("minimax", **CONFIG), LONG)


def test_positions_alone_and_rows_equal_documents_alone():
    assert_packed_equals_alone(build("minimax", **CONFIG), [[30, 21, 3], [2, 52]], by_positions=True)


def test_transformers_layer_leaks_on_the_same_check(monkeypatch):
    """The contrast: transformers' own layer carries its K^T V state into the next document."""
    from packtune.layers import lightning

    monkeypatch.setattr(lightning, "packed_segments", lambda module, rows, length, cache, kwargs: None)
    with pytest.raises(AssertionError, match="logits of row 0 tokens 40:57"):
        assert_packed_equals_alone(build("minimax", **CONFIG), LONG)


def test_unpacked_input_runs_the_layers_own_forward():
    from packtune.modeling import enable_varlen

    model = build("minimax", **CONFIG).eval()
    ids = torch.randint(3, 128, (2, 40))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        enable_varlen(model)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_packed_row_refuses_to_fill_a_cache():
    from packtune.modeling import enable_varlen

    model = enable_varlen(build("minimax", **CONFIG).eval())
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with pytest.raises(NotImplementedError, match="MiniMaxLightningAttention: a packed row of several documents cannot fill a recurrent cache"):
        model(input_ids=torch.randint(3, 128, (1, 12)), position_ids=pos, use_cache=True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    block_size=st.sampled_from([4, 8, 16]),
    rows=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_scan_equals_the_definition_per_document(lengths, block_size, rows, seed):
    if sum(lengths) % rows:
        lengths = [*lengths, 1]  # rows of equal length: the documents may cross the row break
    total = sum(lengths)
    layer = _layer(block_size)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, total, 8, generator=gen) * 0.5 for _ in range(3))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    per_row = [x.view(2, rows, total // rows, 8).transpose(0, 1) for x in leaves]  # (rows, heads, length, D)
    out = lightning_attention_varlen(*per_row, _segments(lengths, rows), *_decays(layer))
    out = out.transpose(0, 1).reshape(1, 2, total, 8)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = _per_document(lengths, *ref_leaves, layer.slope_rate)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (out.double() * grad).sum().backward()
    (ref * grad).sum().backward()
    for name, mine, theirs in zip("qkv", leaves, ref_leaves):
        torch.testing.assert_close(
            mine.grad.double(), theirs.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}"
        )
