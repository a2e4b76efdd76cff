"""The chunked loss head inside a training step, on tiny real models (issue 11, section 2).

``forward_loss_sum`` with ``loss_chunk_size`` (chunks of 5 trained tokens, so every packed
batch spans several) against ``loss_chunk_size=None`` (the plain head, logits at the trained
positions): the loss and the gradient of every parameter agree in fp32 to a relative 1e-6
for every class packtune knows the head of (``HEAD_TRANSFORMS``), which includes the head
transforms of gemma2/gemma3 (``final_logit_softcapping``), cohere (``logit_scale``) and granite
(``logits_scaling``). The full step (``accumulate_gradients``: global normalisation, each
``loss_reduction``) with those and a Llama with tied embeddings; LoRA on the output layer
(with its dropout); and the fallbacks to the plain head, each with its one log line.
"""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import random_samples, tiny_config
from packtune.distributed import DistEnv
from packtune.loss import REDUCTIONS, target_weights, weighted_loss_sum
from packtune.loss_head import HEAD_TRANSFORMS, ChunkedHead, chunked_head
from packtune.packing.collate import collate_varlen
from packtune.packing.packs import IGNORE_INDEX, get_pack, layout_packs
from packtune.recipe.engines.plain import PlainEngine
from packtune.recipe.step import accumulate_gradients, forward_loss_sum

CHUNK = 5
VOCAB, HIDDEN = 128, 64  # helpers' tiny vocabulary and hidden size
_EXTRA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=256, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)
_MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

#: Every class of HEAD_TRANSFORMS, as (model_type, config overrides).
MODELS = {
    "LlamaForCausalLM": ("llama", {}),
    "MistralForCausalLM": ("mistral", {}),
    "MixtralForCausalLM": ("mixtral", _MOE),
    "Qwen2ForCausalLM": ("qwen2", {}),
    "Qwen2MoeForCausalLM": ("qwen2_moe", {**_MOE, "shared_expert_intermediate_size": 32}),
    "Qwen3ForCausalLM": ("qwen3", {}),
    "Qwen3MoeForCausalLM": ("qwen3_moe", {**_MOE, "head_dim": 16}),
    "GemmaForCausalLM": ("gemma", {}),
    "Gemma2ForCausalLM": ("gemma2", {}),  # final_logit_softcapping=10.0 (helpers)
    "Gemma3ForCausalLM": ("gemma3_text", {"final_logit_softcapping": 5.0}),
    "Phi3ForCausalLM": ("phi3", {}),
    "Starcoder2ForCausalLM": ("starcoder2", {}),
    "GPTBigCodeForCausalLM": ("gpt_bigcode", {}),
    "Olmo2ForCausalLM": ("olmo2", {}),
    "DeepseekV3ForCausalLM": ("deepseek_v3", {}),
    "Glm4ForCausalLM": ("glm4", {}),
    "CohereForCausalLM": ("cohere", {"logit_scale": 0.25}),
    "Cohere2ForCausalLM": ("cohere2", {"logit_scale": 0.25}),
    "GraniteForCausalLM": ("granite", {"logits_scaling": 4.0}),
    "GraniteMoeForCausalLM": ("granitemoe", {"logits_scaling": 4.0, "num_local_experts": 4, "num_experts_per_tok": 2}),
}
TRANSFORMED = {"Gemma2ForCausalLM": "softcap", "Gemma3ForCausalLM": "softcap", "CohereForCausalLM": "scale",
               "Cohere2ForCausalLM": "scale", "GraniteForCausalLM": "divide", "GraniteMoeForCausalLM": "divide"}


