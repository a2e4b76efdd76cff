"""``attn_implementation="packtune_varlen"`` inside transformers models, and the leak check.

transformers' own packed-row detection (from ``position_ids``) switches off when a KV cache
exists (``use_cache=True`` in a training forward) or an all-ones 2-D ``attention_mask`` is
passed; packtune_varlen must keep document boundaries in both cases.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface

from helpers import leaky_attention, same_weights, tiny_model
from packtune.attention import ATTN_IMPLEMENTATION, cu_seqlens_from_position_ids
from packtune.attention.hf import BACKEND_ATTR, packtune_attention_forward, packtune_mask
from packtune.modeling import LeakError, check_no_leak, enable_varlen

LENGTHS = (5, 7, 4)


def _packed(lengths=LENGTHS, vocab=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, sum(lengths)), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return ids, pos, bounds


def _max_error_vs_alone(model, reference, extra, lengths=LENGTHS, model_type="llama"):
    """Largest |logit difference| of every packed document against the document run alone."""
    ids, pos, bounds = _packed(lengths)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, **extra).logits[0]
        errors = []
        for a, b in zip(bounds, bounds[1:]):
            alone = reference(input_ids=ids[:, a:b], position_ids=pos[:, a:b], use_cache=False).logits[0]
            errors.append(float((packed[a:b] - alone).abs().max()))
    return max(errors)


CASES = {
    "use_cache": dict(use_cache=True),
    "all_ones_mask": dict(attention_mask=torch.ones(1, sum(LENGTHS), dtype=torch.long), use_cache=False),
    "both": dict(attention_mask=torch.ones(1, sum(LENGTHS), dtype=torch.long), use_cache=True),
}


@pytest.fixture(scope="module")
def llama_models():
    varlen = tiny_model("llama", ATTN_IMPLEMENTATION).eval()
    return {
        "varlen": varlen,
        "eager": same_weights(varlen, "llama", "eager").eval(),
        "sdpa": same_weights(varlen, "llama", "sdpa").eval(),
    }


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_packtune_varlen_does_not_leak(llama_models, case):
    error = _max_error_vs_alone(llama_models["varlen"], llama_models["eager"], CASES[case])
    assert error < 1e-5


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_transformers_sdpa_leaks_there(llama_models, case):
    """The contrast: transformers 5.x's own packed detection does not survive these inputs."""
    clean = _max_error_vs_alone(llama_models["sdpa"], llama_models["eager"], dict(use_cache=False))
    assert clean < 1e-5  # position_ids alone: transformers detects the packing itself
    leaky = _max_error_vs_alone(llama_models["sdpa"], llama_models["eager"], CASES[case])
    if leaky <= 1e-2 and not transformers.__version__.startswith("5.24"):
        pytest.skip(f"transformers {transformers.__version__} no longer leaks here")
    assert leaky > 1e-2


@pytest.mark.parametrize("model_type", ["mistral", "gemma2"])
def test_use_cache_and_mask_do_not_leak_with_sliding_window(model_type):
    varlen = tiny_model(model_type, ATTN_IMPLEMENTATION).eval()
    eager = same_weights(varlen, model_type, "eager").eval()
    lengths = (6, 9, 3)
    extra = dict(attention_mask=torch.ones(1, sum(lengths), dtype=torch.long), use_cache=True)
    assert _max_error_vs_alone(varlen, eager, extra, lengths) < 1e-5


