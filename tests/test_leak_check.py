"""``check_no_leak`` cannot be fooled: leaks at large offsets, beyond a window, in a convolution
or in the backward alone are refused, and an exact model passes at fp32's tolerance.

Each leaky model here is built to be exact on the old check's row (12 tokens, logits only) and
wrong on a real packed row; the check must raise ``LeakError`` on every one of them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

import packtune.modeling as modeling
from helpers import tiny_model
from packtune.layers import VARLEN_LAYERS
from packtune.modeling import MIN_REACH, LeakError, check_no_leak, enable_varlen, leak_check_lengths

#: Where the "far" leak starts: past the 12 tokens the old check packed.
FAR = 16


def _documents(position_ids: torch.Tensor, honoured_until: int | None = None) -> torch.Tensor:
    """Document index of every token of row 0 (a document starts where the position restarts);
    starts at or after ``honoured_until`` are ignored (merged into the document before)."""
    pos = position_ids[0]
    start = pos == 0
    if honoured_until is not None:
        start &= torch.arange(len(pos), device=pos.device) < honoured_until
    return start.long().cumsum(0)


def _masked_attention(query, key, value, doc, scaling):
    """Causal attention in which a query sees only keys of the same document (``doc``)."""
    length = query.shape[2]
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & (doc[:, None] == doc[None, :])
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2).contiguous()


def _far_leak(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Honours the documents that start within the first ``FAR`` tokens of the row only."""
    return _masked_attention(query, key, value, _documents(kwargs["position_ids"], FAR), scaling), None


def _backward_leak(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Exact forward (the leaky term is added and subtracted), backward through whole-row attention."""
    exact = _masked_attention(query, key, value, _documents(kwargs["position_ids"]), scaling)
    leaky = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    ).transpose(1, 2)
    return exact + (leaky - leaky.detach()), None


def _with_attention(name, fn):
    AttentionInterface.register(name, fn)
    model = tiny_model("llama", "eager")
    model.set_attn_implementation(name)
    return model


def _old_check(model, lengths=(8, 4)) -> float:
    """The check this one replaced: 12 tokens, the second document's logits, no gradients."""
    first, second = lengths
    ids = torch.randint(3, 128, (1, first + second), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(first), torch.arange(second)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, first:]
        alone = model(input_ids=ids[:, first:], position_ids=pos[:, first:], use_cache=False).logits[0]
    return float((packed - alone).abs().max() / alone.abs().max())


def test_exact_models_pass_at_fp32_tolerance():
    for model_type in ("llama", "mistral", "gemma2"):
        model = enable_varlen(tiny_model(model_type)).train()
        assert 0.0 <= check_no_leak(model) <= 1e-5
        assert model.training  # restored


def test_masked_attention_of_these_tests_is_exact():
    """The leaky attentions below differ from this honest one only where they say."""
    model = _with_attention("honest_leak_test", lambda m, q, k, v, mask, dropout=0.0, scaling=None, **kw: (
        _masked_attention(q, k, v, _documents(kw["position_ids"]), scaling), None))
    assert check_no_leak(model) <= 1e-5


def test_a_leak_at_large_offsets_is_caught():
    model = _with_attention("far_leak_test", _far_leak)
    assert _old_check(model) < 1e-5, "the old 12-token check could not see it"
    with pytest.raises(LeakError, match=r"71, 5, 67 tokens, the logits differ.*far_leak_test"):
        check_no_leak(model)


def test_a_leak_in_the_backward_only_is_caught_by_the_gradients():
    model = _with_attention("backward_leak_test", _backward_leak)
    assert check_no_leak(model, grads=False) <= 1e-5, "the forward is exact"
    with pytest.raises(LeakError, match=r"the gradient of model\.\S+ differ"):
        check_no_leak(model)


def test_a_logits_only_check_builds_no_graph():
    """``grads=False`` (ZeRO-3's check, each module's weights gathered while it runs) builds no
    autograd graph: a graph would keep every gathered weight alive until the check ends."""
    model = tiny_model("llama")
    enable_varlen(model)
    for p in model.parameters():
        p.requires_grad_(True)
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(output.logits.requires_grad))
    check_no_leak(model, grads=False)
    assert seen and not any(seen)
    seen.clear()
    check_no_leak(model)
    assert seen and all(seen)


def test_a_leak_under_bf16_autocast_is_caught_by_the_fp32_pass():
    model = _with_attention("far_leak_bf16_test", _far_leak)
    with pytest.raises(LeakError, match=r"float32, tolerance 1e-05"):
        check_no_leak(model, dtype=torch.bfloat16)


