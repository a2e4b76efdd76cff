"""Packed rows through ``enable_varlen`` against each document alone through the model's own forward.

The reference is always a deep copy of the model taken before ``enable_varlen``: transformers'
own, unmodified layers and attention, fed one document at a time. The packed model reads rows
of several documents (``position_ids`` restarting at each document, as packtune's batches give
them, with or without the boundaries as ``cu_seq_lens``). Two losses:

* ``assert_packed_equals_alone`` / ``relative_errors`` / ``cuda_logit_error``: fixed random
  weights on the logits (``sum(logits * weights)``), so every logit gets a gradient; compared,
  the logits of every document and the gradient of every parameter (``packed_and_alone``);
* ``compare`` / ``compare_packed_alone``: the sum of the documents' cross-entropies, on
  documents without a repeated token (a top-k selection over equal scores of repeated tokens
  breaks ties by slot, which differs packed and alone); returns the largest relative errors.

Tiny models: ``build`` (the given config), ``tiny_causal_lm`` (defaults for models with
stateful layers), ``tiny`` (defaults for attention variants, constant-initialised parameters
made random).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from helpers import randomize_constant_parameters

import packtune  # noqa: F401  (registers "packtune_varlen")
from packtune.modeling import enable_varlen

# --- tiny models ------------------------------------------------------------------------------


def build(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
          **config) -> torch.nn.Module:
    """A causal LM of ``model_type`` and ``config`` with random (seeded) weights, in train mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **copy.deepcopy(config))
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kwargs).train()


#: What a tiny model of every test here shares: 64 hidden units, 4 heads of 16, 128 tokens.
_TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def tiny_causal_lm(model_type: str, seed: int = 0, dtype=torch.float32, **overrides) -> torch.nn.Module:
    """A tiny random causal LM of ``model_type`` (64 hidden units, vocabulary of 128), in train mode."""
    return build(model_type, seed, dtype, **{**_TINY, "max_position_embeddings": 2048, **overrides})


