"""The independent dense reference for ``varlen_attn_func`` and helpers of its tests.

The reference never splits the packed sequence into documents: it builds the full
``total_q x total_k`` score matrix of the whole packed row in float64, and one mask that is
block-diagonal (same document), bottom-right causal, windowed, with soft-capping and ALiBi
applied as flash-attn defines them.
"""

from __future__ import annotations

import contextlib

import torch

from packtune.attention import buckets
from packtune.attention.buckets import plan_buckets
from packtune.attention.varlen import varlen_attn_func

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