def test_training_forward_with_use_cache_keeps_gradients_per_document():
    """use_cache=True in a training forward (a common config default) still gives exact grads."""
    varlen = tiny_model("llama", ATTN_IMPLEMENTATION).train()
    eager = same_weights(varlen, "llama", "eager").train()
    ids, pos, bounds = _packed()
    logits = varlen(input_ids=ids, position_ids=pos, use_cache=True).logits[0]
    logits.square().mean(-1).sum().backward()
    for a, b in zip(bounds, bounds[1:]):
        alone = eager(input_ids=ids[:, a:b], position_ids=pos[:, a:b], use_cache=False).logits[0]
        alone.square().mean(-1).sum().backward()
    for (name, p), (_, r) in zip(varlen.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_padded_batch_of_packed_rows_does_not_leak():
    """A 2-D mask that really pads builds a dense mask; document boundaries still hold."""
    varlen = tiny_model("mistral", ATTN_IMPLEMENTATION).eval()
    eager = same_weights(varlen, "mistral", "eager").eval()
    rows = [(3, 6), (4, 2, 5)]
    width = 12
    gen = torch.Generator().manual_seed(1)
    ids = torch.zeros(2, width, dtype=torch.long)
    pos = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for r, lengths in enumerate(rows):
        at = 0
        for n in lengths:
            ids[r, at : at + n] = torch.randint(3, 128, (n,), generator=gen)
            pos[r, at : at + n] = torch.arange(n)
            at += n
        mask[r, :at] = 1
    with torch.no_grad():
        packed = varlen(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
        for r, lengths in enumerate(rows):
            at = 0
            for n in lengths:
                alone = eager(input_ids=ids[r : r + 1, at : at + n], use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, at : at + n], alone, rtol=1e-4, atol=1e-5)
                at += n


def test_batch_of_packed_rows_from_position_ids():
    """Several packed rows: boundaries restart at every row."""
    varlen = tiny_model("qwen2", ATTN_IMPLEMENTATION).eval()
    eager = same_weights(varlen, "qwen2", "eager").eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (2, 10), generator=gen)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]])
    with torch.no_grad():
        packed = varlen(input_ids=ids, position_ids=pos, use_cache=False).logits
        for r, spans in enumerate([[(0, 4), (4, 10)], [(0, 7), (7, 10)]]):
            for a, b in spans:
                alone = eager(input_ids=ids[r : r + 1, a:b], use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, a:b], alone, rtol=1e-4, atol=1e-5)


