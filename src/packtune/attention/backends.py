"""The four kernels behind ``varlen_attn_func`` and the rule that picks one.

* ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16, flash-attn installed).
* ``torch``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, torch >= 2.10).
* ``sdpa``: documents grouped into a few padded ``scaled_dot_product_attention`` calls
  (``buckets.py``); any device, every feature but returning the log-sum-exp. Soft-capping and
  ALiBi, which SDPA cannot express, run through the same buckets in batched math.
* ``eager``: a per-document loop of plain math in fp32: the reference, supports everything.

``unsupported(name, request)`` says why a backend cannot run a request (``None`` if it can);
``choose`` turns that into a decision, and never falls back silently to an approximation.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch
import torch.nn.functional as F

from packtune.attention.buckets import allowed_mask, plan_buckets

HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen():
    """``(varlen_attn, accepted keyword names)`` or ``None`` when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def unsupported(name: str, req) -> str | None:
    """Why backend ``name`` cannot run request ``req``, or ``None`` when it can."""
    if name == "eager":
        return None
    if name == "sdpa":
        if req.return_lse:
            return "the sdpa backend cannot return the log-sum-exp (return_attn_probs); use backend='eager'"
        return None
    if req.device_type != "cuda":
        return f"the {name} backend runs only on CUDA tensors, these are on {req.device_type}"
    if req.dtype not in HALF:
        return f"the {name} backend needs fp16 or bf16 tensors, got {req.dtype}"
    if max(req.head_dim, req.v_head_dim) > 256:
        return f"the {name} backend supports head_dim <= 256, got {max(req.head_dim, req.v_head_dim)}"
    if req.v_head_dim > req.head_dim:
        return f"the {name} backend needs v_head_dim <= head_dim, got {req.v_head_dim} > {req.head_dim}"
    if name == "flash_attn":
        if _flash_attn_func() is None:
            return "flash-attn is not installed (pip install 'packtune[flash]' on a CUDA machine)"
        return None
    if name == "torch":
        found = _torch_varlen()
        if found is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs torch >= 2.10)"
        params = found[1]
        for flag, what in ((req.dropout_p > 0, "dropout"), (req.softcap > 0, "softcap"), (req.alibi, "ALiBi")):
            if flag:
                return f"torch's varlen_attn has no {what}"
        if req.return_lse and "return_aux" not in params:
            return "this torch's varlen_attn cannot return the log-sum-exp"
        if req.window != (-1, -1) and "window_size" not in params:
            return f"torch {torch.__version__}'s varlen_attn has no sliding window"
        return None
    raise ValueError(f"unknown backend {name!r}")


def choose(req, backend: str) -> str:
    """The backend to run: the named one if it can, else the first able one in preference order."""
    if backend != "auto":
        reason = unsupported(backend, req)
        if reason:
            raise NotImplementedError(reason)
        return backend
    order = ("flash_attn", "torch", "sdpa", "eager") if req.device_type == "cuda" else ("sdpa", "eager")
    reasons = []
    for name in order:
        reason = unsupported(name, req)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    raise NotImplementedError("no attention backend supports this call: " + "; ".join(reasons))


def run(name, q, k, v, cu_seqlens_q, cu_seqlens_k, cu_q, cu_k, max_q, max_k, scale, req, alibi, deterministic):
    if name == "eager":
        return _eager(q, k, v, cu_q, cu_k, scale, req, alibi)
    if name == "sdpa":
        return _sdpa(q, k, v, cu_q, cu_k, scale, req, alibi)
    if name == "torch":
        return _torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, req)
    return _flash(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, req, alibi, deterministic)


