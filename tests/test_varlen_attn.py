"""``varlen_attn_func`` against an independent dense reference.

The reference below never splits the packed sequence into documents: it builds the full
``total_q x total_k`` score matrix of the whole packed row in float64, and one mask that is
block-diagonal (same document), bottom-right causal, windowed, with soft-capping and ALiBi
applied as flash-attn defines them. Every backend that runs on CPU (``sdpa``, ``eager`` and
``auto``) must match it in the forward pass and in the gradients of q, k and v.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packtune.attention import backends, buckets
from packtune.attention.buckets import plan_buckets
from packtune.attention.varlen import AttnRequest, varlen_attn_func

CPU_BACKENDS = ("sdpa", "eager", "auto")


# ----------------------------------------------------------------------------- reference


def _doc_of(cu: list[int], total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document index and position inside the document of every one of ``total`` rows."""
    doc = torch.empty(total, dtype=torch.long)
    local = torch.empty(total, dtype=torch.long)
    for d, (a, b) in enumerate(zip(cu, cu[1:])):
        doc[a:b] = d
        local[a:b] = torch.arange(b - a)
    return doc, local


def dense_reference(
    q, k, v, cu_q, cu_k, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None, rows=None
):
    """Full masked softmax over the whole packed sequence, float64; returns ``(out, lse)``.

    ``rows`` (a slice) restricts the computation to some query rows (for very long inputs).
    """
    cu_q, cu_k = [int(x) for x in cu_q], [int(x) for x in cu_k]
    total_q, heads, dim = q.shape
    total_k, kv_heads, _ = k.shape
    scale = dim**-0.5 if scale is None else scale
    doc_q, i_loc = _doc_of(cu_q, total_q)
    doc_k, j_loc = _doc_of(cu_k, total_k)
    len_q = torch.tensor([b - a for a, b in zip(cu_q, cu_q[1:])])
    len_k = torch.tensor([b - a for a, b in zip(cu_k, cu_k[1:])])
    if rows is not None:
        q, doc_q, i_loc = q[rows], doc_q[rows], i_loc[rows]
    # Bottom-right alignment: query i of document d sits at key position i + Lk - Lq.
    ipos = (i_loc + len_k[doc_q] - len_q[doc_q]).unsqueeze(1)
    jpos = j_loc.unsqueeze(0)
    allowed = doc_q.unsqueeze(1) == doc_k.unsqueeze(0)
    if causal:
        allowed &= jpos <= ipos
    left, right = window
    if left >= 0:
        allowed &= jpos >= ipos - left
    if right >= 0:
        allowed &= jpos <= ipos + right

    group = heads // kv_heads
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        slopes = alibi.double()
        per_row = slopes.unsqueeze(0).expand(len(doc_q), heads) if slopes.dim() == 1 else slopes[doc_q]
        s = s - per_row.t().unsqueeze(-1) * (ipos - jpos).abs().double().unsqueeze(0)
    s = s.masked_fill(~allowed.unsqueeze(0), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    seen = allowed.any(-1)
    p = torch.softmax(s.masked_fill(~seen.view(1, -1, 1), 0.0), dim=-1) * seen.view(1, -1, 1)
    out = torch.einsum("hqk,khd->qhd", p, vv)
    return out, lse


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def call_cost(value: float):
    """Run with another bucketing call cost: 0 gives one bucket per distinct document shape,
    so tiny test inputs exercise multi-bucket plans (gathers, padding, reordering)."""
    old = buckets.CALL_COST
    buckets.CALL_COST = value
    plan_buckets.cache_clear()
    try:
        yield
    finally:
        buckets.CALL_COST = old
        plan_buckets.cache_clear()


def _cu(lengths, dtype=torch.int32) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=dtype)


