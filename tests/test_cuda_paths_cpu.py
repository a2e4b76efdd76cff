"""The CUDA paths' logic that does not need a card, checked on the CPU (issue 10).

* the leak check and evaluation run under the training step's autocast (CPU bf16 here, fp32
  weights), so q/k/v reach the attention in the dtype training gives it;
* ``cu_seqlens`` (and ALiBi slopes) given on another device or dtype reach the kernels on
  ``q``'s device, int32 (fp32); validated boundaries are trusted only for their own total;
* the backend choice on a simulated pre-Ampere card, and the autocast dtype without bf16;
* the QLoRA setup arguments (peft's call mocked);
* the soft-capping / ALiBi math path: fp32 under autocast, and bounded memory on a long pack;
* flash-attn's and torch's limits refused in one line; the torch kernel gets K/V as they are;
* the gradient norm: fp32 chunks summed in fp64, no whole-gradient copy.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from helpers import leaky_attention, tiny_model
from packtune.attention import backends
from packtune.attention.backends import AttnCall
from packtune.attention.varlen import AttnRequest, CuSeqlens, varlen_attn_func
from packtune.modeling import LeakError, check_no_leak, enable_varlen
from packtune.recipe import model_setup
from varlen_reference import _cu, _inputs, dense_reference


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every call that reaches a kernel: ``(backend, q dtype, cu_seqlens_q, alibi)``."""
    calls = []
    real = backends.run

    def recording(name, call):
        calls.append(types.SimpleNamespace(name=name, dtype=call.q.dtype, cu_q=call.cu_seqlens_q, cu_k=call.cu_seqlens_k,
                                           alibi=call.alibi, q=call.q))
        return real(name, call)

    monkeypatch.setattr(backends, "run", recording)
    return calls


# ----------------------------------------------------------------------------- 1: autocast


def test_leak_check_runs_under_the_training_autocast(kernel_calls):
    from packtune.config import load_settings

    settings = load_settings("tiny_llama_full_demo", ["model_config.num_hidden_layers=1", "dtype=bfloat16"])
    model = model_setup.build_model(settings, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}, "full fine-tuning keeps fp32 weights"
    # fp32 weights: first an fp32 pass at fp32's tolerance, then the training step's bf16 autocast.
    assert kernel_calls and {c.dtype for c in kernel_calls} == {torch.float32, torch.bfloat16}, "no autocast pass"
    assert kernel_calls[0].dtype == torch.float32 and kernel_calls[-1].dtype == torch.bfloat16
    # The same check without autocast hands the kernel fp32: the dtype comes from the autocast.
    kernel_calls.clear()
    check_no_leak(model)
    assert {c.dtype for c in kernel_calls} == {torch.float32}


def test_leak_check_under_autocast_still_catches_a_leak():
    from transformers import AttentionInterface

    AttentionInterface.register("leaky_autocast_test", leaky_attention)
    model = tiny_model("llama", "eager")
    model.set_attn_implementation("leaky_autocast_test")
    with pytest.raises(LeakError, match="does not honour packing boundaries"):
        check_no_leak(model, dtype=torch.bfloat16)
    honest = enable_varlen(tiny_model("llama"))
    assert check_no_leak(honest, dtype=torch.bfloat16) < 5e-2


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def test_evaluation_generates_under_the_training_autocast(kernel_calls):
    from packtune.recipe.evaluate import evaluate

    model = enable_varlen(tiny_model("llama"))
    settings = types.SimpleNamespace(evaluation_inputs=["w5 w6 w7"], prompt_template="default", max_new_tokens=3,
                                     system_prompt=None, dtype="bfloat16")
    answers = evaluate(model, _word_tokenizer(), settings)
    assert len(answers) == 1 and isinstance(answers[0]["answer"], str)
    assert kernel_calls and {c.dtype for c in kernel_calls} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ----------------------------------------------------------------------------- 2: cu_seqlens device and dtype


