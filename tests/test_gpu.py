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

from helpers import same_weights, tiny_model
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


def _expected_auto(dtype=torch.bfloat16, dropout=0.0, head_dim=64, lse=False) -> str:
    """What ``"auto"`` must run on this card, worked out from the facts (not from ``choose``):
    flash-attn if installed, then torch's varlen kernel, both only on sm80+ with fp16/bf16;
    else sdpa (eager only for the log-sum-exp in fp32)."""
    ampere = torch.cuda.get_device_capability() >= (8, 0)
    fast = ampere and dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
    if fast and HAS_FLASH:
        return "flash_attn"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        has_torch_kernel = True
    except ImportError:
        has_torch_kernel = False
    if fast and has_torch_kernel and dropout == 0.0:
        return "torch"
    return "eager" if lse and dtype == torch.float32 else "sdpa"


@pytest.fixture
def ran(monkeypatch):
    """The names of the backends that actually ran, in order."""
    names = []
    real = backends.run

    def recording(name, *args):
        names.append(name)
        return real(name, *args)

    monkeypatch.setattr(backends, "run", recording)
    return names


def test_auto_choice_on_cuda(ran):
    cu = _cu([8, 12])
    cases = [
        (dict(dtype=torch.bfloat16), {}),
        (dict(dtype=torch.float16), {}),
        (dict(dtype=torch.float32), {}),
        (dict(dtype=torch.float32, lse=True), dict(return_attn_probs=True)),
        (dict(dtype=torch.bfloat16, head_dim=512), {}),
        (dict(dtype=torch.bfloat16, dropout=0.1), dict(dropout_p=0.1)),
    ]
    for facts, kwargs in cases:
        dim = facts.get("head_dim", 64)
        q = torch.randn(20, 4, dim, device=DEVICE, dtype=facts["dtype"])
        k = torch.randn(20, 2, dim, device=DEVICE, dtype=facts["dtype"])
        ran.clear()
        varlen_attn_func(q, k, k, cu, cu, 12, 12, causal=True, **kwargs)
        assert ran == [_expected_auto(**facts)], (facts, ran)


def test_auto_output_is_the_expected_kernels_output():
    q = torch.randn(20, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    cu = _cu([8, 12])
    torch.testing.assert_close(
        varlen_attn_func(q, q, q, cu, cu, 12, 12, causal=True),
        varlen_attn_func(q, q, q, cu, cu, 12, 12, causal=True, backend=_expected_auto()),
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


def _packed_equals_alone(model_type: str, backend: str, weights: torch.dtype, autocast: torch.dtype, seed: int):
    """A tiny model with ``weights``-dtype parameters under ``autocast`` (``torch.float32``:
    none): the logits and gradients of a packed row match each document alone through eager
    attention under the same autocast."""
    if backend in ("flash_attn", "torch"):
        window = (3, 0) if model_type == "mistral" else (-1, -1)
        _require(backend, _request(window=window, head_dim=16, v_head_dim=16, gqa=True))
    from packtune.modeling import autocast_context, enable_varlen

    packed_model = tiny_model(model_type, "packtune_varlen")
    alone_model = same_weights(packed_model, model_type, "eager")
    enable_varlen(packed_model, backend=backend)
    packed_model.to(DEVICE, weights).train()
    alone_model.to(DEVICE, weights).train()
    assert {p.dtype for p in packed_model.parameters()} == {weights}
    lengths = [3, 9, 6, 12]
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 128, (n,), generator=gen) for n in lengths]
    targets = [torch.randint(0, 128, (n,), generator=gen) for n in lengths]
    cu = _cu(lengths)
    bounds = cu.tolist()
    context = autocast_context(torch.device(DEVICE), autocast)
    with context:
        logits = packed_model(
            input_ids=torch.cat(ids).unsqueeze(0).to(DEVICE),
            position_ids=torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(DEVICE),
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12, max_length_k=12, use_cache=False,
        ).logits[0].float()
    sum(F.cross_entropy(logits[a:b], t.to(DEVICE), reduction="sum") for a, b, t in zip(bounds, bounds[1:], targets)).backward()
    loss_alone = 0.0
    for doc, a, b, t in zip(ids, bounds, bounds[1:], targets):
        with context:
            alone = alone_model(input_ids=doc.unsqueeze(0).to(DEVICE), use_cache=False).logits[0].float()
        scale = float(alone.detach().abs().max())
        torch.testing.assert_close(logits[a:b], alone, rtol=3e-2, atol=3e-2 * max(scale, 1.0))
        loss_alone = loss_alone + F.cross_entropy(alone, t.to(DEVICE), reduction="sum")
    loss_alone.backward()
    for (name, p), (_, r) in zip(packed_model.named_parameters(), alone_model.named_parameters()):
        mine, theirs = p.grad.float(), r.grad.float()
        rel = float((mine - theirs).norm() / theirs.norm().clamp(min=1e-6))
        assert rel < 5e-2, f"{name}: relative gradient difference {rel:.3g}"


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
@pytest.mark.parametrize("backend", ["auto", "flash_attn", "torch"])
def test_tiny_model_packed_equals_alone_bf16(model_type, backend):
    _packed_equals_alone(model_type, backend, weights=torch.bfloat16, autocast=torch.float32, seed=0)