def test_backends_agree_inside_a_model():
    model = tiny_model("gemma2", ATTN_IMPLEMENTATION).eval()
    ids, pos, bounds = _packed()
    cu = torch.tensor(bounds, dtype=torch.int32)
    kwargs = dict(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    outs = {}
    for backend in ("sdpa", "eager", "auto"):
        enable_varlen(model, backend=backend)
        with torch.no_grad():
            outs[backend] = model(**kwargs).logits
    torch.testing.assert_close(outs["sdpa"], outs["eager"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["auto"], outs["sdpa"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma2"])
def test_batched_generation_with_left_padding_matches_eager(model_type):
    varlen = tiny_model(model_type, ATTN_IMPLEMENTATION).eval()
    eager = same_weights(varlen, model_type, "eager").eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, :1] = 0
    ids[mask == 0] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ours = varlen.generate(**kwargs)
    theirs = eager.generate(**kwargs)
    assert torch.equal(ours, theirs)
    if model_type == "llama":
        # Each row alone (no padding) gives the same continuation.
        for r in range(3):
            alone = eager.generate(
                input_ids=ids[r : r + 1, mask[r].bool()], max_new_tokens=8, do_sample=False, pad_token_id=0
            )
            assert torch.equal(ours[r, -8:], alone[0, -8:])


def test_packed_rows_cannot_be_decoded_against_a_cache():
    module = _module()
    q = torch.randn(1, 4, 2, 8)
    k = torch.randn(1, 4, 5, 8)
    pos = torch.tensor([[0, 0]])
    with pytest.raises(NotImplementedError, match="cannot be decoded against an earlier KV cache"):
        packtune_attention_forward(module, q, k, k, None, scaling=8**-0.5, position_ids=pos)
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="cannot be decoded against an earlier KV cache"):
        packtune_attention_forward(
            module, q, k, k, None, scaling=8**-0.5, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_q, max_length_q=1,
            max_length_k=1,
        )


# ----------------------------------------------------------------------------- unsupported


def _module():
    module = torch.nn.Module()
    module.is_causal = True
    module.config = type("C", (), {})()
    return module


def test_output_attentions_raises():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(NotImplementedError, match="cannot return attention weights"):
        packtune_attention_forward(_module(), q, q, q, None, scaling=0.3, output_attentions=True)
    model = tiny_model("llama", ATTN_IMPLEMENTATION)
    with pytest.raises(NotImplementedError, match="cannot return attention weights"):
        model(input_ids=torch.randint(3, 128, (1, 6)), output_attentions=True)


@pytest.mark.parametrize("backend", ["flash_attn", "torch"])
def test_attention_sinks_refused_by_kernels_without_them(backend):
    """Sinks are exact on sdpa/eager (tests/test_attention_sinks.py); the flash kernels say no."""
    module = _module()
    module.config.packtune_attn_backend = backend
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(NotImplementedError, match="attention sinks"):
        packtune_attention_forward(module, q, q, q, None, scaling=0.3, s_aux=torch.zeros(4))


def test_two_dimensional_mask_reaching_attention_is_refused():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="expects a 4-D mask or None"):
        packtune_attention_forward(_module(), q, q, q, torch.ones(1, 3), scaling=0.3)


def test_attention_backend_comes_from_config():
    module = _module()
    setattr(module.config, BACKEND_ATTR, "torch")
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(NotImplementedError, match="runs only on CUDA"):
        packtune_attention_forward(module, q, q, q, None, scaling=0.3)


# ----------------------------------------------------------------------------- mask function


def test_mask_function_skips_only_when_nothing_is_masked():
    assert packtune_mask(batch_size=1, q_length=5, kv_length=5) is None
    ones = torch.ones(1, 5, dtype=torch.bool)
    assert packtune_mask(batch_size=1, q_length=5, kv_length=5, attention_mask=ones) is None
    padded = torch.tensor([[False, True, True, True, True]])
    mask = packtune_mask(batch_size=1, q_length=5, kv_length=5, attention_mask=padded)
    assert mask is not None and mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    assert not bool(mask[0, 0, :, 0].any())
    decode = packtune_mask(batch_size=1, q_length=1, kv_length=6, q_offset=5)
    assert decode is not None and bool(decode.all())


# ----------------------------------------------------------------------------- cu_seqlens


@pytest.mark.parametrize(
    "position_ids,rows,expected",
    [
        ([[0, 1, 2, 0, 1, 0]], 1, [0, 3, 5, 6]),
        ([[0, 1, 2, 3]], 1, [0, 4]),
        ([[0, 0, 0]], 1, [0, 1, 2, 3]),
        ([[5, 6, 7, 0, 1]], 1, [0, 3, 5]),  # a row may start mid-document (position 5)
        ([[0, 1, 2, 7, 8]], 1, [0, 3, 5]),  # any jump starts a document, not only a 0
        ([[0, 1, 0, 1]], 2, [0, 2, 4, 6, 8]),  # (1, T) position_ids broadcast to every row
        ([[0, 1, 2, 0], [0, 0, 1, 2]], 2, [0, 3, 4, 5, 8]),
        ([[3, 4], [4, 5]], 2, [0, 2, 4]),  # every row starts a document
    ],
)
def test_cu_seqlens_from_position_ids(position_ids, rows, expected):
    cu = cu_seqlens_from_position_ids(torch.tensor(position_ids), rows=rows)
    assert cu.dtype == torch.int32
    assert cu.tolist() == expected


# ----------------------------------------------------------------------------- enable / leak check


def test_enable_varlen_switches_attention_and_turns_cache_off():
    model = tiny_model("llama", "eager")
    assert model.config.use_cache
    assert enable_varlen(model, backend="sdpa") is model
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert model.config.use_cache is False
    assert getattr(model.config, BACKEND_ATTR) == "sdpa"
    enable_varlen(model)
    assert getattr(model.config, BACKEND_ATTR) == "auto"
    with pytest.raises(ValueError, match="unknown attn_backend 'fast'"):
        enable_varlen(model, backend="fast")


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "deepseek_v3", "gpt_bigcode"])
def test_check_no_leak_passes_for_enabled_models(model_type):
    model = enable_varlen(tiny_model(model_type, "eager")).train()
    error = check_no_leak(model)
    assert 0.0 <= error < 1e-4
    assert model.training  # restored


def test_check_no_leak_catches_attention_that_ignores_boundaries():
    AttentionInterface.register("leaky_test", leaky_attention)
    model = tiny_model("llama", "eager")
    model.set_attn_implementation("leaky_test")
    assert model.config._attn_implementation == "leaky_test"
    with pytest.raises(LeakError, match="does not honour packing boundaries.*leaky_test"):
        check_no_leak(model)


def test_check_no_leak_accepts_transformers_sdpa_on_its_own_inputs():
    """check_no_leak passes use_cache=False and no mask, where transformers' detection works."""
    model = tiny_model("llama", "sdpa")
    assert check_no_leak(model) < 1e-4


def test_enable_varlen_through_a_peft_model():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", "eager")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    enable_varlen(model)
    assert base.config._attn_implementation == ATTN_IMPLEMENTATION
    assert base.config.use_cache is False
    assert check_no_leak(model) < 1e-4