def _model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    try:
        cfg = tiny_config(model_type, **overrides)
    except KeyError:  # not one of helpers' families
        cfg = AutoConfig.for_model(model_type, **{**_EXTRA, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="packtune_varlen", dtype=torch.float32)


def _batches(seed: int, n: int = 9, max_length: int = 40, per_batch: int = 2):
    """Packed micro-batches of ``n`` samples, each a prompt (untrained) and an answer."""
    samples = random_samples(seed, n)  # token ids < 96 <= VOCAB
    layout, _ = layout_packs(samples, max_length, "bfd")
    packs = [get_pack(samples, layout, p) for p in range(len(layout))]
    return [collate_varlen(packs[i : i + per_batch]) for i in range(0, len(packs), per_batch)]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error in the 2-norm (see tests/test_loss_head.py for why not elementwise)."""
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def _loss_and_grads(model, batch, reduction: str, chunk):
    model.zero_grad(set_to_none=True)
    targets, weights = target_weights(batch.labels, batch.cu_seqlens, reduction)
    loss = forward_loss_sum(model, batch, targets, weights, torch.float32, chunk)
    (loss / weights.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same(got, want, rel=1e-6):
    """Loss, the whole gradient, and each parameter's gradient within ``rel``.

    Except the bias of the key projection, whose gradient is zero in exact arithmetic (a
    constant added to every key of a query leaves its softmax unchanged): what fp32 leaves
    there is rounding noise, compared only as part of the whole gradient.
    """
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert float(loss) == pytest.approx(float(ref_loss), rel=rel)
    assert grads.keys() == ref_grads.keys()
    whole = _rel(torch.cat([g.reshape(-1) for g in grads.values()]), torch.cat([g.reshape(-1) for g in ref_grads.values()]))
    assert whole <= rel, f"whole gradient: {whole:.2e}"
    errors = {name: _rel(grads[name], ref_grads[name]) for name in ref_grads if ref_grads[name].any() and "k_proj.bias" not in name}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rel, f"{worst}: {errors[worst]:.2e}"
    return errors


def test_every_known_head_is_tested():
    assert set(MODELS) == set(HEAD_TRANSFORMS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_known_heads_equal_the_plain_head(name):
    model_type, overrides = MODELS[name]
    model = _model(model_type, **overrides)
    assert type(model).__name__ == name
    head = chunked_head(model, CHUNK)
    assert head is not None and head.module is model.get_output_embeddings()
    assert [kind for kind, _ in head.transform] == ([TRANSFORMED[name]] if name in TRANSFORMED else [])
    batch = _batches(seed=len(name))[0]
    assert int((batch.labels != IGNORE_INDEX).sum()) > 2 * CHUNK  # several chunks
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[-2]))
    try:
        chunked = _loss_and_grads(model, batch, REDUCTIONS[len(name) % 3], CHUNK)
    finally:
        hook.remove()
    assert rows == [0]  # the layer itself ran on no row: no logits
    plain = _loss_and_grads(model, batch, REDUCTIONS[len(name) % 3], None)
    _assert_same(chunked, plain)


def _engine(model):
    settings = SimpleNamespace(max_norm=0.0, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, warmup_ratio=0.0, lora=None, model_config=None)
    return PlainEngine(model, DistEnv(), settings, total_steps=1, compute_dtype=torch.float32)


STEP_MODELS = {
    "gemma2": ("gemma2", {}),
    "cohere": ("cohere", {"logit_scale": 0.25}),
    "granite": ("granite", {"logits_scaling": 4.0}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("which", sorted(STEP_MODELS))
def test_training_step_with_chunks_equals_plain(which, reduction):
    """``accumulate_gradients`` over 2 micro-batches: loss and every gradient, chunked vs plain."""
    model_type, overrides = STEP_MODELS[which]
    model = _model(model_type, **overrides)
    if which == "llama_tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    batches = _batches(seed=11, n=10)
    assert len(batches) >= 2
    results = {}
    for chunk in (CHUNK, None):
        model.zero_grad(set_to_none=True)
        result = accumulate_gradients(_engine(model), batches, reduction, torch.float32, chunk)
        results[chunk] = (torch.tensor(result.loss), {n: p.grad.clone() for n, p in model.named_parameters()})
    _assert_same(results[CHUNK], results[None])


def test_lora_on_the_output_layer_with_dropout():
    """peft LoRA on lm_head (dropout 0.1): the adapter's math runs inside the chunks."""
    from peft import LoraConfig, get_peft_model

    base = _model("llama")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "lm_head"]))
    lm_head = model.get_base_model().lm_head
    assert type(lm_head).__module__.startswith("peft.")
    torch.nn.init.normal_(lm_head.lora_B["default"].weight)  # B starts at zero: make it count
    head = chunked_head(model, CHUNK)
    assert head is not None and head.module is lm_head
    batch = _batches(seed=5)[0]
    model.train()
    torch.manual_seed(123)
    chunked = _loss_and_grads(model, batch, "sample", CHUNK)
    torch.manual_seed(123)  # the same dropout masks
    plain = _loss_and_grads(model, batch, "sample", None)
    errors = _assert_same(chunked, plain)
    assert any("lm_head.lora_A" in n for n in errors) and any("lm_head.lora_B" in n for n in errors)


