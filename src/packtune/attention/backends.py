"""The four kernels behind ``varlen_attn_func`` and the rule that picks one.

* ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16, flash-attn installed).
* ``torch``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, torch >= 2.10).
* ``sdpa``: documents grouped into a few padded ``scaled_dot_product_attention`` calls
  (``buckets.py``); any device, every feature but returning the log-sum-exp. Soft-capping,
  ALiBi and attention sinks, which SDPA cannot express, run through the same buckets in
  batched math.
* ``eager``: a per-document loop of plain math in fp32: the reference, supports everything.

``unsupported(name, request)`` says why a backend cannot run a request (``None`` if it can);
``choose`` turns that into a decision, and never falls back silently to an approximation.

Precision and memory: the math paths (``_eager``, and ``math_attention`` for soft-capping and
ALiBi) compute scores in fp32 with autocast switched off inside, whatever autocast the model
runs under, and ``math_attention`` never materialises more than ``MATH_BLOCK_ELEMENTS`` scores
at once (documents, then query rows, in blocks; each block recomputed in the backward).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from packtune.attention.buckets import allowed_mask, plan_buckets

HALF = (torch.float16, torch.bfloat16)
#: Both flash kernels (flash-attn 2 and torch's varlen_attn) need Ampere (sm80) or newer.
FLASH_MIN_CAPABILITY = (8, 0)
#: The largest score block (elements) the math path materialises in one piece.
MATH_BLOCK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class AttnRequest:
    """Everything a backend needs to decide whether it can run a call (see ``backends.unsupported``)."""

    device_type: str
    dtype: torch.dtype
    causal: bool
    window: tuple[int, int]
    softcap: float
    dropout_p: float
    alibi: bool
    return_lse: bool
    head_dim: int
    v_head_dim: int
    gqa: bool
    needs_grad: bool
    deterministic: bool = False
    sinks: bool = False
    device_index: int | None = None  # the CUDA device (its compute capability); None: the current one


@dataclass(frozen=True)
class AttnCall:
    """One validated call of ``varlen_attn_func``, as a backend runs it (``run``).

    ``cu_seqlens_q``/``cu_seqlens_k``: the boundaries on the tensors' device (the flash
    kernels read them there); ``cu_q``/``cu_k``: the same boundaries on the host (the math
    paths cut documents with them); ``max_q``/``max_k``: the longest document (at least 1);
    ``alibi``: fp32 slopes on ``q``'s device; ``sinks``: per-head (or per-token) sink logits.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    max_q: int
    max_k: int
    scale: float
    request: AttnRequest
    alibi: torch.Tensor | None = None
    sinks: torch.Tensor | None = None