def test_cu_seqlens_and_slopes_reach_the_kernel_on_qs_device(kernel_calls, monkeypatch):
    """q on another device than ``cu_seqlens`` (``meta`` stands in for CUDA on this machine)."""
    monkeypatch.setattr(backends, "_sdpa", lambda q, k, v, *a: torch.empty(q.shape[0], q.shape[1], v.shape[2], device=q.device))
    q, k, v = (torch.empty(12, 4, 8, device="meta") for _ in range(3))
    cu = torch.tensor([0, 5, 12])  # int64, on the CPU
    out = varlen_attn_func(q, k, v, cu, cu, 7, 7, causal=True, alibi_slopes=torch.ones(4, dtype=torch.float64),
                           softcap=1.0, backend="sdpa")
    assert out.device.type == "meta"
    call = kernel_calls[-1]
    for t in (call.cu_q, call.cu_k):
        assert t.device.type == "meta" and t.dtype == torch.int32
    assert call.alibi.device.type == "meta" and call.alibi.dtype == torch.float32


def test_int64_cu_seqlens_and_float64_slopes_compute_the_same(kernel_calls):
    lengths = [4, 9, 3]
    q, k, v, _ = _inputs(lengths, lengths, seed=1)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    want = varlen_attn_func(q, k, v, _cu(lengths), _cu(lengths), 9, 9, causal=True, alibi_slopes=slopes)
    got = varlen_attn_func(q, k, v, _cu(lengths, torch.int64), _cu(lengths, torch.int64), 9, 9, causal=True,
                           alibi_slopes=slopes.double())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert kernel_calls[-1].cu_q.dtype == torch.int32


def test_validated_boundaries_are_checked_against_the_tokens():
    lengths = [4, 9, 3]
    q, k, v, _ = _inputs(lengths, lengths, seed=2)
    cu = CuSeqlens.validate("cu", _cu(lengths, torch.int64))
    assert cu.tensor.dtype == torch.int32 and cu.host == (0, 4, 13, 16) and cu.longest == 9
    torch.testing.assert_close(varlen_attn_func(q, k, v, cu, cu, 9, 9, causal=True),
                               varlen_attn_func(q, k, v, _cu(lengths), _cu(lengths), 9, 9, causal=True), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"must end at the number of tokens \(15\), but it ends at 16"):
        varlen_attn_func(q[:15], k[:15], v[:15], cu, cu, 9, 9)
    with pytest.raises(ValueError, match="max_seqlen_q=8 is smaller than the longest query document"):
        varlen_attn_func(q, k, v, cu, cu, 8, 9)
    with pytest.raises(ValueError, match="non-decreasing"):
        CuSeqlens.validate("cu", torch.tensor([0, 5, 3]))


