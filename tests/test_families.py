"""Packed rows through ``attn_implementation="packtune_varlen"`` equal each document run alone.

For every supported model family: model A (packtune_varlen) reads one packed row of four
documents of different lengths; model B (same weights, transformers' ``eager`` attention)
reads each document alone. Logits must match, and so must the gradient of every parameter
after the backward pass of the same loss (the sum of the documents' cross-entropies).

Sliding-window families get ``sliding_window=4`` so that the longer documents exercise the
window; gemma2 soft-caps attention and final logits; deepseek_v3 has MLA (v head_dim 12,
q/k head_dim 24) and a mixture of experts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import FAMILIES, SLIDING, same_weights, tiny_model

LENGTHS = (3, 9, 6, 12)


def _docs(vocab: int, lengths=LENGTHS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    targets = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    return ids, targets


def _packed_inputs(ids, with_cu: bool, with_positions: bool = True):
    lengths = [len(x) for x in ids]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    kwargs = {"input_ids": torch.cat(ids).unsqueeze(0), "use_cache": False}
    if with_positions:
        kwargs["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    if with_cu:
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    return kwargs, cu.tolist()


def _grads(model):
    return {name: (None if p.grad is None else p.grad.detach().clone()) for name, p in model.named_parameters()}


def _assert_grads_equal(packed, alone):
    assert packed.keys() == alone.keys()
    checked = 0
    for name in packed:
        gp, ga = packed[name], alone[name]
        assert (gp is None) == (ga is None), f"{name}: gradient present in only one model"
        if gp is None:
            continue
        scale = max(float(ga.abs().max()), 1e-3)
        torch.testing.assert_close(gp, ga, rtol=1e-4, atol=2e-5 * scale, msg=lambda m, n=name: f"grad of {n}: {m}")
        checked += 1
    assert checked > 0


def _run_equivalence(model_type: str, with_cu: bool, with_positions: bool = True, lengths=LENGTHS, enable=False):
    packed_model = tiny_model(model_type, "packtune_varlen")
    if enable:
        from packtune.modeling import enable_varlen

        enable_varlen(packed_model)
    alone_model = same_weights(packed_model, model_type, "eager")
    assert packed_model.config._attn_implementation == "packtune_varlen"
    assert alone_model.config._attn_implementation == "eager"
    packed_model.train()
    alone_model.train()

    vocab = packed_model.config.vocab_size
    ids, targets = _docs(vocab, lengths)
    kwargs, cu = _packed_inputs(ids, with_cu, with_positions)

    logits = packed_model(**kwargs).logits[0]
    loss_packed = sum(
        F.cross_entropy(logits[a:b], t, reduction="sum") for a, b, t in zip(cu, cu[1:], targets)
    )
    loss_packed.backward()

    loss_alone = 0.0
    for doc, (a, b), t in zip(ids, zip(cu, cu[1:]), targets):
        alone = alone_model(
            input_ids=doc.unsqueeze(0), position_ids=torch.arange(len(doc)).unsqueeze(0), use_cache=False
        ).logits[0]
        scale = float(alone.detach().abs().max())
        torch.testing.assert_close(
            logits[a:b], alone, rtol=1e-4, atol=1e-5 * max(scale, 1.0),
            msg=lambda m, a=a, b=b: f"logits of document [{a}:{b}]: {m}",
        )
        loss_alone = loss_alone + F.cross_entropy(alone, t, reduction="sum")
    loss_alone.backward()
    torch.testing.assert_close(loss_packed, loss_alone, rtol=1e-5, atol=1e-5)
    _assert_grads_equal(_grads(packed_model), _grads(alone_model))


@pytest.mark.parametrize("model_type", FAMILIES, ids=FAMILIES)
def test_packed_equals_alone(model_type):
    """position_ids + cu_seq_lens_q/k + max_length_q/k (packtune's batch format)."""
    _run_equivalence(model_type, with_cu=True)


POSITION_ONLY = tuple(f for f in FAMILIES if f != "gpt_bigcode")


@pytest.mark.parametrize("model_type", POSITION_ONLY, ids=POSITION_ONLY)
def test_packed_equals_alone_position_ids_only(model_type):
    """Document boundaries derived from position_ids restarts alone."""
    _run_equivalence(model_type, with_cu=False)


@pytest.mark.xfail(
    strict=True,
    reason="documented limitation of a bare attn_implementation='packtune_varlen': GPT-BigCode does not hand "
    "position_ids to its attention, so a row given by positions alone is one document unless the batch carries "
    "cu_seq_lens_q/k (packtune's collator always does) or the model went through enable_varlen (next test)",
)
def test_gpt_bigcode_position_ids_only_needs_enable_varlen():
    _run_equivalence("gpt_bigcode", with_cu=False)


@pytest.mark.parametrize("model_type", ["gpt_bigcode", "llama", "gemma2"])
def test_enable_varlen_derives_boundaries_from_position_ids_once(model_type, monkeypatch):
    """enable_varlen's hook turns restarting position_ids into cu_seq_lens for every family,
    once per forward (not once per layer)."""
    import packtune.attention.hf as hf

    calls = []
    real = hf.cu_seqlens_from_position_ids

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "cu_seqlens_from_position_ids", counted)  # the boundary hook's, in attention.hf
    _run_equivalence(model_type, with_cu=False, enable=True)
    assert len(calls) == 1  # one packed forward; the per-document references use eager


@pytest.mark.parametrize("model_type", ["llama", "mistral"], ids=["llama", "mistral"])
def test_packed_equals_alone_zero_and_one_token_documents(model_type):
    """One-token documents (and the window on the long ones) at the edges of the row."""
    _run_equivalence(model_type, with_cu=True, lengths=(1, 7, 1, 1, 10))


def test_sliding_families_have_a_window_shorter_than_documents():
    """The equivalence above only proves the window if documents are longer than it."""
    from helpers import tiny_config

    for model_type in SLIDING:
        cfg = tiny_config(model_type)
        assert cfg.sliding_window is not None and cfg.sliding_window < max(LENGTHS), model_type
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is not None:
            assert "sliding_attention" in layer_types, (model_type, layer_types)


def test_gemma2_softcapping_is_on():
    from helpers import tiny_config

    cfg = tiny_config("gemma2")
    assert cfg.attn_logit_softcapping and cfg.final_logit_softcapping
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}


def test_deepseek_v3_is_mla_and_moe():
    from helpers import tiny_config

    cfg = tiny_config("deepseek_v3")
    assert cfg.v_head_dim != cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    assert cfg.n_routed_experts > 1 and cfg.num_hidden_layers > cfg.first_k_dense_replace
