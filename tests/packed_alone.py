"""A packed row through ``enable_varlen`` against each document alone through the model's own forward.

``compare_packed_alone(model_type, lengths, **config)`` builds a tiny random model of
``model_type`` (fp32, dropout 0), keeps an untouched deep copy as the reference (transformers'
own forward, ``attn_implementation`` = ``reference_attn``), switches the original to packtune
with ``enable_varlen``, and runs:

* the packed row of every document (positions restarting at each document), loss = the sum of
  the documents' cross-entropies, backward;
* each document alone through the reference, with the same loss, summed over documents.

It returns the largest relative logit error and the largest relative gradient error over every
parameter (each relative to that tensor's largest magnitude in the reference).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import packtune  # noqa: F401  (registers "packtune_varlen")
from packtune.modeling import enable_varlen

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=512,
    attention_dropout=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def tiny(model_type: str, reference_attn: str = "eager", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny fp32 causal LM of ``model_type`` with random weights (seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=reference_attn, dtype=torch.float32)
    with torch.no_grad():
        # Random non-zero values for parameters initialised to constants (sinks start at 0 in some
        # families): a zero sink would hide a wrong sink gradient or a missing sink.
        for name, p in model.named_parameters():
            if p.dim() <= 1 and p.numel() > 0 and bool((p == p.flatten()[0]).all()) and "norm" not in name:
                p.normal_(0.0, 0.5)
    return model


def documents(vocab: int, lengths, seed: int = 0):
    """Random documents; no token repeats when the vocabulary allows it (a top-k selection over
    equal scores of repeated tokens breaks ties by slot, which differs packed and alone)."""
    gen = torch.Generator().manual_seed(seed)
    if vocab - 3 >= sum(lengths):
        tokens = (torch.randperm(vocab - 3, generator=gen)[: sum(lengths)] + 3).split(list(lengths))
        ids = list(tokens)
    else:
        ids = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    targets = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    return ids, targets


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


def compare(packed_model, reference, lengths, seed: int = 0, with_cu: bool = True) -> tuple[float, float]:
    """``(logit error, gradient error)`` of ``packed_model`` on one packed row against ``reference``
    on each document alone (both relative to the reference's largest magnitude)."""
    packed_model.train()
    reference.train()
    vocab = reference.config.get_text_config().vocab_size
    ids, targets = documents(vocab, lengths, seed)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    kwargs = dict(
        input_ids=torch.cat(ids).unsqueeze(0),
        position_ids=torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
        use_cache=False,
    )
    if with_cu:
        cut = torch.tensor(cu, dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=cut, cu_seq_lens_k=cut, max_length_q=max(lengths), max_length_k=max(lengths))
    logits = packed_model(**kwargs).logits[0]
    loss = sum(F.cross_entropy(logits[a:b], t, reduction="sum") for a, b, t in zip(cu, cu[1:], targets))
    loss.backward()
    alone = []
    for x, t in zip(ids, targets):
        out = reference(input_ids=x.unsqueeze(0), use_cache=False).logits[0]
        F.cross_entropy(out, t, reduction="sum").backward()
        alone.append(out.detach())
    logit_error = _relative(logits.detach(), torch.cat(alone))
    gp, ga = _grads(packed_model), _grads(reference)
    assert gp.keys() == ga.keys() and gp, f"gradients of different parameters: {sorted(gp.keys() ^ ga.keys())}"
    grad_error = max(_relative(gp[n], ga[n]) for n in ga if ga[n].abs().max() > 0)
    return logit_error, grad_error


def compare_packed_alone(model_type: str, lengths, reference_attn: str = "eager", seed: int = 0,
                         with_cu: bool = True, **overrides) -> tuple[float, float]:
    """Build a tiny ``model_type``, enable packtune on it, compare it packed with a deep copy alone."""
    model = tiny(model_type, reference_attn, seed, **overrides)
    reference = copy.deepcopy(model)
    enable_varlen(model)
    return compare(model, reference, lengths, seed, with_cu)