@functools.lru_cache(maxsize=None)
def cuda_capability(index: int | None = None) -> tuple[int, int] | None:
    """``(major, minor)`` compute capability of CUDA device ``index`` (``None``: the current
    one); ``None`` where torch sees no CUDA device (a request for one is then only described)."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(index))


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


def unsupported(name: str, req: AttnRequest) -> str | None:
    """Why backend ``name`` cannot run request ``req``, or ``None`` when it can."""
    if name == "eager":
        return None
    if name == "sdpa":
        if req.return_lse:
            return "the sdpa backend cannot return the log-sum-exp (return_attn_probs); use backend='eager'"
        return None
    if req.sinks:
        kernel = "flash-attn's flash_attn_varlen_func" if name == "flash_attn" else "torch's varlen_attn"
        return f"{kernel} has no attention sinks; backend='sdpa' (or 'eager') runs them exactly"
    if req.device_type != "cuda":
        return f"the {name} backend runs only on CUDA tensors, these are on {req.device_type}"
    if req.dtype not in HALF:
        return f"the {name} backend needs fp16 or bf16 tensors, got {req.dtype}"
    capability = cuda_capability(req.device_index)
    if capability is not None and capability < FLASH_MIN_CAPABILITY:
        major, minor = capability
        return (f"the {name} backend needs a GPU of compute capability 8.0 (Ampere) or newer, "
                f"this one is {major}.{minor}")
    if max(req.head_dim, req.v_head_dim) > 256:
        return f"the {name} backend supports head_dim <= 256, got {max(req.head_dim, req.v_head_dim)}"
    if req.v_head_dim > req.head_dim:
        return f"the {name} backend needs v_head_dim <= head_dim, got {req.v_head_dim} > {req.head_dim}"
    if name == "flash_attn":
        if _flash_attn_func() is None:
            return "flash-attn is not installed (pip install 'packtune[flash]' on a CUDA machine)"
        if req.softcap > 0 and req.dropout_p > 0:
            return "flash-attn cannot combine softcap with dropout"
        return None
    if name == "torch":
        found = _torch_varlen()
        if found is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs torch >= 2.10)"
        params = found[1]
        for flag, what in ((req.dropout_p > 0, "dropout"), (req.softcap > 0, "softcap"), (req.alibi, "ALiBi")):
            if flag:
                return f"torch's varlen_attn has no {what}"
        if req.deterministic and req.needs_grad:
            return "torch's varlen_attn has no deterministic backward (deterministic=True)"
        if req.return_lse and "return_aux" not in params:
            return "this torch's varlen_attn cannot return the log-sum-exp"
        if req.window != (-1, -1) and "window_size" not in params:
            return f"torch {torch.__version__}'s varlen_attn has no sliding window"
        return None
    raise ValueError(f"unknown backend {name!r}")


def choose(req: AttnRequest, backend: str) -> str:
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


def run(name: str, call: AttnCall):
    """``call`` through backend ``name`` (one ``choose`` picked): the output, or ``(out, lse,
    None)`` when the request returns the log-sum-exp."""
    if name == "eager":
        return _eager(call.q, call.k, call.v, call.cu_q, call.cu_k, call.scale, call.request, call.alibi, call.sinks)
    if name == "sdpa":
        return _sdpa(call.q, call.k, call.v, call.cu_q, call.cu_k, call.scale, call.request, call.alibi, call.sinks)
    if name == "torch":
        return _torch(call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k, call.max_q, call.max_k, call.scale,
                      call.request)
    return _flash(call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k, call.max_q, call.max_k, call.scale,
                  call.request, call.alibi)


def _no_autocast(device: torch.device):
    """Autocast switched off on ``device``: the math paths keep their scores in fp32 even when
    the model runs under bf16/fp16 autocast (which would otherwise run every matmul in half)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _alibi_bias(slopes: torch.Tensor, lq: int, lk: int, row0: int = 0, row1: int | None = None) -> torch.Tensor:
    """``(heads, rows, lk)`` ALiBi bias ``-slope * |i + lk - lq - j|`` (flash-attn's definition)
    for query rows ``row0:row1`` (clipped to ``lq``) of a document."""
    row1 = lq if row1 is None else min(row1, lq)
    i = torch.arange(row0, max(row0, row1), device=slopes.device).unsqueeze(1) + (lk - lq)
    j = torch.arange(lk, device=slopes.device).unsqueeze(0)
    return -slopes.float().view(-1, 1, 1) * (i - j).abs().float()


def _doc_slopes(alibi: torch.Tensor | None, d: int) -> torch.Tensor | None:
    if alibi is None:
        return None
    return alibi[d] if alibi.dim() == 2 else alibi