def test_models_that_return_every_position_are_handled():
    """Without ``logits_to_keep`` the output layer gets every position; untrained ones are dropped."""
    model = _model("gemma2")
    batch = _batches(seed=3)[0]
    targets, weights = target_weights(batch.labels, batch.cu_seqlens, "token")
    head = chunked_head(model, CHUNK)
    with head.capture(targets, weights):
        logits = model(**batch.model_inputs()).logits
    got = head.loss(logits)
    assert logits.shape[-2] == 0
    want = weighted_loss_sum(model(**batch.model_inputs()).logits, targets, weights)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)


def _fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "using the plain head" in r.getMessage()]


def test_unknown_head_falls_back_with_one_log_line(caplog):
    """Phi (not in HEAD_TRANSFORMS; its output layer has a bias): the plain head, said once."""
    model = _model("phi", hidden_size=64, intermediate_size=96, resid_pdrop=0.0, embd_pdrop=0.0)
    assert type(model).__name__ not in HEAD_TRANSFORMS
    batches = _batches(seed=2)
    targets, weights = target_weights(batches[0].labels, batches[0].cu_seqlens, "token")
    with caplog.at_level(logging.WARNING, logger="packtune"):
        assert chunked_head(model, CHUNK) is None
        got = [forward_loss_sum(model, b, *target_weights(b.labels, b.cu_seqlens, "token"), torch.float32, CHUNK) for b in batches]
    lines = _fallback_lines(caplog)
    assert len(lines) == 1, lines
    assert "PhiForCausalLM" in lines[0] and "HEAD_TRANSFORMS" in lines[0]
    plain = forward_loss_sum(model, batches[0], targets, weights, torch.float32, None)
    assert float(got[0]) == float(plain)


def test_other_fallbacks_say_why(caplog):
    from peft import LoraConfig, get_peft_model

    class MyLlama(AutoModelForCausalLM.from_config(tiny_config("llama")).__class__):
        def forward(self, *args, **kwargs):  # a forward of its own: its head is unknown
            return super().forward(*args, **kwargs)

    dora = get_peft_model(_model("llama"), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["lm_head"]))
    untied_weird = _model("llama")
    untied_weird.lm_head = torch.nn.Sequential(torch.nn.Linear(64, VOCAB, bias=False))
    with caplog.at_level(logging.WARNING, logger="packtune"):
        assert chunked_head(MyLlama(tiny_config("llama")), CHUNK) is None
        assert chunked_head(dora, CHUNK) is None
        assert chunked_head(untied_weird, CHUNK) is None
        assert chunked_head(_model("llama"), None) is None  # switched off: nothing to say
    lines = _fallback_lines(caplog)
    assert len(lines) == 3, lines
    assert "its forward is not LlamaForCausalLM's" in lines[0]
    assert "LoRA variant" in lines[1]
    assert "output layer is a Sequential" in lines[2]


