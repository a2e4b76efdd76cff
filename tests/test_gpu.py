"""CUDA-only checks: the flash_attn and torch backends against the eager reference, the
``auto`` choice, and packed-vs-alone equivalence of tiny models in bf16.

Every test is marked ``gpu`` and skipped without CUDA (see ``conftest.py``). The eager
backend (fp32 math, one document at a time) is itself checked against an independent dense
reference in ``test_varlen_attn.py``; here it is the reference for the GPU kernels.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from conftest import same_weights, tiny_model
from packtune.attention import backends, varlen_attn_func
from packtune.attention.varlen import AttnRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def _request(dtype=torch.bfloat16, causal=True, window=(-1, -1), head_dim=64, v_head_dim=64, gqa=False, lse=False,
             dropout=0.0):
    return AttnRequest(DEVICE, dtype, causal, window, 0.0, dropout, False, lse, head_dim, v_head_dim, gqa, True)


def _require(name: str, req: AttnRequest):
    if name == "flash_attn" and not HAS_FLASH:
        pytest.skip("flash-attn is not installed")
    reason = backends.unsupported(name, req)
    if reason is not None:
        pytest.skip(f"{name} cannot run this here: {reason}")


def _cu(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=DEVICE)


def _compare_to_eager(name, lq, lk=None, *, heads=8, kv_heads=8, dim=64, v_dim=None, causal=True, window=(-1, -1),
                      dtype=torch.bfloat16, lse=False, seed=0):
    lk = lq if lk is None else lk
    v_dim = dim if v_dim is None else v_dim
    _require(name, _request(dtype, causal, window, dim, v_dim, heads != kv_heads, lse))
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(sum(lq), heads, dim, device=DEVICE, generator=gen).to(dtype)
    k = torch.randn(sum(lk), kv_heads, dim, device=DEVICE, generator=gen).to(dtype)
    v = torch.randn(sum(lk), kv_heads, v_dim, device=DEVICE, generator=gen).to(dtype)
    g = torch.randn(sum(lq), heads, v_dim, device=DEVICE, generator=gen).to(dtype)
    cu_q, cu_k = _cu(lq), _cu(lk)
    results = {}
    for backend in (name, "eager"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        res = varlen_attn_func(*leaves, cu_q, cu_k, max(lq), max(lk), causal=causal, window_size=window,
                               return_attn_probs=lse, backend=backend)
        out = res[0] if lse else res
        assert out.shape == (sum(lq), heads, v_dim) and out.dtype == dtype
        assert out.device.type == torch.device(DEVICE).type
        (out.float() * g.float()).sum().backward()
        results[backend] = (out.float(), res[1] if lse else None, [t.grad.float() for t in leaves])
    out, lse_out, grads = results[name]
    ref, ref_lse, ref_grads = results["eager"]
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for label, mine, theirs in zip("qkv", grads, ref_grads):
        scale = max(float(theirs.abs().max()), 1.0)
        torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2 * scale, msg=lambda m, x=label: f"d{x}: {m}")
    if lse:
        assert lse_out.shape == ref_lse.shape == (heads, sum(lq))
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse_out.float()[finite], ref_lse[finite], rtol=1e-2, atol=1e-2)


GPU_BACKENDS = ("flash_attn", "torch")
LENGTHS = [17, 1, 64, 33, 128, 5]


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_eager(name, causal):
    _compare_to_eager(name, LENGTHS, causal=causal)


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_lq_differs_from_lk(name):
    _compare_to_eager(name, [5, 30, 7], [20, 30, 3], causal=False)
    _compare_to_eager(name, [5, 30, 3], [20, 30, 7], causal=True)


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("window,causal", [((15, 0), True), ((7, -1), True), ((8, 8), False)])
def test_sliding_window(name, window, causal):
    _compare_to_eager(name, LENGTHS, causal=causal, window=window)


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_gqa_mqa(name, kv_heads):
    _compare_to_eager(name, LENGTHS, kv_heads=kv_heads)


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_mla_v_head_dim(name):
    """v head_dim smaller than q/k's (deepseek: 192 vs 128): padded for the kernel, cropped after."""
    _compare_to_eager(name, LENGTHS, dim=96, v_dim=64, kv_heads=4)
    _compare_to_eager(name, LENGTHS, dim=96, v_dim=64, window=(15, 0))


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_dtypes_and_lse(name, dtype):
    _compare_to_eager(name, LENGTHS, dtype=dtype, kv_heads=4, lse=True)