def _inputs(lq, lk, heads=4, kv_heads=4, dim=8, v_dim=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v_dim = dim if v_dim is None else v_dim
    tq, tk = sum(lq), sum(lk)
    q = torch.randn(tq, heads, dim, generator=gen).to(dtype)
    k = torch.randn(tk, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(tk, kv_heads, v_dim, generator=gen).to(dtype)
    grad = torch.randn(tq, heads, v_dim, generator=gen).to(dtype)
    return q, k, v, grad


def _tol(dtype):
    return {
        torch.float32: dict(rtol=1e-5, atol=2e-5),
        torch.bfloat16: dict(rtol=2e-2, atol=4e-2),
        torch.float16: dict(rtol=5e-3, atol=8e-3),
    }[dtype]


def _grad_or_zero(t):
    return torch.zeros_like(t) if t.grad is None else t.grad


def check_against_reference(
    lq,
    lk=None,
    *,
    backend,
    heads=4,
    kv_heads=4,
    dim=8,
    v_dim=None,
    dtype=torch.float32,
    causal=False,
    window=(-1, -1),
    softcap=0.0,
    alibi=None,
    scale=None,
    cu_dtype=torch.int32,
    grads=True,
    seed=0,
):
    """Run ``varlen_attn_func`` and the dense reference on the same inputs; compare out and grads."""
    lk = lq if lk is None else lk
    q, k, v, g = _inputs(lq, lk, heads, kv_heads, dim, v_dim, dtype, seed)
    cu_q, cu_k = _cu(lq, cu_dtype), _cu(lk, cu_dtype)
    leaves = [t.clone().requires_grad_(grads) for t in (q, k, v)]
    out = varlen_attn_func(
        *leaves,
        cu_q,
        cu_k,
        max(lq, default=0),
        max(lk, default=0),
        softmax_scale=scale,
        causal=causal,
        window_size=window,
        softcap=softcap,
        alibi_slopes=alibi,
        backend=backend,
    )
    ref_leaves = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    ref, _ = dense_reference(
        *ref_leaves, cu_q.tolist(), cu_k.tolist(), causal=causal, window=window, softcap=softcap, alibi=alibi,
        scale=scale,
    )
    assert out.shape == ref.shape
    assert out.dtype == dtype
    tol = _tol(dtype)
    torch.testing.assert_close(out.double(), ref.detach(), **tol, msg=lambda m: f"forward ({backend}): {m}")
    if grads and out.numel():
        (out.double() * g.double()).sum().backward()
        (ref * g.double()).sum().backward()
        for name, mine, theirs in zip("qkv", leaves, ref_leaves):
            expected = theirs.grad
            scale_g = max(float(expected.abs().max()) if expected.numel() else 0.0, 1.0)
            torch.testing.assert_close(
                _grad_or_zero(mine).double(),
                expected,
                rtol=tol["rtol"],
                atol=tol["atol"] * scale_g,
                msg=lambda m, name=name: f"d{name} ({backend}): {m}",
            )
    return out


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


# ----------------------------------------------------------------------------- bad inputs


def _call(lq=(3, 2), lk=None, **kw):
    lk = lq if lk is None else lk
    q, k, v, _ = _inputs(list(lq), list(lk))
    args = dict(q=q, k=k, v=v, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    args.update(kw)
    return varlen_attn_func(**args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(cu_seqlens_q=torch.tensor([0, 3, 2, 5], dtype=torch.int32)), "non-decreasing"),
        (dict(cu_seqlens_q=torch.tensor([1, 3, 5], dtype=torch.int32)), "must start at 0"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 4], dtype=torch.int32)), r"must end at the number of tokens \(5\)"),
        (dict(cu_seqlens_k=torch.tensor([0, 5], dtype=torch.int32)), "same number of documents: 2 vs 1"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 5], dtype=torch.float32)), "dtype int32"),
        (dict(cu_seqlens_q=torch.tensor([[0, 3, 5]], dtype=torch.int32)), "1-D integer tensor"),
        (dict(cu_seqlens_q=torch.tensor([0], dtype=torch.int32)), "at least 2 entries"),
        (dict(max_seqlen_q=2), r"max_seqlen_q=2 is smaller than the longest query document \(3\)"),
        (dict(max_seqlen_k=1), r"max_seqlen_k=1 is smaller than the longest key document \(3\)"),
        (dict(q=torch.randn(5, 32)), "q must be a 3-D tensor"),
        (dict(k=torch.randn(1, 5, 4, 8)), "k must be a 3-D tensor"),
        (dict(v=torch.randn(5, 2, 8)), "k and v must agree"),
        (dict(q=torch.randn(5, 4, 16)), "same head_dim"),
        (dict(k=torch.randn(5, 3, 8), v=torch.randn(5, 3, 8)), r"q heads \(4\) must be a multiple of kv heads \(3\)"),
        (dict(k=torch.randn(5, 4, 8, dtype=torch.float16)), "share a dtype"),
        (dict(backend="cuda"), "unknown backend 'cuda'"),
        (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=-0.1), r"dropout_p must be in \[0, 1\)"),
        (dict(softcap=-1.0), "softcap must be >= 0"),
        (dict(window_size=(-2, 0)), "window_size entries must be >= -1"),
        (dict(alibi_slopes=torch.ones(3)), r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
        (dict(alibi_slopes=torch.ones(3, 4)), r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _call(**kwargs)


def test_bad_window_length():
    with pytest.raises(ValueError):
        _call(window_size=(1, 2, 3))


@pytest.mark.parametrize("backend", ["torch", "flash_attn"])
def test_gpu_backends_refuse_cpu(backend):
    with pytest.raises(NotImplementedError, match=f"the {backend} backend runs only on CUDA tensors, these are on cpu"):
        _call(backend=backend, causal=True)


def test_sdpa_cannot_return_lse():
    with pytest.raises(NotImplementedError, match="sdpa backend cannot return the log-sum-exp"):
        _call(backend="sdpa", return_attn_probs=True)


def test_gpu_backends_say_why_they_cannot_run():
    req = AttnRequest("cpu", torch.float32, True, (-1, -1), 0.0, 0.0, False, False, 8, 8, False, False)
    for name in ("torch", "flash_attn"):
        assert "CUDA" in backends.unsupported(name, req)
    cuda = AttnRequest("cuda", torch.float32, True, (-1, -1), 0.0, 0.0, False, False, 8, 8, False, False)
    assert "fp16 or bf16" in backends.unsupported("torch", cuda)
    big = AttnRequest("cuda", torch.bfloat16, True, (-1, -1), 0.0, 0.0, False, False, 512, 512, False, False)
    assert "head_dim <= 256" in backends.unsupported("flash_attn", big)
    mla_up = AttnRequest("cuda", torch.bfloat16, True, (-1, -1), 0.0, 0.0, False, False, 64, 128, False, False)
    assert "v_head_dim <= head_dim" in backends.unsupported("torch", mla_up)
    # A request no GPU backend takes still runs on CUDA through sdpa, never approximated.
    dropout = AttnRequest("cuda", torch.float32, True, (-1, -1), 0.0, 0.1, False, False, 8, 8, False, True)
    assert backends.choose(dropout, "auto") == "sdpa"


# ----------------------------------------------------------------------------- GPU backends' glue, on CPU
#
# The torch and flash_attn backends only run on CUDA. Their argument handling (window
# conventions, GQA, the MLA v padding and cropping, the scale, the log-sum-exp) is checked
# here against fake kernels with the documented signatures, implemented by the reference.


def _fake_kernel(q, k, v, cu_q, cu_k, causal, window, scale, softcap=0.0, alibi=None):
    assert v.shape[-1] == q.shape[-1], "flash kernels get one head_dim for q and v"
    out, lse = dense_reference(
        q, k, v, cu_q.tolist(), cu_k.tolist(), causal=causal, window=tuple(window), scale=scale, softcap=softcap,
        alibi=alibi,
    )
    return out.to(q.dtype), lse.float()


def _torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert cu_seq_q.dtype == torch.int32 and cu_seq_k.dtype == torch.int32
    if not enable_gqa:
        assert query.shape[1] == key.shape[1], "varlen_attn needs enable_gqa=True for GQA"
    # torch: window (-1, 0) is causal, (W, 0) causal with a window; bottom-right aligned like flash.
    out, lse = _fake_kernel(query, key, value, cu_seq_q, cu_seq_k, False, window_size, scale)
    return (out, lse) if return_aux is not None and return_aux.lse else out


def _torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert query.shape[1] == key.shape[1], "torch 2.10's varlen_attn has no GQA"
    out, lse = _fake_kernel(query, key, value, cu_seq_q, cu_seq_k, is_causal, (-1, -1), None)
    return (out, lse) if return_aux is not None and return_aux.lse else out


def _flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                  causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                  return_attn_probs=False, block_table=None):
    assert dropout_p == 0.0
    out, lse = _fake_kernel(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal, window_size, softmax_scale, softcap, alibi_slopes
    )
    return (out, lse, None) if return_attn_probs else out


def _gpu_glue_case(monkeypatch, name, fake, *, causal, window=(-1, -1), kv_heads=4, v_dim=8, scale=None,
                   softcap=0.0, alibi=None, lse=False):
    import inspect

    if name == "torch":
        monkeypatch.setattr(backends, "_torch_varlen", lambda: (fake, frozenset(inspect.signature(fake).parameters)))
    else:
        monkeypatch.setattr(backends, "_flash_attn_func", lambda: fake)
    lq, lk = [3, 7, 5], [3, 7, 5]
    q, k, v, _ = _inputs(lq, lk, 4, kv_heads, 8, v_dim, seed=5)
    cu_q, cu_k = _cu(lq, torch.int64), _cu(lk, torch.int64)
    scale_used = 8**-0.5 if scale is None else scale
    req = AttnRequest("cuda", torch.float32, causal, window, softcap, 0.0, alibi is not None, lse, 8, v_dim,
                      kv_heads != 4, False)
    result = backends.run(name, q, k, v, cu_q, cu_k, tuple(cu_q.tolist()), tuple(cu_k.tolist()), 7, 7,
                          scale_used, req, alibi, False)
    ref, ref_lse = dense_reference(q, k, v, cu_q.tolist(), cu_k.tolist(), causal=causal, window=window,
                                   scale=scale_used, softcap=softcap, alibi=alibi)
    out = result[0] if lse else result
    assert out.shape == (15, 4, v_dim)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
    if lse:
        assert result[2] is None
        torch.testing.assert_close(result[1].double(), ref_lse, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("fake", [_torch_2_13, _torch_2_10], ids=["torch2.13", "torch2.10"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(causal=True),
        dict(causal=False),
        dict(causal=True, kv_heads=2),
        dict(causal=True, kv_heads=1, v_dim=5),
        dict(causal=True, scale=0.07),
        dict(causal=False, scale=1.3, lse=True),
    ],
    ids=["causal", "full", "gqa", "mqa_mla", "scale", "scale_lse"],
)
def test_torch_backend_glue(monkeypatch, fake, kw):
    _gpu_glue_case(monkeypatch, "torch", fake, **kw)


@pytest.mark.parametrize("window,causal", [((3, 0), True), ((2, -1), True), ((1, 2), False)])
def test_torch_backend_glue_window(monkeypatch, window, causal):
    _gpu_glue_case(monkeypatch, "torch", _torch_2_13, causal=causal, window=window, kv_heads=2, v_dim=6)


def test_torch_2_10_refuses_windows_and_auto_falls_back(monkeypatch):
    import inspect

    params = frozenset(inspect.signature(_torch_2_10).parameters)
    monkeypatch.setattr(backends, "_torch_varlen", lambda: (_torch_2_10, params))
    monkeypatch.setattr(backends, "_flash_attn_func", lambda: None)
    req = AttnRequest("cuda", torch.bfloat16, True, (3, 0), 0.0, 0.0, False, False, 64, 64, True, True)
    assert "sliding window" in backends.unsupported("torch", req)
    assert backends.choose(req, "auto") == "sdpa"
    plain = AttnRequest("cuda", torch.bfloat16, True, (-1, -1), 0.0, 0.0, False, False, 64, 64, True, True)
    assert backends.choose(plain, "auto") == "torch"
    for what, r in (
        ("dropout", AttnRequest("cuda", torch.bfloat16, True, (-1, -1), 0.0, 0.1, False, False, 64, 64, False, True)),
        ("softcap", AttnRequest("cuda", torch.bfloat16, True, (-1, -1), 5.0, 0.0, False, False, 64, 64, False, True)),
        ("ALiBi", AttnRequest("cuda", torch.bfloat16, True, (-1, -1), 0.0, 0.0, True, False, 64, 64, False, True)),
    ):
        assert what in backends.unsupported("torch", r)
        assert backends.choose(r, "auto") == "sdpa"


@pytest.mark.parametrize(
    "kw",
    [
        dict(causal=True),
        dict(causal=True, window=(2, 0), kv_heads=2),
        dict(causal=False, window=(1, 2), v_dim=5, lse=True),
        dict(causal=True, softcap=3.0, alibi=torch.tensor([0.5, 0.25, 0.125, 0.0625]), scale=0.2),
    ],
    ids=["causal", "window_gqa", "mla_lse", "softcap_alibi"],
)
def test_flash_backend_glue(monkeypatch, kw):
    _gpu_glue_case(monkeypatch, "flash_attn", _flash_varlen, **kw)
