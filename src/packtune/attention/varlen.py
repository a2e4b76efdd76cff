"""``varlen_attn_func``: variable-length attention with flash-attn's interface on any device.

A *varlen* batch is a set of documents laid end to end: ``q`` holds every query token of
every document, ``(total_q, heads, head_dim)``, and ``cu_seqlens_q`` says where each
document starts. Document ``i`` owns query rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` and key
rows ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``; no token ever attends outside its document.

Example, two documents of 3 and 2 tokens attending causally::

    >>> import torch
    >>> device = "cuda" if torch.cuda.is_available() else "cpu"
    >>> dtype = torch.bfloat16 if device == "cuda" else torch.float32
    >>> q = k = v = torch.randn(5, 4, 16, device=device, dtype=dtype)  # 5 tokens, 4 heads, head_dim 16
    >>> cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    >>> out = varlen_attn_func(q, k, v, cu, cu, 3, 3, causal=True)
    >>> out.shape
    torch.Size([5, 4, 16])

``cu_seqlens`` is best built on ``q``'s device as int32, as above; one given on another device
or as int64 is validated and moved there (int32) before any kernel sees it. Each direct call
reads ``cu_seqlens`` on the host once to validate it. Inside a model, ``enable_varlen``'s hook
validates the boundaries once per forward and hands every layer a ``CuSeqlens`` (the device
tensor with its host copy and longest document), which this function trusts after checking its
total against the tokens: no host read per layer.

Semantics follow ``flash_attn.flash_attn_varlen_func`` exactly:

* ``causal``: aligned to the bottom-right corner of each document's score matrix, so query
  ``i`` of a document with ``Lq`` queries and ``Lk`` keys sees keys ``j <= i + Lk - Lq``.
* ``window_size=(left, right)``: query ``i`` sees keys with
  ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``; ``-1`` means unbounded on that side.
* ``softcap > 0``: scores become ``softcap * tanh(scores / softcap)`` (after scaling).
* ``alibi_slopes`` ``(heads,)`` or ``(batch, heads)``: ``-slope * |i + Lk - Lq - j|`` is added.
* A query row that may see no key at all gets an output of zeros.
* GQA/MQA: ``heads`` must be a multiple of ``kv_heads``. ``v`` may have its own head_dim.
* ``sinks`` ``(heads,)`` or ``(total_q, heads)``: an attention sink (gpt-oss), one more logit
  in each query's softmax denominator with no value behind it: the output is
  ``sum_j exp(s_j) v_j / (exp(sink) + sum_j exp(s_j))``, and ``sinks`` gets its gradient.
  flash-attn and torch's ``varlen_attn`` take no sinks; ``sdpa`` and ``eager`` run them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from packtune.attention import backends as _backends
from packtune.attention.backends import AttnCall, AttnRequest
from packtune.config.settings import ATTN_BACKENDS as BACKENDS


def _as_window(window_size: tuple[int, int] | list[int] | None) -> tuple[int, int]:
    if window_size is None:
        return (-1, -1)
    left, right = (int(x) for x in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {tuple(window_size)}")
    return (left, right)


def _check_cu(name: str, cu: torch.Tensor, total: int | None) -> list[int]:
    """Validate one cumulative-length tensor and return it as a host list (one host read).

    ``total``: the number of tokens it must end at (``None``: any).
    """
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {type(cu).__name__} {getattr(cu, 'shape', '')}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must have dtype int32 (or int64), got {cu.dtype}")
    if cu.numel() < 2:
        raise ValueError(f"{name} needs at least 2 entries (0 and the total), got {cu.numel()}")
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i}]={values[i]} < {name}[{i - 1}]={values[i - 1]}")
    if total is not None and values[-1] != total:
        raise ValueError(f"{name} must end at the number of tokens ({total}), but it ends at {values[-1]}")
    if values[-1] > torch.iinfo(torch.int32).max:
        raise ValueError(f"{name} ends at {values[-1]} tokens, more than the kernels' int32 offsets can address")
    return values


@dataclass(frozen=True, eq=False)
class CuSeqlens:
    """Document boundaries validated once: the int32 tensor on the compute device, its host
    copy, and the longest document.

    ``varlen_attn_func`` takes one in place of a ``cu_seqlens`` tensor and trusts it after
    checking its total against the number of tokens (host integers): a model's layers reuse
    the one that ``enable_varlen``'s boundary hook built for the forward, and never read the
    device tensor back on the host (no device sync per layer on CUDA).
    """

    tensor: torch.Tensor
    host: tuple[int, ...]
    longest: int

    @classmethod
    def validate(cls, name: str, cu: torch.Tensor, total: int | None = None, device=None) -> CuSeqlens:
        """Check ``cu`` (one host read) and move it to ``device`` (default: where it is) as int32.

        >>> CuSeqlens.validate("cu", torch.tensor([0, 3, 5])).host, CuSeqlens.validate("cu", torch.tensor([0, 3, 5])).longest
        ((0, 3, 5), 3)
        """
        host = _check_cu(name, cu, total)
        tensor = cu.to(device=cu.device if device is None else device, dtype=torch.int32)
        return cls(tensor, tuple(host), max(b - a for a, b in zip(host, host[1:])))

    def to(self, device, non_blocking: bool = False) -> CuSeqlens:
        """The same boundaries with the tensor on ``device`` (a host-to-device copy, no sync)."""
        if self.tensor.device == torch.device(device):
            return self
        return CuSeqlens(self.tensor.to(device, non_blocking=non_blocking), self.host, self.longest)

    @property
    def total(self) -> int:
        """The number of tokens the documents cover."""
        return self.host[-1]

    @property
    def documents(self) -> int:
        return len(self.host) - 1


def _boundaries(name: str, cu, total: int, device: torch.device) -> CuSeqlens:
    """``cu`` (a tensor, or an already validated ``CuSeqlens``) validated for ``total`` tokens on ``device``."""
    if not isinstance(cu, CuSeqlens):
        return CuSeqlens.validate(name, cu, total, device)
    if cu.total != total:
        raise ValueError(f"{name} must end at the number of tokens ({total}), but it ends at {cu.total}")
    # A host-to-device copy at most (no sync); the boundary hook builds it on the right device anyway.
    return cu.to(device)


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, sinks=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor (total_tokens, heads, head_dim), got shape {tuple(getattr(t, 'shape', ()))}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must agree on (total_k, kv_heads): k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}) for GQA/MQA")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    cu_q = _boundaries("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    cu_k = _boundaries("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_q.documents != cu_k.documents:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of documents: {cu_q.documents} vs {cu_k.documents}")
    if int(max_seqlen_q) < cu_q.longest:
        raise ValueError(f"max_seqlen_q={int(max_seqlen_q)} is smaller than the longest query document ({cu_q.longest})")
    if int(max_seqlen_k) < cu_k.longest:
        raise ValueError(f"max_seqlen_k={int(max_seqlen_k)} is smaller than the longest key document ({cu_k.longest})")
    if alibi_slopes is not None:
        heads = q.shape[1]
        if tuple(alibi_slopes.shape) not in ((heads,), (cu_q.documents, heads)):
            raise ValueError(f"alibi_slopes must have shape ({heads},) or ({cu_q.documents}, {heads}), got {tuple(alibi_slopes.shape)}")
    if sinks is not None:
        heads = q.shape[1]
        if not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) not in ((heads,), (q.shape[0], heads)):
            raise ValueError(f"sinks must have shape ({heads},) or ({q.shape[0]}, {heads}), got {tuple(getattr(sinks, 'shape', ()))}")
        if not sinks.is_floating_point():
            raise ValueError(f"sinks must be a floating-point tensor, got {sinks.dtype}")
    return cu_q, cu_k


def varlen_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | CuSeqlens,
    cu_seqlens_k: torch.Tensor | CuSeqlens,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, None]:
    """Attention over documents packed end to end, with ``flash_attn_varlen_func``'s signature.

    Args:
        q: ``(total_q, heads, head_dim)`` queries of every document, one after another.
        k: ``(total_k, kv_heads, head_dim)`` keys; ``heads % kv_heads == 0`` (GQA, MQA).
        v: ``(total_k, kv_heads, v_head_dim)`` values; ``v_head_dim`` may differ (MLA).
        cu_seqlens_q / cu_seqlens_k: int32 ``(docs + 1,)`` start offsets, from 0 to the total
            (moved to ``q``'s device as int32 when given elsewhere or as int64), or a
            ``CuSeqlens`` validated earlier (trusted; only its total is checked).
        max_seqlen_q / max_seqlen_k: at least the longest document (as in flash-attn).
        dropout_p: dropout on attention probabilities (set 0.0 for evaluation).
        softmax_scale: defaults to ``head_dim ** -0.5``.
        causal: bottom-right aligned causal mask per document.
        window_size: ``(left, right)`` sliding window, ``-1`` = unbounded.
        softcap: logit soft-capping, ``0`` = off.
        alibi_slopes: optional ALiBi slopes, ``(heads,)`` or ``(docs, heads)`` (used as fp32 on
            ``q``'s device).
        deterministic: a deterministic backward. flash-attn has a kernel flag for it; the
            ``sdpa`` backend then uses SDPA's math kernel on CUDA; the ``torch`` backend refuses
            it when gradients are needed. The CPU paths are always deterministic.
        return_attn_probs: also return the log-sum-exp ``(heads, total_q)`` (flash-attn's second
            output; with ``sinks``, of the whole denominator, sink included); the third output
            (the dropout pattern) is always ``None``.
        sinks: optional attention-sink logits, ``(heads,)`` (one per head, gpt-oss) or
            ``(total_q, heads)`` (one per query and head): an extra logit in each query's
            softmax denominator, with its gradient. Only the ``sdpa`` and ``eager`` backends
            take them (exactly, in fp32).
        backend: ``"auto"`` (best available for the request), ``"flash_attn"``, ``"torch"``,
            ``"sdpa"`` or ``"eager"``. A backend that cannot run the request raises
            ``NotImplementedError`` saying why; nothing is ever approximated.

    Returns:
        ``(total_q, heads, v_head_dim)`` in the dtype of ``q``, or ``(out, lse, None)`` when
        ``return_attn_probs`` is set.

    Raises:
        ValueError: malformed inputs (shapes, dtypes, cu_seqlens not starting at 0,
            decreasing, or not ending at the token total, max_seqlen too small).
        NotImplementedError: no (or not the named) backend supports the request.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 = off), got {softcap}")
    window = _as_window(window_size)
    cu_q, cu_k = _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, sinks)
    if sinks is not None:
        sinks = sinks.to(q.device)
    if alibi_slopes is not None:
        # flash-attn requires fp32 slopes on q's device; the math paths add them in fp32 there too.
        alibi_slopes = alibi_slopes.to(device=q.device, dtype=torch.float32)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    request = AttnRequest(
        device_type=q.device.type,
        dtype=q.dtype,
        causal=bool(causal),
        window=window,
        softcap=float(softcap),
        dropout_p=float(dropout_p),
        alibi=alibi_slopes is not None,
        return_lse=bool(return_attn_probs),
        head_dim=q.shape[-1],
        v_head_dim=v.shape[-1],
        gqa=q.shape[1] != k.shape[1],
        needs_grad=torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks)),
        deterministic=bool(deterministic),
        sinks=sinks is not None,
        device_index=q.device.index,
    )
    name = _backends.choose(request, backend)
    call = AttnCall(
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=cu_q.tensor,
        cu_seqlens_k=cu_k.tensor,
        cu_q=cu_q.host,
        cu_k=cu_k.host,
        max_q=max(int(max_seqlen_q), 1),
        max_k=max(int(max_seqlen_k), 1),
        scale=scale,
        request=request,
        alibi=alibi_slopes,
        sinks=sinks,
    )
    return _backends.run(name, call)