def _alibi_bias(slopes: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
    """``(heads, lq, lk)`` ALiBi bias ``-slope * |i + lk - lq - j|`` (flash-attn's definition)."""
    i = torch.arange(lq, device=slopes.device).unsqueeze(1) + (lk - lq)
    j = torch.arange(lk, device=slopes.device).unsqueeze(0)
    return -slopes.float().view(-1, 1, 1) * (i - j).abs().float()


def _doc_slopes(alibi: torch.Tensor | None, d: int) -> torch.Tensor | None:
    if alibi is None:
        return None
    return alibi[d] if alibi.dim() == 2 else alibi


def _eager(q, k, v, cu_q, cu_k, scale, req, alibi):
    """Reference: one document at a time, fp32 math, every feature."""
    heads, groups = q.shape[1], q.shape[1] // k.shape[1]
    outs, lses = [], []
    for d in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[d], cu_q[d + 1], cu_k[d], cu_k[d + 1]
        lq, lk = qe - qs, ke - ks
        if lq == 0:
            continue
        qi = q[qs:qe].transpose(0, 1).float()
        ki = k[ks:ke].transpose(0, 1).float().repeat_interleave(groups, 0)
        vi = v[ks:ke].transpose(0, 1).float().repeat_interleave(groups, 0)
        s = torch.matmul(qi, ki.transpose(-1, -2)) * scale
        if req.softcap > 0:
            s = req.softcap * torch.tanh(s / req.softcap)
        slopes = _doc_slopes(alibi, d)
        if slopes is not None:
            s = s + _alibi_bias(slopes, lq, lk)
        allowed = allowed_mask(lq, lk, req.causal, req.window)
        if allowed is None:
            allowed = torch.ones(lq, lk, dtype=torch.bool)
        allowed = allowed.to(q.device)
        s = s.masked_fill(~allowed, float("-inf"))
        seen = allowed.any(-1)
        # flash-attn reports +inf as the log-sum-exp of a row that sees no key.
        lse = torch.logsumexp(s, dim=-1).masked_fill(~seen.view(1, -1), float("inf"))
        # A row that sees no key would be NaN after softmax; flash-attn returns zeros there.
        p = torch.softmax(s.masked_fill(~seen.view(1, -1, 1), 0.0), dim=-1) * seen.view(1, -1, 1)
        if req.dropout_p > 0:
            p = F.dropout(p, req.dropout_p)
        outs.append(torch.matmul(p, vi).transpose(0, 1).to(q.dtype))
        lses.append(lse)
    if outs:
        out = torch.cat(outs)
    else:
        out = q.new_zeros(0, heads, v.shape[-1]) + 0 * v.sum()
    if req.return_lse:
        lse = torch.cat(lses, dim=1) if lses else q.new_zeros(heads, 0, dtype=torch.float32)
        return out, lse, None
    return out


class RowGather(torch.autograd.Function):
    """``y = x[src]`` with padding rows zero, whose gradient is the reverse gather ``g[dst]``.

    ``index_select``'s own backward allocates a zero tensor of ``x``'s size and scatters into
    it (and slicing does the same once per slice), which on CPU costs more than the attention
    of a bucket. The maps of a ``RowMap`` are a bijection between the rows of ``x`` it uses and
    the non-padding rows of ``y``, so the exact gradient is one gather the other way.
    """

    @staticmethod
    def forward(ctx, x, row_map):
        ctx.row_map = row_map
        return _gather_rows(x, row_map.src, row_map.src_pad)

    @staticmethod
    def backward(ctx, grad):
        return RowGather.apply(grad, ctx.row_map.reverse()), None


def _gather_rows(x: torch.Tensor, src: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0:
        return x.new_zeros((src.numel(),) + tuple(x.shape[1:]))
    y = x.index_select(0, src)
    if pad.numel():
        y.index_fill_(0, pad, 0)
    return y


def _gather(x: torch.Tensor, row_map) -> torch.Tensor:
    """``x``'s rows in the buckets' padded layout (``x`` itself when that is the identity)."""
    return x if row_map.identity else RowGather.apply(x, row_map)


def math_attention(q, k, v, mask, scale: float, softcap: float = 0.0, dropout_p: float = 0.0, bias=None):
    """Batched fp32 math attention for what SDPA cannot express (soft-capping, ALiBi).

    ``q`` ``(n, heads, lq, d)``, ``k``/``v`` ``(n, kv_heads, lk, d)`` (GQA without copying the
    keys), ``mask`` a boolean broadcastable to ``(n, heads, lq, lk)`` with no all-False row.
    """
    n, heads, lq, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.float().view(n, kv_heads, heads // kv_heads, lq, dim)
    s = torch.matmul(qg, k.float().unsqueeze(2).transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.view(n, heads, lq, -1)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    out = torch.matmul(p.view(n, kv_heads, heads // kv_heads, lq, -1), v.float().unsqueeze(2))
    return out.view(n, heads, lq, -1).to(q.dtype)


def _sdpa(q, k, v, cu_q, cu_k, scale, req, alibi):
    needs_math = req.softcap > 0 or alibi is not None
    width = q.shape[1] * (q.shape[2] + v.shape[2])
    plan = plan_buckets(cu_q, cu_k, req.causal, req.window, width, needs_math)
    if not plan.buckets:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2]) + 0 * (q.sum() + k.sum() + v.sum())
    q_map, k_map, row_scale, masks = plan.maps_on(q.device)
    gqa = q.shape[1] != k.shape[1]
    # One gather per input for all buckets, then split: the backward of a split is one cat.
    qs = _gather(q, q_map).split([b.n * b.lq for b in plan.buckets])
    ks = _gather(k, k_map).split([b.n * b.lk for b in plan.buckets])
    vs = _gather(v, k_map).split([b.n * b.lk for b in plan.buckets])
    pieces = []
    for b, mask, qp, kp, vp in zip(plan.buckets, masks, qs, ks, vs):
        qb, kb, vb = (x.view(b.n, -1, *x.shape[1:]).transpose(1, 2) for x in (qp, kp, vp))
        if needs_math:
            bias = _alibi_for_bucket(alibi, b, cu_q, cu_k) if alibi is not None else None
            ob = math_attention(qb, kb, vb, mask, scale, req.softcap, req.dropout_p, bias)
        else:
            ob = F.scaled_dot_product_attention(
                qb,
                kb,
                vb,
                attn_mask=mask,
                dropout_p=req.dropout_p,
                is_causal=b.is_causal,
                scale=scale,
                enable_gqa=gqa,
            )
        # SDPA's output keeps the (n, lq, heads, dim) memory layout of its input: a free view.
        pieces.append(ob.transpose(1, 2).reshape(b.n * b.lq, q.shape[1], v.shape[2]))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    out = _gather(out, q_map.reverse())
    if row_scale is not None:
        out = out * row_scale.to(out.dtype).view(-1, 1, 1)
    return out


def _alibi_for_bucket(alibi, bucket, cu_q, cu_k):
    """ALiBi bias ``(n, heads, lq, lk)`` for a bucket; each document uses its own lengths."""
    biases = []
    for d in bucket.docs:
        lq, lk = cu_q[d + 1] - cu_q[d], cu_k[d + 1] - cu_k[d]
        bias = _alibi_bias(_doc_slopes(alibi, d), lq, lk)
        biases.append(F.pad(bias, (0, bucket.lk - lk, 0, bucket.lq - lq)))
    return torch.stack(biases)


def _pad_v(q, v):
    """flash kernels want one head_dim for q and v: pad v (MLA), crop the output after."""
    if v.shape[-1] == q.shape[-1]:
        return v
    return F.pad(v, (0, q.shape[-1] - v.shape[-1]))


def _torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, req):
    varlen_attn, params = _torch_varlen()
    dv = v.shape[-1]
    v_in = _pad_v(q, v)
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:
        # torch 2.10's varlen_attn has no ``scale`` (it always uses head_dim ** -0.5): fold ours into q.
        q = q * (scale * q.shape[-1] ** 0.5)
    left, right = req.window
    if req.causal:
        right = 0
    if "window_size" in params:
        kwargs["window_size"] = (left, right)
    else:
        kwargs["is_causal"] = req.causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v_in = k.repeat_interleave(rep, 1), v_in.repeat_interleave(rep, 1)
    if req.return_lse:
        from torch.nn.attention.varlen import AuxRequest

        out, lse = varlen_attn(
            q, k, v_in, cu_seqlens_q.int(), cu_seqlens_k.int(), max_q, max_k, return_aux=AuxRequest(lse=True), **kwargs
        )
        return out[..., :dv], lse, None
    out = varlen_attn(q, k, v_in, cu_seqlens_q.int(), cu_seqlens_k.int(), max_q, max_k, **kwargs)
    return out[..., :dv]


def _flash(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, req, alibi, deterministic):
    fn = _flash_attn_func()
    dv = v.shape[-1]
    result = fn(
        q,
        k,
        _pad_v(q, v),
        cu_seqlens_q.int(),
        cu_seqlens_k.int(),
        max_q,
        max_k,
        dropout_p=req.dropout_p,
        softmax_scale=scale,
        causal=req.causal,
        window_size=req.window,
        softcap=req.softcap,
        alibi_slopes=alibi,
        deterministic=deterministic,
        return_attn_probs=req.return_lse,
    )
    if req.return_lse:
        out, lse = result[0], result[1]
        return out[..., :dv], lse, None
    return result[..., :dv]


__all__ = ["choose", "run", "unsupported"]
