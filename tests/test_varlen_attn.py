"""``varlen_attn_func`` against an independent dense reference.

The reference below never splits the packed sequence into documents: it builds the full
``total_q x total_k`` score matrix of the whole packed row in float64, and one mask that is
block-diagonal (same document), bottom-right causal, windowed, with soft-capping and ALiBi
applied as flash-attn defines them. Every backend that runs on CPU (``sdpa``, ``eager`` and
``auto``) must match it in the forward pass and in the gradients of q, k and v.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packtune.attention import backends, buckets
from packtune.attention.buckets import plan_buckets
from packtune.attention.varlen import AttnRequest, varlen_attn_func
from varlen_reference import (
    dense_reference,
    call_cost,
    _cu,
    _inputs,
    _tol,
    check_against_reference,
)

CPU_BACKENDS = ("sdpa", "eager", "auto")


# ----------------------------------------------------------------------------- the reference itself


def test_reference_matches_plain_attention_for_one_document():
    """Sanity check of the test's own reference against textbook softmax attention."""
    q, k, v, _ = _inputs([7], [7], heads=2, kv_heads=2)
    out, lse = dense_reference(q, k, v, [0, 7], [0, 7], causal=True)
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(8)
    s = s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double())
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, s.logsumexp(-1))


def test_reference_blocks_documents():
    """Changing one document's keys does not change another document's reference output."""
    q, k, v, _ = _inputs([3, 4], [3, 4])
    a, _ = dense_reference(q, k, v, [0, 3, 7], [0, 3, 7])
    k2 = k.clone()
    k2[3:] = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(9))
    b, _ = dense_reference(q, k2, v, [0, 3, 7], [0, 3, 7])
    torch.testing.assert_close(a[:3], b[:3])
    assert not torch.allclose(a[3:], b[3:])


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_basic(backend, causal):
    check_against_reference([5, 1, 9, 3], backend=backend, causal=causal)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lq_differs_from_lk(backend, causal):
    """Bottom-right causal alignment; rows that see no key (Lq > Lk, or Lk == 0) give zeros."""
    lq, lk = [3, 6, 2, 4, 5], [7, 2, 2, 0, 5]
    out = check_against_reference(lq, lk, backend=backend, causal=causal)
    cu_q = _cu(lq).tolist()
    # Document 3 has no keys at all: zeros.
    assert torch.count_nonzero(out[cu_q[3] : cu_q[4]]) == 0
    if causal:
        # Document 1 (6 queries, 2 keys): its first 4 queries see no key.
        assert torch.count_nonzero(out[cu_q[1] : cu_q[1] + 4]) == 0
        assert torch.count_nonzero(out[cu_q[1] + 4 : cu_q[2]]) > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "causal,window",
    [
        (True, (2, -1)),
        (True, (0, 0)),
        (True, (3, 0)),
        (False, (2, 2)),
        (False, (-1, 1)),
        (False, (1, -1)),
        (False, (0, 0)),
        (False, (-1, 0)),
    ],
)
def test_sliding_window(backend, causal, window):
    check_against_reference([6, 1, 10, 4], backend=backend, causal=causal, window=window)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_window_with_lq_differs_from_lk(backend):
    check_against_reference([4, 6, 3], [6, 3, 3], backend=backend, causal=False, window=(1, 2))
    check_against_reference([4, 6, 3], [6, 3, 3], backend=backend, causal=True, window=(2, 0))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap(backend, causal):
    check_against_reference([5, 8, 2], backend=backend, causal=causal, softcap=2.0, scale=1.5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("per_doc", [False, True], ids=["heads", "docs_heads"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi(backend, per_doc, causal):
    lq, lk = [5, 8, 2], [5, 6, 4]
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    if per_doc:
        slopes = torch.stack([slopes, slopes * 2, slopes * 0.5])
    check_against_reference(lq, lk, backend=backend, causal=causal, alibi=slopes)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_alibi_softcap_window_together(backend):
    slopes = torch.tensor([0.3, 0.2, 0.1, 0.05])
    check_against_reference(
        [7, 3, 9], backend=backend, causal=True, window=(3, 0), softcap=3.0, alibi=slopes, kv_heads=2
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_mqa(backend, kv_heads, causal):
    check_against_reference([4, 7, 3], backend=backend, kv_heads=kv_heads, causal=causal)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("v_dim", [5, 12], ids=["smaller", "larger"])
def test_v_head_dim_differs(backend, v_dim):
    """MLA: v has its own head_dim (with GQA, a window and softcap for good measure)."""
    check_against_reference([4, 7, 3], backend=backend, v_dim=v_dim, causal=True)
    check_against_reference([4, 7, 3], backend=backend, v_dim=v_dim, kv_heads=2, window=(2, 0), causal=True)
    check_against_reference([4, 7, 3], backend=backend, v_dim=v_dim, softcap=4.0, causal=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_zero_length_documents(backend, causal):
    check_against_reference([0, 3, 0, 0, 5, 0], backend=backend, causal=causal)
    check_against_reference([0, 3, 0, 2], [2, 3, 0, 0], backend=backend, causal=causal)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_tokens_at_all(backend):
    q, k, v, _ = _inputs([0, 0], [0, 0])
    q.requires_grad_()
    v.requires_grad_()
    out = varlen_attn_func(q, k, v, _cu([0, 0]), _cu([0, 0]), 0, 0, causal=True, backend=backend)
    assert out.shape == (0, 4, 8)
    out.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_one_document(backend, causal):
    check_against_reference([13], backend=backend, causal=causal)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_token_documents(backend):
    check_against_reference([1] * 9, backend=backend, causal=True)
    check_against_reference([1] * 9, [3] * 9, backend=backend, causal=True)


@pytest.mark.parametrize("backend", ["sdpa"])
def test_many_tiny_documents(backend):
    """128 documents of 32 tokens: one bucket on the sdpa path; compared in row chunks."""
    lengths = [32] * 128
    plan = plan_buckets(tuple(_cu(lengths).tolist()), tuple(_cu(lengths).tolist()), True, (-1, -1), 2 * 16)
    assert len(plan.buckets) == 1 and plan.q_map.identity and plan.k_map.identity
    q, k, v, g = _inputs(lengths, lengths, heads=2, kv_heads=2, dim=8)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    cu = _cu(lengths)
    out = varlen_attn_func(*leaves, cu, cu, 32, 32, causal=True, backend=backend)
    for start in range(0, 4096, 1024):
        ref, _ = dense_reference(q, k, v, cu.tolist(), cu.tolist(), causal=True, rows=slice(start, start + 1024))
        torch.testing.assert_close(out[start : start + 1024].double(), ref, **_tol(torch.float32))
    # Gradients: documents are independent, so each must equal the gradient of that document alone.
    (out * g).sum().backward()
    for d in (0, 57, 127):
        a, b = 32 * d, 32 * (d + 1)
        ref_leaves = [t[a:b].detach().double().requires_grad_() for t in (q, k, v)]
        ref, _ = dense_reference(*ref_leaves, [0, 32], [0, 32], causal=True)
        (ref * g[a:b].double()).sum().backward()
        for mine, theirs in zip(leaves, ref_leaves):
            torch.testing.assert_close(mine.grad[a:b].double(), theirs.grad, **_tol(torch.float32))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int64_cu_seqlens(backend):
    out64 = check_against_reference([3, 5, 2], backend=backend, causal=True, cu_dtype=torch.int64)
    out32 = check_against_reference([3, 5, 2], backend=backend, causal=True, cu_dtype=torch.int32)
    torch.testing.assert_close(out64, out32, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmax_scale(backend):
    check_against_reference([4, 6], backend=backend, causal=True, scale=0.05)
    check_against_reference([4, 6], backend=backend, causal=False, scale=2.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(backend, dtype):
    check_against_reference([6, 3, 9], backend=backend, dtype=dtype, causal=True, kv_heads=2)
    check_against_reference([6, 3, 9], [4, 3, 9], backend=backend, dtype=dtype, window=(2, 1))
    check_against_reference([6, 3, 9], backend=backend, dtype=dtype, causal=True, softcap=5.0, v_dim=6)


def test_half_precision_alibi():
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    for backend in CPU_BACKENDS:
        check_against_reference([6, 3, 9], backend=backend, dtype=torch.bfloat16, causal=True, alibi=slopes)


# ----------------------------------------------------------------------------- lse


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_return_attn_probs_lse(causal):
    lq, lk = [3, 5, 0, 4], [3, 2, 2, 4]
    q, k, v, _ = _inputs(lq, lk, kv_heads=2)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    for backend in ("eager", "auto"):
        out, lse, probs = varlen_attn_func(
            q, k, v, _cu(lq), _cu(lk), 5, 4, causal=causal, softcap=3.0, alibi_slopes=slopes,
            return_attn_probs=True, backend=backend,
        )
        ref, ref_lse = dense_reference(
            q, k, v, _cu(lq).tolist(), _cu(lk).tolist(), causal=causal, softcap=3.0, alibi=slopes
        )
        assert probs is None
        assert lse.shape == (4, sum(lq)) and lse.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, **_tol(torch.float32))
        finite = torch.isfinite(ref_lse)
        if causal:
            assert not bool(finite.all())  # document 1 has rows that see no key
        torch.testing.assert_close(lse.double()[finite], ref_lse[finite], **_tol(torch.float32))
        # A row that sees no key has log-sum-exp +inf, as flash-attn reports it.
        assert bool((lse[~finite] == float("inf")).all())


def test_auto_picks_eager_for_lse_and_sdpa_otherwise():
    def req(**kw):
        base = dict(
            device_type="cpu", dtype=torch.float32, causal=True, window=(-1, -1), softcap=0.0, dropout_p=0.0,
            alibi=False, return_lse=False, head_dim=8, v_head_dim=8, gqa=False, needs_grad=True,
        )
        return AttnRequest(**{**base, **kw})

    assert backends.choose(req(), "auto") == "sdpa"
    assert backends.choose(req(softcap=2.0, alibi=True, window=(3, 0)), "auto") == "sdpa"
    assert backends.choose(req(return_lse=True), "auto") == "eager"
    assert backends.choose(req(dtype=torch.bfloat16), "auto") == "sdpa"


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_dropout_is_unbiased_and_stays_inside_documents(backend):
    """Dropout can't be compared exactly: check it changes the output, keeps its expectation
    (inverted dropout), never produces NaN, and never lets documents see each other."""
    n, length = 400, 6
    base_q, base_k, base_v, _ = _inputs([length], [length], heads=2, kv_heads=2, seed=1)
    q, k, v = (t.repeat(n, 1, 1) for t in (base_q, base_k, base_v))
    cu = _cu([length] * n)
    exact = varlen_attn_func(q, k, v, cu, cu, length, length, causal=True, backend=backend)
    torch.manual_seed(0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dropped = varlen_attn_func(*leaves, cu, cu, length, length, dropout_p=0.5, causal=True, backend=backend)
    assert torch.isfinite(dropped).all()
    assert not torch.allclose(dropped, exact)
    # Each of the n identical documents drew its own dropout pattern: they differ...
    per_doc = dropped.detach().view(n, length, 2, 8)
    assert not torch.allclose(per_doc[0], per_doc[1])
    # ...and their mean converges to the exact output (inverted dropout keeps the expectation).
    mean = per_doc.mean(0)
    stderr = per_doc.std(0) / math.sqrt(n)
    target = exact.view(n, length, 2, 8)[0]
    z = (mean - target).abs() / (stderr + 1e-6)
    assert bool(((mean - target).abs() <= 5 * stderr + 1e-4).all()), f"worst deviation {float(z.max()):.1f} sigma"
    # The first query of each document sees only itself: dropout keeps it (x2) or drops it (0).
    first = per_doc[:, 0]
    kept = torch.isclose(first, 2 * target[0].expand_as(first), rtol=1e-4, atol=1e-5)
    zero = first.abs() <= 1e-6
    assert bool((kept | zero).all())
    assert 0.3 < float(kept.float().mean()) < 0.7
    dropped.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)

    # Isolation under dropout: with the same random stream, changing document 1 leaves document 0.
    lengths = [5, 7, 4]
    q, k, v, _ = _inputs(lengths, lengths, seed=3)
    cu = _cu(lengths)
    torch.manual_seed(1)
    a = varlen_attn_func(q, k, v, cu, cu, 7, 7, dropout_p=0.3, causal=True, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[5:12] = torch.randn(7, 4, 8, generator=torch.Generator().manual_seed(9))
    v2[5:12] -= 2.0
    torch.manual_seed(1)
    b = varlen_attn_func(q, k2, v2, cu, cu, 7, 7, dropout_p=0.3, causal=True, backend=backend)
    torch.testing.assert_close(a[:5], b[:5], rtol=0, atol=0)
    torch.testing.assert_close(a[12:], b[12:], rtol=0, atol=0)
    assert not torch.allclose(a[5:12], b[5:12])


def test_dropout_with_softcap_is_unbiased():
    """The batched-math path (softcap) applies dropout too."""
    n, length = 600, 5
    base = _inputs([length], [length], heads=2, kv_heads=2, seed=2)[:3]
    q, k, v = (t.repeat(n, 1, 1) for t in base)
    cu = _cu([length] * n)
    exact = varlen_attn_func(q, k, v, cu, cu, length, length, causal=True, softcap=2.0, backend="sdpa")
    torch.manual_seed(0)
    dropped = varlen_attn_func(q, k, v, cu, cu, length, length, dropout_p=0.4, causal=True, softcap=2.0, backend="sdpa")
    per_doc = dropped.view(n, length, 2, 8)
    target = exact.view(n, length, 2, 8)[0]
    assert not torch.allclose(dropped, exact)
    stderr = per_doc.std(0) / math.sqrt(n)
    assert bool(((per_doc.mean(0) - target).abs() <= 5 * stderr + 1e-4).all())


# ----------------------------------------------------------------------------- hypothesis


@st.composite
def _cases(draw):
    n_docs = draw(st.integers(1, 6))
    lq = draw(st.lists(st.integers(0, 11), min_size=n_docs, max_size=n_docs))
    cross = draw(st.booleans())
    lk = draw(st.lists(st.integers(0, 11), min_size=n_docs, max_size=n_docs)) if cross else list(lq)
    heads, kv_heads = draw(st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 2)]))
    v_dim = draw(st.sampled_from([8, 8, 4, 10]))
    causal = draw(st.booleans())
    window = (draw(st.sampled_from([-1, -1, 0, 1, 3])), draw(st.sampled_from([-1, -1, 0, 2])))
    softcap = draw(st.sampled_from([0.0, 0.0, 0.0, 2.5]))
    alibi_kind = draw(st.sampled_from([None, None, None, "heads", "docs"]))
    alibi = None
    if alibi_kind == "heads":
        alibi = torch.linspace(0.05, 0.6, heads)
    elif alibi_kind == "docs":
        alibi = torch.linspace(0.05, 0.6, heads).repeat(n_docs, 1) * torch.arange(1, n_docs + 1).unsqueeze(1) / 2
    return dict(
        lq=lq, lk=lk, heads=heads, kv_heads=kv_heads, v_dim=v_dim, causal=causal, window=window, softcap=softcap,
        alibi=alibi, seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases(), cost=st.sampled_from([None, 0.0, 2e3]))
def test_random_documents_and_features(case, cost):
    check_against_reference(backend="eager", **case)
    with call_cost(buckets.CALL_COST if cost is None else cost):
        check_against_reference(backend="sdpa", **case)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_multi_bucket_plans(causal):
    """Documents of many shapes, one bucket per shape, out of order: sdpa must still be exact."""
    lq, lk = [5, 0, 3, 9, 3, 1, 5, 7, 2, 0], [5, 4, 3, 9, 6, 1, 2, 7, 0, 3]
    with call_cost(0.0):
        cu_q, cu_k = tuple(_cu(lq).tolist()), tuple(_cu(lk).tolist())
        assert len(plan_buckets(cu_q, cu_k, causal, (-1, -1), 4 * 16).buckets) > 3
        for kw in (dict(), dict(window=(2, 1)), dict(softcap=3.0), dict(kv_heads=1, v_dim=5)):
            check_against_reference(lq, lk, backend="sdpa", causal=causal, **kw)
            check_against_reference(lq, lq, backend="sdpa", causal=causal, **kw)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases())
def test_random_documents_bf16(case):
    check_against_reference(backend="sdpa", dtype=torch.bfloat16, grads=False, **case)


