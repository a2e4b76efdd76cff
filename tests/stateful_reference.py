"""Packed rows through ``enable_varlen`` against each document alone, for models with stateful layers.

The reference is a deep copy of the model taken before ``enable_varlen``: transformers' own,
unmodified forward and default attention, fed one document at a time. The packed model reads
one row of all documents (``position_ids`` restarting at each document, as packtune's batches
give them). Compared: the logits of every document, and the gradient of every parameter after
the backward pass of the same loss (fixed random weights on the logits, summed).
"""

from __future__ import annotations

import copy

import torch

from packtune.modeling import enable_varlen


def tiny_causal_lm(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random causal LM of ``model_type`` (64 hidden units, vocabulary of 128)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **{**common, **overrides})
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).train()


def packed_row(lengths, vocab: int = 128, seed: int = 1):
    """``input_ids``, restarting ``position_ids`` and fixed logit weights for one packed row."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(3, vocab, (1, total), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    weights = torch.randn(total, vocab, generator=gen)
    return ids, pos, weights


def packed_and_alone(model: torch.nn.Module, lengths, enable: bool = True):
    """Logits and parameter gradients of ``model`` on the packed row (after ``enable_varlen``
    when ``enable``) and of an untouched copy on each document alone."""
    reference = copy.deepcopy(model)
    if enable:
        enable_varlen(model)
    ids, pos, weights = packed_row(lengths, model.config.get_text_config().vocab_size)
    model.zero_grad()
    packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    (packed * weights).sum().backward()
    alone, start = [], 0
    for n in lengths:
        span = slice(start, start + n)
        logits = reference(input_ids=ids[:, span], position_ids=pos[:, span], use_cache=False).logits[0]
        (logits * weights[span]).sum().backward()
        alone.append(logits)
        start += n
    grads = lambda m: {k: p.grad for k, p in m.named_parameters()}  # noqa: E731
    return packed.detach(), torch.cat(alone).detach(), grads(model), grads(reference)


def relative_errors(model: torch.nn.Module, lengths, enable: bool = True) -> tuple[float, dict[str, float]]:
    """Largest logit error relative to the largest logit, and per parameter the largest gradient
    error relative to that parameter's largest gradient entry."""
    packed, alone, grads_packed, grads_alone = packed_and_alone(model, lengths, enable)
    logit_error = float((packed - alone).abs().max() / alone.abs().max())
    errors = {}
    for name, ga in grads_alone.items():
        gp = grads_packed[name]
        assert (gp is None) == (ga is None), f"{name}: a gradient in only one of the two models"
        if ga is not None:
            errors[name] = float((gp - ga).abs().max() / ga.abs().max().clamp(min=1e-12))
    assert errors, "no parameter received a gradient"
    return logit_error, errors


def assert_packed_equals_alone(model: torch.nn.Module, lengths, tol: float = 2e-5) -> None:
    """Logits and every parameter's gradient within ``tol`` (relative) of the documents alone.

    2e-5, not 1e-5: transformers' own scan runs in fp32 whatever the model's dtype, and on
    OLMo Hybrid (beta up to 2) the reference's ``A_log`` / ``dt_bias`` gradients were measured
    1.0e-5 from the float64 value, the packed row's 2e-6.
    """
    logit_error, errors = relative_errors(model, lengths)
    assert logit_error <= tol, f"logits differ from the documents alone by {logit_error:.3g} (relative)"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"gradient of {worst} differs by {errors[worst]:.3g} (relative)"


def soften_decays(model: torch.nn.Module, high: float = 0.5, seed: int = 2) -> None:
    """Set every ``A_log`` so that the per-token decay is mild (``A`` in ``[0.01, high]``).

    Random init draws ``A`` up to 16, a decay of ``e^-20`` per token: the state then forgets
    the previous document within a token or two and a leak would hide; it also makes the tiny
    gradients of those heads fp32 noise in the reference itself. With mild decays the state
    survives across a boundary, so a leak shows, and both sides agree to ~1e-6.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.copy_(torch.empty(param.shape).uniform_(0.01, high, generator=gen).log())


def cuda_logit_error(model: torch.nn.Module, lengths) -> float:
    """Relative logit error of the packed row against each document alone, both on CUDA (the
    packed side through packtune's CUDA kernels where installed, the reference through the
    model's own)."""
    model = model.cuda()
    reference = copy.deepcopy(model)
    enable_varlen(model)
    ids, pos, _ = packed_row(lengths, model.config.get_text_config().vocab_size)
    ids, pos = ids.cuda(), pos.cuda()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        alone = torch.cat(
            [
                reference(input_ids=i, position_ids=p, use_cache=False).logits[0]
                for i, p in zip(ids.split(list(lengths), 1), pos.split(list(lengths), 1))
            ]
        )
    return float((packed - alone).abs().max() / alone.abs().max())
