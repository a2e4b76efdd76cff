"""``varlen_attn_func``'s input checks, and the CUDA backends' glue exercised on CPU.

Bad inputs must raise with a message that says what is wrong; a backend that cannot run a
request must say why. The ``torch`` and ``flash_attn`` backends run only on CUDA, so their
argument handling is tested here against fake kernels with the real signatures (torch 2.13,
torch 2.10 and flash-attn), which compute the reference.
"""

from __future__ import annotations

import pytest
import torch

from packtune.attention import backends
from packtune.attention.backends import AttnCall
from packtune.attention.varlen import AttnRequest, varlen_attn_func
from varlen_reference import (
    dense_reference,
    _cu,
    _inputs,
)


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
    assert q.shape[1] % k.shape[1] == 0, "the flash kernels take heads % kv_heads == 0 (GQA, MQA) as it is"
    out, lse = dense_reference(
        q, k, v, cu_q.tolist(), cu_k.tolist(), causal=causal, window=tuple(window), scale=scale, softcap=softcap,
        alibi=alibi,
    )
    return out.to(q.dtype), lse.float()


def _torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert cu_seq_q.dtype == torch.int32 and cu_seq_k.dtype == torch.int32
    assert query.shape[-1] % 8 == 0, "torch's varlen kernel checks head_size % 8 == 0"
    if not enable_gqa:
        assert query.shape[1] == key.shape[1], "varlen_attn needs enable_gqa=True for GQA"
    # torch: window (-1, 0) is causal, (W, 0) causal with a window; bottom-right aligned like flash.
    out, lse = _fake_kernel(query, key, value, cu_seq_q, cu_seq_k, False, window_size, scale)
    return (out, lse) if return_aux is not None and return_aux.lse else out


def _torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), k_cache=None, v_cache=None, cache_seqlens=None, cache_batch_idx=None,
                page_table=None, seqused_k=None):
    # No enable_gqa flag: the flash kernel underneath takes fewer kv heads as they are.
    assert query.shape[-1] % 8 == 0, "torch's varlen kernel checks head_size % 8 == 0"
    out, lse = _fake_kernel(query, key, value, cu_seq_q, cu_seq_k, False, window_size, scale)
    return (out, lse) if return_aux is not None and return_aux.lse else out


def _torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert query.shape[-1] % 8 == 0, "torch's varlen kernel checks head_size % 8 == 0"
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


def _gpu_glue_case(monkeypatch, name, fake, *, causal, window=(-1, -1), kv_heads=4, dim=8, v_dim=8, scale=None,
                   softcap=0.0, alibi=None, lse=False):
    import inspect

    if name == "torch":
        monkeypatch.setattr(backends, "_torch_varlen", lambda: (fake, frozenset(inspect.signature(fake).parameters)))
    else:
        monkeypatch.setattr(backends, "_flash_attn_func", lambda: fake)
    lq, lk = [3, 7, 5], [3, 7, 5]
    q, k, v, _ = _inputs(lq, lk, 4, kv_heads, dim, v_dim, seed=5)
    cu_q, cu_k = _cu(lq, torch.int64), _cu(lk, torch.int64)
    scale_used = dim**-0.5 if scale is None else scale
    req = AttnRequest("cuda", torch.float32, causal, window, softcap, 0.0, alibi is not None, lse, dim, v_dim,
                      kv_heads != 4, False)
    result = backends.run(name, AttnCall(q, k, v, cu_q, cu_k, tuple(cu_q.tolist()), tuple(cu_k.tolist()), 7, 7,
                                         scale_used, req, alibi))
    ref, ref_lse = dense_reference(q, k, v, cu_q.tolist(), cu_k.tolist(), causal=causal, window=window,
                                   scale=scale_used, softcap=softcap, alibi=alibi)
    out = result[0] if lse else result
    assert out.shape == (15, 4, v_dim)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
    if lse:
        assert result[2] is None
        torch.testing.assert_close(result[1].double(), ref_lse, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("fake", [_torch_2_13, _torch_2_11, _torch_2_10], ids=["torch2.13", "torch2.11", "torch2.10"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(causal=True),
        dict(causal=False),
        dict(causal=True, kv_heads=2),
        dict(causal=True, kv_heads=1, v_dim=5),
        dict(causal=True, scale=0.07),
        dict(causal=False, scale=1.3, lse=True),
        dict(causal=True, dim=12, v_dim=12),
        dict(causal=True, dim=20, v_dim=5, kv_heads=2, lse=True),
    ],
    ids=["causal", "full", "gqa", "mqa_mla", "scale", "scale_lse", "head_dim12", "head_dim20_mla"],
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