def tiny(model_type: str, reference_attn: str = "eager", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny fp32 causal LM of ``model_type`` with random weights (seeded), no attention dropout."""
    model = build(model_type, seed, torch.float32, reference_attn,
                  **{**_TINY, "max_position_embeddings": 512, "attention_dropout": 0.0, **overrides})
    randomize_constant_parameters(model)
    return model


# --- logits weighted at random ----------------------------------------------------------------


def packed_rows(lengths: list[list[int]], vocab: int, seed: int = 0):
    """``input_ids``, restarting ``position_ids`` and fixed logit weights of rows of documents
    (``lengths``: one list of document lengths per row, equal row totals)."""
    rows, length = len(lengths), sum(lengths[0])
    assert all(sum(row) == length for row in lengths), "rows must hold the same number of tokens"
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=gen)
    weights = torch.randn(rows, length, vocab, generator=gen)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return ids, pos, weights


def packed_and_alone(model: torch.nn.Module, lengths: list[list[int]], *, by_positions: bool = False,
                     enable: bool = True, seed: int = 0):
    """Logits and parameter gradients of ``model`` on the packed rows (after ``enable_varlen``
    when ``enable``) and of an untouched copy on each document alone: ``(packed, alone,
    packed_grads, alone_grads)``. The boundaries travel as ``cu_seq_lens`` (and restarting
    ``position_ids``), or as ``position_ids`` alone with ``by_positions``."""
    reference = copy.deepcopy(model)
    if enable:
        enable_varlen(model)
    device = next(model.parameters()).device
    ids, pos, weights = (t.to(device) for t in packed_rows(lengths, model.config.get_text_config().vocab_size, seed))
    flat = [n for row in lengths for n in row]
    cu = torch.tensor([0, *torch.tensor(flat).cumsum(0).tolist()], dtype=torch.int32, device=device)
    extra = {} if by_positions else dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(flat), max_length_k=max(flat))
    model.zero_grad(set_to_none=True)
    packed = model(input_ids=ids, position_ids=pos, use_cache=False, **extra).logits
    (packed * weights).sum().backward()
    reference.zero_grad(set_to_none=True)
    alone = torch.empty_like(packed.detach())
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            part = slice(start, start + n)
            logits = reference(input_ids=ids[r : r + 1, part], use_cache=False).logits
            (logits * weights[r : r + 1, part]).sum().backward()
            alone[r : r + 1, part] = logits.detach()
            start += n
    grads = lambda m: {k: p.grad for k, p in m.named_parameters()}  # noqa: E731
    return packed.detach(), alone, grads(model), grads(reference)


def assert_close_scaled(name: str, mine: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """``mine`` equals ``ref`` within ``rtol`` of each element and of ``ref``'s largest magnitude."""
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(mine, ref, rtol=rtol, atol=rtol * max(scale, 1e-3), msg=lambda m: f"{name}: {m}")


def assert_packed_equals_alone(model: torch.nn.Module, lengths: list[list[int]], *, by_positions: bool = False,
                               rtol: float = 1e-5, seed: int = 0) -> torch.Tensor:
    """``packed_and_alone``: equal logits of every document and equal parameter gradients,
    within ``rtol`` (``assert_close_scaled``). Returns the packed logits."""
    packed, alone, mine, theirs = packed_and_alone(model, lengths, by_positions=by_positions, seed=seed)
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            part = slice(start, start + n)
            assert_close_scaled(f"logits of row {r} tokens {start}:{start + n}", packed[r : r + 1, part], alone[r : r + 1, part], rtol)
            start += n
    for name, grad in theirs.items():
        if grad is None:
            assert mine[name] is None or not mine[name].any(), f"{name}: gradient only when packed"
            continue
        assert mine[name] is not None, f"{name}: gradient only alone"
        assert_close_scaled(f"gradient of {name}", mine[name], grad, rtol)
    return packed


def relative_error(mine: torch.Tensor, ref: torch.Tensor, floor: float = 1e-12) -> float:
    """The largest difference relative to ``ref``'s largest magnitude."""
    return float((mine - ref).abs().max() / ref.abs().max().clamp(min=floor))


def relative_errors(model: torch.nn.Module, lengths, enable: bool = True, seed: int = 1) -> tuple[float, dict[str, float]]:
    """On one packed row of ``lengths`` (boundaries from ``position_ids``): the largest logit
    error relative to the largest logit, and per parameter the largest gradient error relative
    to that parameter's largest gradient entry."""
    packed, alone, grads_packed, grads_alone = packed_and_alone(model, [list(lengths)], by_positions=True, enable=enable,
                                                                seed=seed)
    logit_error = relative_error(packed, alone, 0.0)
    errors = {}
    for name, ga in grads_alone.items():
        gp = grads_packed[name]
        assert (gp is None) == (ga is None), f"{name}: a gradient in only one of the two models"
        if ga is not None:
            errors[name] = relative_error(gp, ga)
    assert errors, "no parameter received a gradient"
    return logit_error, errors


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


def cuda_logit_error(model: torch.nn.Module, lengths, seed: int = 1) -> float:
    """Relative logit error of one packed row against each document alone, both on CUDA (the
    packed side through packtune's CUDA kernels where installed, the reference through the
    model's own)."""
    model = model.cuda()
    reference = copy.deepcopy(model)
    enable_varlen(model)
    ids, pos, _ = packed_rows([list(lengths)], model.config.get_text_config().vocab_size, seed)
    ids, pos = ids.cuda(), pos.cuda()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        alone = torch.cat(
            [
                reference(input_ids=i, position_ids=p, use_cache=False).logits[0]
                for i, p in zip(ids.split(list(lengths), 1), pos.split(list(lengths), 1))
            ]
        )
    return relative_error(packed, alone, 0.0)


# --- cross-entropy ----------------------------------------------------------------------------


def documents(vocab: int, lengths, seed: int = 0):
    """Random documents and targets; no token repeats when the vocabulary allows it."""
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
    logit_error = relative_error(logits.detach(), torch.cat(alone), 1e-6)
    gp, ga = _grads(packed_model), _grads(reference)
    assert gp.keys() == ga.keys() and gp, f"gradients of different parameters: {sorted(gp.keys() ^ ga.keys())}"
    grad_error = max(relative_error(gp[n], ga[n], 1e-6) for n in ga if ga[n].abs().max() > 0)
    return logit_error, grad_error


def compare_packed_alone(model_type: str, lengths, reference_attn: str = "eager", seed: int = 0,
                         with_cu: bool = True, **overrides) -> tuple[float, float]:
    """Build a tiny ``model_type``, enable packtune on it, compare it packed with a deep copy alone."""
    model = tiny(model_type, reference_attn, seed, **overrides)
    reference = copy.deepcopy(model)
    enable_varlen(model)
    return compare(model, reference, lengths, seed, with_cu)