def test_flash_softcap_and_alibi():
    _require("flash_attn", _request())
    lengths = [9, 40, 3]
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    q, k, v = (torch.randn(52, 4, 64, device=DEVICE, generator=gen).to(torch.bfloat16) for _ in range(3))
    cu = _cu(lengths)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEVICE)
    outs = {
        b: varlen_attn_func(q, k, v, cu, cu, 40, 40, causal=True, softcap=5.0, alibi_slopes=slopes, backend=b).float()
        for b in ("flash_attn", "eager")
    }
    torch.testing.assert_close(outs["flash_attn"], outs["eager"], rtol=2e-2, atol=2e-2)


def test_auto_choice_on_cuda():
    req = _request()
    if HAS_FLASH:
        assert backends.choose(req, "auto") == "flash_attn"
    elif backends.unsupported("torch", req) is None:
        assert backends.choose(req, "auto") == "torch"
    else:
        assert backends.choose(req, "auto") == "sdpa"
    assert backends.choose(_request(dtype=torch.float32), "auto") == "sdpa"
    assert backends.choose(_request(dtype=torch.float32, lse=True), "auto") == "eager"
    assert backends.choose(_request(head_dim=512, v_head_dim=512), "auto") == "sdpa"
    # Dropout: flash-attn has it, torch's varlen_attn does not.
    assert backends.choose(_request(dropout=0.1), "auto") == ("flash_attn" if HAS_FLASH else "sdpa")
    # Through the public function, auto gives the same output as the chosen backend.
    q = torch.randn(20, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    cu = _cu([8, 12])
    chosen = backends.choose(_request(), "auto")
    torch.testing.assert_close(
        varlen_attn_func(q, q, q, cu, cu, 12, 12, causal=True),
        varlen_attn_func(q, q, q, cu, cu, 12, 12, causal=True, backend=chosen),
        rtol=0,
        atol=0,
    )


def test_sdpa_backend_on_cuda_fp32_matches_eager():
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    lengths = [7, 30, 1, 12]
    q = torch.randn(50, 4, 32, device=DEVICE, generator=gen)
    k = torch.randn(50, 2, 32, device=DEVICE, generator=gen)
    v = torch.randn(50, 2, 24, device=DEVICE, generator=gen)
    cu = _cu(lengths)
    a = varlen_attn_func(q, k, v, cu, cu, 30, 30, causal=True, window_size=(5, 0), softcap=4.0, backend="sdpa")
    b = varlen_attn_func(q, k, v, cu, cu, 30, 30, causal=True, window_size=(5, 0), softcap=4.0, backend="eager")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
@pytest.mark.parametrize("backend", ["auto", "flash_attn", "torch"])
def test_tiny_model_packed_equals_alone_bf16(model_type, backend):
    if backend != "auto":
        window = (3, 0) if model_type == "mistral" else (-1, -1)
        _require(backend, _request(window=window, head_dim=16, v_head_dim=16, gqa=True))
    from packtune.modeling import enable_varlen

    packed_model = tiny_model(model_type, "packtune_varlen")
    alone_model = same_weights(packed_model, model_type, "eager")
    enable_varlen(packed_model, backend=backend)
    packed_model.to(DEVICE, torch.bfloat16).train()
    alone_model.to(DEVICE, torch.bfloat16).train()

    lengths = [3, 9, 6, 12]
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 128, (n,), generator=gen) for n in lengths]
    targets = [torch.randint(0, 128, (n,), generator=gen) for n in lengths]
    cu = _cu(lengths)
    bounds = cu.tolist()
    logits = packed_model(
        input_ids=torch.cat(ids).unsqueeze(0).to(DEVICE),
        position_ids=torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(DEVICE),
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12, max_length_k=12, use_cache=False,
    ).logits[0].float()
    spans = zip(bounds, bounds[1:], targets)
    sum(F.cross_entropy(logits[a:b], t.to(DEVICE), reduction="sum") for a, b, t in spans).backward()
    loss_alone = 0.0
    for doc, a, b, t in zip(ids, bounds, bounds[1:], targets):
        alone = alone_model(input_ids=doc.unsqueeze(0).to(DEVICE), use_cache=False).logits[0].float()
        scale = float(alone.detach().abs().max())
        torch.testing.assert_close(logits[a:b], alone, rtol=3e-2, atol=3e-2 * max(scale, 1.0))
        loss_alone = loss_alone + F.cross_entropy(alone, t.to(DEVICE), reduction="sum")
    loss_alone.backward()
    for (name, p), (_, r) in zip(packed_model.named_parameters(), alone_model.named_parameters()):
        mine, theirs = p.grad.float(), r.grad.float()
        rel = float((mine - theirs).norm() / theirs.norm().clamp(min=1e-6))
        assert rel < 5e-2, f"{name}: relative gradient difference {rel:.3g}"