def test_the_boundary_hook_hands_the_layers_int32_boundaries(kernel_calls):
    model = enable_varlen(tiny_model("llama"))
    lengths = [3, 6, 5]
    ids = torch.randint(3, 120, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0, 3, 9, 14])  # int64, as a user might build it
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6,
                       max_length_k=6).logits
    assert len(kernel_calls) == model.config.num_hidden_layers
    assert all(c.cu_q.dtype == torch.int32 and c.cu_q is kernel_calls[0].cu_q for c in kernel_calls)
    with torch.no_grad():
        alone = model(input_ids=ids[:, 3:9], position_ids=pos[:, 3:9]).logits
    torch.testing.assert_close(packed[:, 3:9], alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- 3: pre-Ampere cards


def _cuda_request(dtype=torch.bfloat16, **changes):
    base = dict(device_type="cuda", dtype=dtype, causal=True, window=(-1, -1), softcap=0.0, dropout_p=0.0, alibi=False,
                return_lse=False, head_dim=64, v_head_dim=64, gqa=True, needs_grad=True)
    return AttnRequest(**{**base, **changes})


def _fake_flash(*args, **kwargs):
    raise AssertionError("not called: only the choice is tested")


@pytest.mark.parametrize("has_flash", [True, False], ids=["flash-attn", "no-flash-attn"])
def test_backend_choice_follows_the_compute_capability(monkeypatch, has_flash):
    monkeypatch.setattr(backends, "_flash_attn_func", lambda: _fake_flash if has_flash else None)
    assert backends._torch_varlen() is not None, "this torch has torch.nn.attention.varlen"
    for capability, expected in (((9, 0), "flash_attn" if has_flash else "torch"), ((8, 0), "flash_attn" if has_flash else "torch"),
                                 ((7, 5), "sdpa"), ((7, 0), "sdpa")):
        monkeypatch.setattr(backends, "cuda_capability", lambda index=None, c=capability: c)
        for dtype in (torch.bfloat16, torch.float16):
            assert backends.choose(_cuda_request(dtype), "auto") == expected, (capability, dtype)
        if expected == "sdpa":
            for name in ("torch", "flash_attn"):
                with pytest.raises(NotImplementedError, match=r"compute capability 8.0 \(Ampere\) or newer, this one is 7"):
                    backends.choose(_cuda_request(), name)


def test_auto_dtype_without_native_bf16_is_fp16(monkeypatch):
    cuda = torch.device("cuda", 0)

    def is_bf16_supported(including_emulation: bool = True, native: bool = False):
        return native or including_emulation  # a T4 / V100: bf16 only emulated

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert model_setup.compute_dtype("auto", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert model_setup.compute_dtype("auto", cuda) == torch.bfloat16
    assert model_setup.compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert model_setup.compute_dtype("bfloat16", cuda) == torch.bfloat16


# ----------------------------------------------------------------------------- 5: QLoRA


def test_qlora_setup_arguments(monkeypatch):
    import peft

    from packtune.config import load_settings

    seen = {}

    def prepare(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=None, **rest):
        seen.update(use_gradient_checkpointing=use_gradient_checkpointing,
                    gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        return model

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    monkeypatch.setattr(model_setup, "load_base_model", lambda settings, device, dtype=torch.float32: tiny_model("llama"))
    settings = load_settings("tiny_llama_lora_demo", ["model_config=None", "pretrained_model_name_or_path=some/base",
                                                      "lora.quantization=4bit", "gradient_checkpointing=True",
                                                      "dtype=float16"])
    model = model_setup.build_model(settings, torch.device("cpu"), torch.float32)
    assert seen == {"use_gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    assert any("lora_" in n for n, _ in model.named_parameters())

    # The 4-bit compute dtype follows `dtype` (bitsandbytes stands in as installed).
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cuda = torch.device("cuda", 0)
    assert model_setup._quantization(settings, cuda).bnb_4bit_compute_dtype == torch.float16
    for name, want in (("auto", torch.bfloat16), ("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        quant = model_setup._quantization(dataclasses.replace(settings, dtype=name), cuda)
        assert quant.bnb_4bit_compute_dtype == want, name


# ----------------------------------------------------------------------------- 8: the math path


def _storages(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class LargestTensor(TorchDispatchMode):
    """The largest floating-point tensor any operation allocated while active (views and
    in-place results share an input's storage and are not allocations)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _storages((args, kwargs))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in inputs:
                self.numel = max(self.numel, t.numel())
        return out


def _long_pack(block, alibi: bool, dropout: float = 0.0, monkeypatch=None):
    """fwd+bwd of soft-capped attention over 4 documents of 512 tokens (2 heads, GQA):
    ``(largest tensor, elements kept for backward, out, dq)``."""
    monkeypatch.setattr(backends, "MATH_BLOCK_ELEMENTS", block)
    lengths = [512] * 4
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2048, 2, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2048, 1, 8, generator=gen, requires_grad=True) for _ in range(2))
    slopes = torch.tensor([0.5, 0.25]) if alibi else None
    kept = {}

    def pack(t):
        if t.is_floating_point():  # distinct storages: views of one input count once
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    largest = LargestTensor()
    torch.manual_seed(7)
    with largest, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = varlen_attn_func(q, k, v, _cu(lengths), _cu(lengths), 512, 512, causal=True, softcap=5.0,
                               alibi_slopes=slopes, dropout_p=dropout, backend="sdpa")
    with largest:
        out.square().sum().backward()
    return largest.numel, sum(kept.values()), out.detach(), q.grad


@pytest.mark.parametrize("alibi", [False, True], ids=["softcap", "softcap_alibi"])
def test_math_path_memory_is_bounded_on_a_long_pack(monkeypatch, alibi):
    block = 1 << 15
    inputs = 2048 * 2 * 8  # q's elements: the pack itself
    largest, kept, out, dq = _long_pack(block, alibi, monkeypatch=monkeypatch)
    # Whole pack: 2 x 2048^2 = 8.4M scores; one document: 2 x 512^2 = 524k; a block: 32k.
    assert largest <= max(block, inputs), f"a tensor of {largest} elements (block {block})"
    assert kept <= 2 * inputs, f"{kept} elements kept for the backward: scores are kept, not recomputed"
    big_largest, big_kept, big_out, big_dq = _long_pack(1 << 30, alibi, monkeypatch=monkeypatch)
    assert big_largest >= 2 * 512 * 512 and big_kept > 8 * inputs  # what the bound prevents
    torch.testing.assert_close(out, big_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq, big_dq, rtol=1e-5, atol=1e-5)


def test_blocked_math_path_matches_the_reference_on_odd_shapes(monkeypatch):
    """Blocks cut inside documents of unequal lengths, with a window, ALiBi per document and GQA."""
    monkeypatch.setattr(backends, "MATH_BLOCK_ELEMENTS", 96)
    lengths = [13, 1, 30, 7, 22]
    q, k, v, _ = _inputs(lengths, lengths, heads=4, kv_heads=2, seed=4)
    slopes = torch.rand(len(lengths), 4)
    out = varlen_attn_func(q, k, v, _cu(lengths), _cu(lengths), 30, 30, causal=True, window_size=(9, 0), softcap=3.0,
                           alibi_slopes=slopes, backend="sdpa")
    ref, _ = dense_reference(q, k, v, _cu(lengths).tolist(), _cu(lengths).tolist(), causal=True, window=(9, 0),
                             softcap=3.0, alibi=slopes)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_blocked_math_dropout_replays_its_pattern_in_the_backward(monkeypatch):
    """Each block is recomputed in the backward with the dropout pattern of its forward: the
    gradients equal those of the same blocks kept in memory (checkpointing switched off)."""
    _, _, out, dq = _long_pack(1 << 15, False, dropout=0.3, monkeypatch=monkeypatch)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *args, use_reentrant=None: fn(*args))
    _, kept, out_kept, dq_kept = _long_pack(1 << 15, False, dropout=0.3, monkeypatch=monkeypatch)
    assert kept > 8 * 2048 * 2 * 8, "without recomputation the blocks' scores are kept"
    torch.testing.assert_close(out, out_kept, rtol=0, atol=0)
    torch.testing.assert_close(dq, dq_kept, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_math_paths_compute_in_fp32_under_autocast(backend):
    """Under bf16 autocast (the training step's), the soft-capping math and the eager reference
    keep their scores in fp32: the same result as without autocast, to the bit."""
    lengths = [6, 11, 4]
    q, k, v, _ = _inputs(lengths, lengths, heads=4, kv_heads=2, dtype=torch.bfloat16, seed=5)
    cu = _cu(lengths)
    plain = varlen_attn_func(q, k, v, cu, cu, 11, 11, causal=True, softcap=2.0, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = varlen_attn_func(q, k, v, cu, cu, 11, 11, causal=True, softcap=2.0, backend=backend)
    torch.testing.assert_close(autocast, plain, rtol=0, atol=0)
    ref, _ = dense_reference(q, k, v, cu.tolist(), cu.tolist(), causal=True, softcap=2.0)
    torch.testing.assert_close(autocast.double(), ref, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- 4, 9: kernel limits


def test_flash_refuses_softcap_with_dropout_and_auto_moves_on(monkeypatch):
    monkeypatch.setattr(backends, "_flash_attn_func", lambda: _fake_flash)
    monkeypatch.setattr(backends, "cuda_capability", lambda index=None: (9, 0))
    both = _cuda_request(softcap=30.0, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="flash-attn cannot combine softcap with dropout"):
        backends.choose(both, "flash_attn")
    assert backends.choose(both, "auto") == "sdpa"
    assert backends.choose(_cuda_request(softcap=30.0), "auto") == "flash_attn"


def test_torch_refuses_a_deterministic_backward(monkeypatch):
    monkeypatch.setattr(backends, "_flash_attn_func", lambda: None)
    monkeypatch.setattr(backends, "cuda_capability", lambda index=None: (9, 0))
    with pytest.raises(NotImplementedError, match="no deterministic backward"):
        backends.choose(_cuda_request(deterministic=True), "torch")
    assert backends.choose(_cuda_request(deterministic=True), "auto") == "sdpa"
    assert backends.choose(_cuda_request(deterministic=True, needs_grad=False), "auto") == "torch"


def test_torch_kernel_gets_kv_heads_as_they_are(monkeypatch):
    """GQA: no repeat of K/V per layer; the flag where the signature has one, else nothing."""
    seen = []

    def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        seen.append((query.shape[1], key.shape[1], value.shape[1], None))
        return query.new_zeros(query.shape[0], query.shape[1], value.shape[-1])

    def varlen_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
        seen.append((query.shape[1], key.shape[1], value.shape[1], enable_gqa))
        return query.new_zeros(query.shape[0], query.shape[1], value.shape[-1])

    lengths = [3, 5]
    q, k, v, _ = _inputs(lengths, lengths, heads=8, kv_heads=2, seed=6)
    for fake in (varlen_2_11, varlen_2_13):
        monkeypatch.setattr(backends, "_torch_varlen", lambda f=fake: (f, frozenset(inspect.signature(f).parameters)))
        req = _cuda_request(torch.float32, head_dim=8, v_head_dim=8)
        backends.run("torch", AttnCall(q, k, v, _cu(lengths), _cu(lengths), (0, 3, 8), (0, 3, 8), 5, 5, 8**-0.5, req))
    assert seen == [(8, 2, 2, None), (8, 2, 2, True)]


# ----------------------------------------------------------------------------- 10: the gradient norm


def test_grad_norm_is_exact_without_copying_whole_gradients():
    from packtune.recipe.engines.base import NORM_CHUNK_DEFAULT, clip_gradients, grad_norm

    gen = torch.Generator().manual_seed(0)
    big = torch.randn(4_000_000, generator=gen) * 1e-3
    small = torch.randn(300, 7, generator=gen)
    want = float(torch.cat([big.double(), small.double().reshape(-1)]).norm())
    largest = LargestTensor()
    with largest:
        got = grad_norm([big, small])
    assert abs(got - want) <= 1e-6 * want, (got, want)
    assert largest.numel <= NORM_CHUNK_DEFAULT, f"a {largest.numel}-element temporary (chunks are {NORM_CHUNK_DEFAULT})"
    half = big.to(torch.bfloat16)
    want_half = float(half.double().norm())
    assert abs(grad_norm([half]) - want_half) <= 1e-5 * want_half

    params = [torch.nn.Parameter(torch.zeros(4_000_000)), torch.nn.Parameter(torch.zeros(300, 7))]
    params[0].grad, params[1].grad = big.clone(), small.clone()
    norm = clip_gradients(params, max_norm=1.0)
    assert norm == pytest.approx(want, rel=1e-6)
    clipped = float(torch.cat([p.grad.double().reshape(-1) for p in params]).norm())
    assert clipped == pytest.approx(1.0, rel=1e-5)
    assert clip_gradients(params, max_norm=10.0) == pytest.approx(1.0, rel=1e-5)  # below the limit: untouched
    assert float(torch.cat([p.grad.double().reshape(-1) for p in params]).norm()) == pytest.approx(clipped, rel=1e-12)