# ----------------------------------------------------------------------------- issue 10: the training path


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
@pytest.mark.parametrize("backend", ["auto", "flash_attn", "torch", "sdpa"])
def test_fp32_weights_under_bf16_autocast_match_eager(model_type, backend):
    """Full fine-tuning's setting: fp32 master weights, bf16 autocast. q/k/v reach the kernel in
    bf16 (a half-only kernel runs); forward and backward match each document alone through
    eager attention under the same autocast."""
    _packed_equals_alone(model_type, backend, weights=torch.float32, autocast=torch.bfloat16, seed=1)


@pytest.mark.parametrize("backend", ["auto", "flash_attn", "torch"])
def test_build_model_checks_leaks_through_the_training_kernel(backend, ran):
    """``build_model`` with fp32 weights and a half-only kernel: the leak check runs under the
    training autocast and through that kernel (it raised NotImplementedError before)."""
    if backend != "auto":
        _require(backend, _request(head_dim=32, v_head_dim=32, gqa=True))
    from packtune.config import load_settings
    from packtune.recipe.model_setup import build_model

    settings = load_settings("tiny_llama_full_demo", ["model_config.vocab_size=128", f"attn_backend={backend!r}",
                                                      "dtype='bfloat16'"])
    model = build_model(settings, torch.device(DEVICE), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert ran and set(ran) == {_expected_auto() if backend == "auto" else backend}, ran


@pytest.mark.parametrize("name", ["flash_attn", "torch", "auto"])
@pytest.mark.parametrize("dims", [(20, 20), (12, 12), (40, 24)], ids=["d20", "d12", "d40_v24"])
def test_head_dim_not_a_multiple_of_8(name, dims):
    """torch's kernel checks head_size % 8 == 0: packtune pads (and crops) around it."""
    dim, v_dim = dims
    if name == "auto":
        name = _expected_auto(head_dim=dim)
        if name == "sdpa":
            pytest.skip("auto runs sdpa on this card")
    _compare_to_eager(name, LENGTHS, dim=dim, v_dim=v_dim, kv_heads=4)
    _compare_to_eager(name, LENGTHS, dim=dim, v_dim=v_dim, kv_heads=2, window=(15, 0))


@pytest.mark.parametrize("kw", [
    dict(causal=True),
    dict(causal=True, kv_heads=2),
    dict(causal=True, kv_heads=2, window=(15, 0)),
    dict(causal=False, kv_heads=1),
], ids=["causal", "gqa", "gqa_window_mask", "mqa_full"])
def test_sdpa_backend_bf16_matches_eager(kw):
    _compare_to_eager("sdpa", LENGTHS, dtype=torch.bfloat16, **kw)


def test_sdpa_with_gqa_and_a_mask_avoids_the_math_kernel():
    """A window needs a mask; with GQA SDPA's fused kernels cannot take both, so packtune
    repeats K/V: the call must run with the math kernel switched off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        _compare_to_eager("sdpa", LENGTHS, kv_heads=2, window=(15, 0))
        _compare_to_eager("sdpa", [5, 30, 7], [20, 30, 3], kv_heads=2, causal=False)


def _dropout_moments(backend: str, p: float = 0.3, softcap: float = 0.0, n: int = 3000, length: int = 6):
    """Max |z| of the mean over ``n`` copies of a document, and the empirical / expected
    variance ratios, against the exact moments of inverted dropout (fp64, from the bf16 inputs):
    mean = P v and variance = (P^2) (v^2) p / (1 - p) per output element."""
    heads, dim = 2, 64
    gen = torch.Generator().manual_seed(0)
    q1, k1, v1 = (torch.randn(length, heads, dim, generator=gen).to(torch.bfloat16) for _ in range(3))
    s = torch.einsum("qhd,khd->hqk", q1.double(), k1.double()) * dim**-0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    prob = torch.softmax(s, -1)
    mean = torch.einsum("hqk,khd->qhd", prob, v1.double())
    var = torch.einsum("hqk,khd->qhd", prob.square(), v1.double().square()) * p / (1 - p)
    q, k, v = (t.to(DEVICE).repeat(n, 1, 1) for t in (q1, k1, v1))
    cu = torch.arange(0, n * length + 1, length, dtype=torch.int32, device=DEVICE)
    out = varlen_attn_func(q, k, v, cu, cu, length, length, dropout_p=p, causal=True, softcap=softcap, backend=backend)
    per_doc = out.double().view(n, length, heads, dim).cpu()
    z = (per_doc.mean(0) - mean) / (var / n).sqrt()
    ratio = per_doc.var(0) / var
    return float(z.abs().max()), ratio


@pytest.mark.parametrize("backend,softcap", [("flash_attn", 0.0), ("sdpa", 0.0), ("sdpa", 3.0), ("auto", 0.0)])
def test_dropout_has_the_right_mean_and_variance(backend, softcap):
    if backend == "flash_attn":
        _require("flash_attn", _request(dropout=0.3))
    worst_z, ratio = _dropout_moments(backend, softcap=softcap)
    assert worst_z < 6.0, f"the mean is off by {worst_z:.1f} standard errors"
    assert 0.95 < float(ratio.mean()) < 1.05, f"variance ratio {float(ratio.mean()):.3f} (dropout not p={0.3})"
    assert 0.75 < float(ratio.min()) and float(ratio.max()) < 1.33, (float(ratio.min()), float(ratio.max()))


@pytest.mark.parametrize("backend", ["flash_attn", "sdpa", "eager", "auto"])
def test_deterministic_backward_is_bitwise_repeatable(backend):
    if backend == "flash_attn":
        _require("flash_attn", _request())
    lengths = [300, 17, 512, 64]
    gen = torch.Generator(device=DEVICE).manual_seed(8)
    q = torch.randn(sum(lengths), 8, 64, device=DEVICE, generator=gen).to(torch.bfloat16)
    k = torch.randn(sum(lengths), 2, 64, device=DEVICE, generator=gen).to(torch.bfloat16)
    g = torch.randn(sum(lengths), 8, 64, device=DEVICE, generator=gen).to(torch.bfloat16)
    cu = _cu(lengths)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, k)]
        out = varlen_attn_func(*leaves, cu, cu, 512, 512, causal=True, deterministic=True, backend=backend)
        out.backward(g)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b), "two deterministic backward passes differ"


def test_torch_backend_refuses_deterministic_backward():
    _require("torch", _request())
    q = torch.randn(20, 4, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no deterministic backward"):
        varlen_attn_func(q, q, q, _cu([8, 12]), _cu([8, 12]), 12, 12, causal=True, deterministic=True, backend="torch")


def test_cu_seqlens_on_the_cpu_and_int64_reach_the_kernel_on_cuda():
    """The docstring's case: ``cu_seqlens`` built on the CPU (int64) for CUDA q/k/v."""
    name = _expected_auto()
    lengths = [8, 12, 3]
    q = torch.randn(23, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    cpu_cu = torch.tensor([0, 8, 20, 23])
    out = varlen_attn_func(q, q, q, cpu_cu, cpu_cu, 12, 12, causal=True, backend=name)
    torch.testing.assert_close(out, varlen_attn_func(q, q, q, _cu(lengths), _cu(lengths), 12, 12, causal=True, backend=name),
                               rtol=0, atol=0)


def test_alibi_slopes_on_the_cpu_in_fp64():
    _require("flash_attn", _request())
    q = torch.randn(23, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    cu = _cu([8, 12, 3])
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)  # on the CPU
    out = varlen_attn_func(q, q, q, cu, cu, 12, 12, causal=True, alibi_slopes=slopes, backend="flash_attn")
    ref = varlen_attn_func(q, q, q, cu, cu, 12, 12, causal=True, alibi_slopes=slopes.float().to(DEVICE), backend="eager")
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_grad_norm_on_cuda_matches_fp64():
    from packtune.recipe.engines.base import grad_norm

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    grads = [torch.randn(n, device=DEVICE, generator=gen) * 1e-3 for n in (20_000_000, 4096, 7)]
    want = float(torch.cat([g.double() for g in grads]).norm())
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = grad_norm(grads)
    assert abs(got - want) <= 1e-6 * want
    # No fp64 (or fp32) copy of the 80 MB gradient: a few MB of chunk norms at most.
    assert torch.cuda.max_memory_allocated() - base < 8 * 2**20