def _lfm2(**overrides):
    settings = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, pad_token_id=0, layer_types=["conv", "full_attention"],
        conv_L_cache=3,
    )
    cfg = AutoConfig.for_model("lfm2", **{**settings, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)


def ignores_boundaries(module, *args, **kwargs):
    """A varlen form that forgets the boundaries: the layer's own forward over the whole row."""
    return type(module).forward(module, *args, **kwargs)


def test_a_convolution_that_crosses_documents_is_caught(monkeypatch):
    """LFM2's short convolution given a varlen form that runs across document starts (three taps:
    only the first two tokens of each later document see the one before)."""
    monkeypatch.setitem(VARLEN_LAYERS, "Lfm2ShortConv", f"{__name__}:ignores_boundaries")
    model = enable_varlen(_lfm2())
    assert model.model.layers[0].conv.forward.func is ignores_boundaries
    with pytest.raises(LeakError, match="Lfm2ForCausalLM"):
        check_no_leak(model)


def test_documents_outreach_every_window_chunk_and_kernel_of_the_config():
    assert leak_check_lengths(tiny_model("llama")) == (MIN_REACH + 7, 5, MIN_REACH + 3)
    mistral = tiny_model("mistral", sliding_window=100, max_position_embeddings=512)
    first, short, last = leak_check_lengths(mistral)
    assert min(first, last) > 100 and short < first
    # The training row bounds the check: no document of it is longer than max_length.
    assert sum(leak_check_lengths(mistral, max_length=128)) <= 128
    # Position embeddings bound it too.
    assert max(leak_check_lengths(tiny_model("mistral", sliding_window=300))) <= 256
    lfm2 = _lfm2(conv_L_cache=90, max_position_embeddings=512)
    assert min(leak_check_lengths(lfm2)[0], leak_check_lengths(lfm2)[2]) > 90
    # Settings that count layers, heads or experts are not spans.
    assert modeling.reach(tiny_model("qwen2", max_window_layers=500, max_position_embeddings=1024)) == MIN_REACH


def test_the_gradient_check_holds_no_second_copy_and_gives_gradients_back(monkeypatch):
    model = enable_varlen(tiny_model("llama"))
    params = list(model.parameters())
    kept = [torch.full_like(p, 3.0) for p in params]
    for p, g in zip(params, kept):
        p.grad = g
    held = []
    real = modeling._projections

    def counting(grad, seed):
        held.append(sum(p.grad is not None and p.grad is not g for p, g in zip(params, kept)))
        return real(grad, seed)

    monkeypatch.setattr(modeling, "_projections", counting)
    check_no_leak(model)
    assert len(held) == 2 * len(params)  # every parameter, once for the packed row, once for its documents
    assert max(held) == 1, "more than one parameter's check gradient alive at once"
    assert all(p.grad is g for p, g in zip(params, kept))


def _no_window(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Exact per document, but without the model's sliding window."""
    return _masked_attention(query, key, value, _documents(kwargs["position_ids"]), scaling), None


def test_documents_alone_run_as_transformers_built_the_model():
    """A packed path that drops what the model's own attention does (here Mistral's window) is
    caught: each document alone runs under the attention the model had before enable_varlen."""
    model = enable_varlen(tiny_model("mistral", "sdpa", sliding_window=8))
    assert check_no_leak(model) <= 1e-5
    AttentionInterface.register("no_window_test", _no_window)
    model.set_attn_implementation("no_window_test")
    with pytest.raises(LeakError, match="no_window_test"):
        check_no_leak(model)
    assert model.config._attn_implementation == "no_window_test"  # given back


def test_a_model_loaded_with_packtune_attention_is_checked_against_sdpa():
    model = tiny_model("mistral", "packtune_varlen", sliding_window=8)
    seen = []
    real = model.set_attn_implementation

    def recording(name):
        seen.append(name)
        return real(name)

    model.set_attn_implementation = recording
    assert check_no_leak(enable_varlen(model)) <= 1e-5
    assert seen[0] == "sdpa" and model.config._attn_implementation == "packtune_varlen"


def test_documents_alone_get_no_packtune_keywords():
    """The documents alone reach the layers as a user's plain unpacked call would: no boundary
    keywords (transformers' Gated DeltaNet hands ``cu_seq_lens`` to its torch scan, which refuses
    them), while the packed row gets them; the boundary hook is given back afterwards."""
    model = enable_varlen(tiny_model("llama"))
    seen = []
    model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(sorted(k for k in kwargs if k.startswith(("cu_seq", "packtune")))),
        with_kwargs=True,
    )
    hooks = list(model.model._forward_pre_hooks.values())
    check_no_leak(model)
    assert seen[0] == ["cu_seq_lens_k", "cu_seq_lens_q", "packtune_boundaries"]
    assert seen[1:] == [[]] * len(leak_check_lengths(model))
    assert list(model.model._forward_pre_hooks.values()) == hooks


def test_gated_deltanet_is_checked_against_transformers_own_scan():
    """Qwen3.5's Gated DeltaNet: each document alone runs transformers' torch scan (which refuses
    packed boundaries), the packed row packtune's; they agree."""
    cfg = AutoConfig.for_model(
        "qwen3_5_text", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
        layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16,
    )
    torch.manual_seed(0)
    model = enable_varlen(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))
    assert check_no_leak(model) <= modeling.GRAD_TOLERANCE[torch.float32]


def test_documents_draw_distinct_ordinary_tokens():
    """Within each document no token repeats and none is special (padding, bos, eos), where the
    vocabulary allows: a top-k over exactly tied scores would pick by slot in the row."""
    model = tiny_model("llama", pad_token_id=0, bos_token_id=1, eos_token_id=[2, 5])
    lengths = leak_check_lengths(model)
    ids = modeling.leak_check_ids(model, lengths)
    assert ids.shape == (1, sum(lengths))
    for doc in ids[0].split(list(lengths)):
        assert len(set(doc.tolist())) == len(doc)
    assert not set(ids[0].tolist()) & {0, 1, 2, 5}
    assert int(ids.max()) < model.config.vocab_size
    # A vocabulary smaller than a document: tokens repeat, still none special.
    small = tiny_model("llama", vocab_size=40, pad_token_id=0)
    ids = modeling.leak_check_ids(small, (71, 5, 67))
    assert not (ids == 0).any() and int(ids.max()) < 40