def test_the_output_layer_must_run_once():
    layer = torch.nn.Linear(4, 6, bias=False)
    head = ChunkedHead(layer, (), 2)
    targets, weights = torch.tensor([1, 2, 3]), torch.ones(3)
    x = torch.randn(3, 4)
    with head.capture(targets, weights):
        pass
    with pytest.raises(RuntimeError, match="never called its output layer"):
        head.loss(torch.zeros(0, 6))
    with head.capture(targets, weights):
        out = layer(x)
        assert out.shape == (0, 6)
        with pytest.raises(RuntimeError, match="ran twice in one forward"):
            layer(x)
    with head.capture(targets, weights), pytest.raises(RuntimeError, match="got 2 positions for 3 targets"):
        layer(x[:2])
    assert len(layer._forward_pre_hooks) == 0  # removed after each forward
    model = copy.deepcopy(layer)
    assert model(x).shape == (3, 6)


def test_a_training_step_never_holds_the_logits_of_more_than_a_chunk():
    """Every tensor of forward and backward with a vocabulary-sized last dimension (logits and
    their gradients) covers at most ``CHUNK`` positions; the plain head's cover all trained ones."""
    from helpers import Largest

    def logit_rows(t: torch.Tensor) -> int:
        # (hidden, vocab) is the output weight transposed, not logits
        if t.ndim >= 2 and t.shape[-1] == VOCAB and t.shape != (HIDDEN, VOCAB):
            return t.numel() // VOCAB
        return 0

    model = _model("gemma2")
    batch = _batches(seed=4)[0]
    targets, weights = target_weights(batch.labels, batch.cu_seqlens, "token")
    trained = int((targets != IGNORE_INDEX).sum())
    assert 3 * CHUNK < trained != HIDDEN
    seen = {}
    for chunk in (CHUNK, None):
        with Largest(logit_rows) as mode:
            forward_loss_sum(model, batch, targets, weights, torch.float32, chunk).backward()
        seen[chunk] = mode.largest
    assert seen == {CHUNK: CHUNK, None: trained}


def test_gradient_checkpointing_and_a_batch_with_nothing_to_train():
    model = _model("llama")
    model.gradient_checkpointing_enable()
    model.train()
    batch = _batches(seed=8)[0]
    _assert_same(_loss_and_grads(model, batch, "token", CHUNK), _loss_and_grads(model, batch, "token", None))
    # Nothing trained: a zero loss whose backward still reaches every parameter (the
    # gradient sync of every rank needs it), as with the plain head.
    batch.labels.fill_(IGNORE_INDEX)
    targets, weights = target_weights(batch.labels, batch.cu_seqlens, "token")
    loss = forward_loss_sum(model, batch, targets, weights, torch.float32, CHUNK)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_an_output_layer_with_a_bias():
    """A bias is a column of ones on the hidden side: loss and gradients as the plain layer's."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 30, bias=True)
    x = torch.randn(2, 7, 8, requires_grad=True)
    targets, weights = target_weights(torch.randint(0, 30, (2, 7)), torch.tensor([0, 5, 14]), "square")
    head = ChunkedHead(layer, (("softcap", 3.0),), 4)
    with head.capture(targets, weights):
        got = head.loss(layer(x))
    got.backward()
    got_grads = [t.grad.clone() for t in (x, layer.weight, layer.bias)]
    x.grad = layer.weight.grad = layer.bias.grad = None
    weighted_loss_sum(torch.tanh(layer(x) / 3.0) * 3.0, targets, weights).backward()
    for g, t in zip(got_grads, (x, layer.weight, layer.bias)):
        assert _rel(g, t.grad) <= 1e-6


def test_lora_output_layer_merged_or_disabled():
    """A merged adapter lives in the base weight; a disabled one does not count: as peft does."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head"]))
    lm_head = model.get_base_model().lm_head
    torch.nn.init.normal_(lm_head.lora_B["default"].weight)
    lm_head.base_layer.weight.requires_grad_(True)  # something to differentiate when the adapter is off
    batch = _batches(seed=6)[0]
    with model.disable_adapter():
        _assert_same(_loss_and_grads(model, batch, "token", CHUNK), _loss_and_grads(model, batch, "token", None))
    model.merge_adapter()
    assert lm_head.merged
    _assert_same(_loss_and_grads(model, batch, "token", CHUNK), _loss_and_grads(model, batch, "token", None))