def _softmax_with_sink(s: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Softmax of scores ``s`` (..., lk) whose denominator also holds ``exp(sink)`` (..., 1),
    a logit with no value behind it (``None``: a plain softmax). fp32 in, fp32 out."""
    if sink is None:
        return torch.softmax(s, dim=-1)
    return torch.softmax(torch.cat([s, sink.float().expand(*s.shape[:-1], 1)], dim=-1), dim=-1)[..., :-1]


def _doc_sink(sinks: torch.Tensor | None, qs: int, qe: int) -> torch.Tensor | None:
    """The ``(heads, rows, 1)`` sink logits of query rows ``qs:qe`` (``sinks`` is ``(heads,)``
    or ``(total_q, heads)``)."""
    if sinks is None:
        return None
    return sinks.view(-1, 1, 1) if sinks.dim() == 1 else sinks[qs:qe].t().unsqueeze(-1)


def _eager(q, k, v, cu_q, cu_k, scale, req, alibi, sinks=None):
    """Reference: one document at a time, fp32 math (autocast off), every feature."""
    heads, groups = q.shape[1], q.shape[1] // k.shape[1]
    outs, lses = [], []
    with _no_autocast(q.device):
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
            sink = _doc_sink(sinks, qs, qe)
            if sink is None:
                # flash-attn reports +inf as the log-sum-exp of a row that sees no key.
                lse = torch.logsumexp(s, dim=-1).masked_fill(~seen.view(1, -1), float("inf"))
            else:
                lse = torch.logsumexp(torch.cat([s, sink.float().expand(-1, lq, 1)], dim=-1), dim=-1)
            # A row that sees no key would be NaN after softmax; flash-attn returns zeros there.
            p = _softmax_with_sink(s.masked_fill(~seen.view(1, -1, 1), 0.0), sink) * seen.view(1, -1, 1)
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


def _block(t: torch.Tensor | None, docs: slice, rows: slice) -> torch.Tensor | None:
    """Documents ``docs`` and query rows ``rows`` of a mask or bias ``(n or 1, h or 1, lq or 1, lk)``."""
    if t is None:
        return None
    return t[docs if t.shape[0] > 1 else slice(None), :, rows if t.shape[2] > 1 else slice(None)]


def _math_block(q, k, v, mask, scale, softcap, dropout_p, bias, docs, rows, sink=None):
    """Math attention of documents ``docs`` and query rows ``rows``, fp32 with autocast off.

    ``bias`` is a tensor over all documents and rows, or a function ``(docs, rows) -> tensor``
    called here, so that a checkpointed block rebuilds its bias instead of keeping it.
    """
    qb, kb, vb = q[docs, :, rows], k[docs], v[docs]
    n, heads, lq, dim = qb.shape
    kv_heads = kb.shape[1]
    bias = bias(docs, rows) if callable(bias) else _block(bias, docs, rows)
    with _no_autocast(q.device):
        qg = qb.float().reshape(n, kv_heads, heads // kv_heads, lq, dim)
        s = torch.matmul(qg, kb.float().unsqueeze(2).transpose(-1, -2)) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        s = s.view(n, heads, lq, -1)
        if bias is not None:
            s = s + bias
        mask = _block(mask, docs, rows)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = _softmax_with_sink(s, _block(sink, docs, rows))
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        out = torch.matmul(p.view(n, kv_heads, heads // kv_heads, lq, -1), vb.float().unsqueeze(2))
    return out.view(n, heads, lq, -1).to(q.dtype)


def math_attention(q, k, v, mask, scale: float, softcap: float = 0.0, dropout_p: float = 0.0, bias=None,
                   sink: torch.Tensor | None = None):
    """Batched fp32 math attention for what SDPA cannot express (soft-capping, ALiBi, sinks).

    ``q`` ``(n, heads, lq, d)``, ``k``/``v`` ``(n, kv_heads, lk, d)`` (GQA without copying the
    keys), ``mask`` a boolean broadcastable to ``(n, heads, lq, lk)`` with no all-False row,
    ``bias`` a tensor of that shape or a function ``(docs, rows) -> bias`` of a block,
    ``sink`` attention-sink logits broadcastable to ``(n, heads, lq, 1)``.

    Scores are fp32 with autocast off. At most ``MATH_BLOCK_ELEMENTS`` of them exist at once:
    larger inputs run in blocks of documents, and a document larger than a block in blocks of
    its query rows; with gradients each block is recomputed in the backward
    (``torch.utils.checkpoint``), so a long pack keeps only its inputs, never its scores.
    """
    n, heads, lq, _ = q.shape
    per_row = heads * k.shape[2]
    if n * lq * per_row <= MATH_BLOCK_ELEMENTS:
        return _math_block(q, k, v, mask, scale, softcap, dropout_p, bias, slice(None), slice(None), sink)
    docs_per_block = max(1, MATH_BLOCK_ELEMENTS // (lq * per_row))
    rows_per_block = lq if docs_per_block > 1 or lq * per_row <= MATH_BLOCK_ELEMENTS else max(1, MATH_BLOCK_ELEMENTS // per_row)
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for d0 in range(0, n, docs_per_block):
        docs = slice(d0, min(n, d0 + docs_per_block))
        parts = []
        for r0 in range(0, lq, rows_per_block):
            args = (q, k, v, mask, scale, softcap, dropout_p, bias, docs, slice(r0, min(lq, r0 + rows_per_block)), sink)
            if recompute:
                # Dropout draws the same pattern again in the recomputation (the RNG state is kept).
                parts.append(torch.utils.checkpoint.checkpoint(_math_block, *args, use_reentrant=False))
            else:
                parts.append(_math_block(*args))
        outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def sdpa_attention(q, k, v, mask, scale: float, dropout_p: float = 0.0, is_causal: bool = False,
                   deterministic: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention`` over ``(n, heads, l, d)`` with GQA handled.

    On CUDA a mask rules out SDPA's flash kernel and ``enable_gqa`` its memory-efficient one,
    which leaves the math kernel (the full scores in memory): with a mask, K/V are repeated to
    every query head instead. ``deterministic`` on CUDA uses the math kernel, whose backward is
    plain matmuls (the fused kernels accumulate gradients with atomics).
    """
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None and q.is_cuda:
        groups = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), False
    context = contextlib.nullcontext()
    if deterministic and q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel(SDPBackend.MATH)
    with context:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )


def _sdpa(q, k, v, cu_q, cu_k, scale, req, alibi, sinks=None):
    needs_math = req.softcap > 0 or alibi is not None or sinks is not None
    width = q.shape[1] * (q.shape[2] + v.shape[2])
    plan = plan_buckets(cu_q, cu_k, req.causal, req.window, width, needs_math)
    if not plan.buckets:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2]) + 0 * (q.sum() + k.sum() + v.sum())
    q_map, k_map, row_scale, masks = plan.maps_on(q.device)
    # One gather per input for all buckets, then split: the backward of a split is one cat.
    qs = _gather(q, q_map).split([b.n * b.lq for b in plan.buckets])
    ks = _gather(k, k_map).split([b.n * b.lk for b in plan.buckets])
    vs = _gather(v, k_map).split([b.n * b.lk for b in plan.buckets])
    per_token_sinks = sinks is not None and sinks.dim() == 2
    if per_token_sinks:
        # One sink per query row: it travels with its query through the same gather.
        sink_parts = _gather(sinks, q_map).split([b.n * b.lq for b in plan.buckets])
    pieces = []
    for i, (b, mask, qp, kp, vp) in enumerate(zip(plan.buckets, masks, qs, ks, vs)):
        qb, kb, vb = (x.view(b.n, -1, *x.shape[1:]).transpose(1, 2) for x in (qp, kp, vp))
        if needs_math:
            bias = _alibi_for_bucket(alibi, b, cu_q, cu_k) if alibi is not None else None
            sink = None
            if per_token_sinks:
                sink = sink_parts[i].view(b.n, b.lq, -1).transpose(1, 2).unsqueeze(-1)
            elif sinks is not None:
                sink = sinks.view(1, -1, 1, 1)
            ob = math_attention(qb, kb, vb, mask, scale, req.softcap, req.dropout_p, bias, sink)
        else:
            ob = sdpa_attention(qb, kb, vb, mask, scale, req.dropout_p, b.is_causal, req.deterministic and req.needs_grad)
        # SDPA's output keeps the (n, lq, heads, dim) memory layout of its input: a free view.
        pieces.append(ob.transpose(1, 2).reshape(b.n * b.lq, q.shape[1], v.shape[2]))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    out = _gather(out, q_map.reverse())
    if row_scale is not None:
        out = out * row_scale.to(out.dtype).view(-1, 1, 1)
    return out


def _alibi_for_bucket(alibi, bucket, cu_q, cu_k):
    """A function ``(docs, rows) -> bias (n, heads, rows, lk)`` of a bucket's ALiBi bias; each
    document uses its own lengths. Built block by block, so it never exceeds a score block."""

    def bias(docs: slice, rows: slice) -> torch.Tensor:
        r0, r1, _ = rows.indices(bucket.lq)
        blocks = []
        for d in bucket.docs[docs]:
            lq, lk = cu_q[d + 1] - cu_q[d], cu_k[d + 1] - cu_k[d]
            part = _alibi_bias(_doc_slopes(alibi, d), lq, lk, r0, r1)
            blocks.append(F.pad(part, (0, bucket.lk - lk, 0, (r1 - r0) - part.shape[1])))
        return torch.stack(blocks)

    return bias


def _pad_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with its last dimension zero-padded to ``dim``."""
    return x if x.shape[-1] == dim else F.pad(x, (0, dim - x.shape[-1]))


def _pad_v(q, v):
    """flash kernels want one head_dim for q and v: pad v (MLA), crop the output after."""
    return _pad_last(v, q.shape[-1])


def _torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, req):
    varlen_attn, params = _torch_varlen()
    dv = v.shape[-1]
    # The kernel checks head_dim % 8 == 0 and does not pad (flash-attn pads itself): zero
    # columns leave q.k unchanged, and the output's extra columns are cropped.
    dim = -(-q.shape[-1] // 8) * 8
    q, k, v_in = _pad_last(q, dim), _pad_last(k, dim), _pad_last(v, dim)
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale != dim**-0.5:
        # torch 2.10's varlen_attn has no ``scale`` (it always uses head_dim ** -0.5): fold ours into q.
        q = q * (scale * dim**0.5)
    left, right = req.window
    if req.causal:
        right = 0
    if "window_size" in params:
        kwargs["window_size"] = (left, right)
    else:
        kwargs["is_causal"] = req.causal
    if q.shape[1] != k.shape[1] and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    # Without an ``enable_gqa`` flag, the flash kernel takes heads % kv_heads == 0 as it is.
    if req.return_lse:
        from torch.nn.attention.varlen import AuxRequest

        out, lse = varlen_attn(
            q, k, v_in, cu_seqlens_q.int(), cu_seqlens_k.int(), max_q, max_k, return_aux=AuxRequest(lse=True), **kwargs
        )
        return out[..., :dv], lse, None
    out = varlen_attn(q, k, v_in, cu_seqlens_q.int(), cu_seqlens_k.int(), max_q, max_k, **kwargs)
    return out[..., :dv]


def _flash(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, req, alibi):
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
        alibi_slopes=alibi,  # fp32 on q's device (varlen_attn_func moves them there)
        deterministic=req.deterministic,
        return_attn_probs=req.return_lse,
    )
    if req.return_lse:
        out, lse = result[0], result[1]
        return out[..., :dv], lse, None
    return result[..., :dv]


__all__ = ["AttnCall", "AttnRequest", "choose", "cuda_capability", "math_attention", "run", "sdpa_attention", "unsupported"]
