"""A packed row through ``enable_varlen`` against each document alone through the model's own forward.

The reference is a deep copy of the model made before ``enable_varlen`` (transformers' unmodified
layers, its default attention), run once per document. Compared: the logits of every document and
the gradient of every parameter of ``sum(logits * weights)`` (fixed random weights per token),
the packed row's gradient being the sum of the documents' gradients.
"""

from __future__ import annotations

import copy

import torch

from packtune.modeling import enable_varlen


def build(model_type: str, seed: int = 0, **config) -> torch.nn.Module:
    """A tiny fp32 causal LM of ``model_type`` with random (seeded) weights, in train mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **copy.deepcopy(config))
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).train()


def assert_close_scaled(name: str, mine: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """``mine`` equals ``ref`` within ``rtol`` of each element and of ``ref``'s largest magnitude."""
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(mine, ref, rtol=rtol, atol=rtol * max(scale, 1e-3), msg=lambda m: f"{name}: {m}")


def assert_packed_equals_alone(
    model: torch.nn.Module,
    lengths: list[list[int]],
    *,
    by_positions: bool = False,
    rtol: float = 1e-5,
    seed: int = 0,
) -> torch.Tensor:
    """Pack ``lengths`` (one list of document lengths per row, equal row totals), run the packed
    rows through ``model`` after ``enable_varlen`` and each document alone through a copy made
    before it; assert equal logits and parameter gradients. Boundaries travel as ``cu_seq_lens``
    (and restarting ``position_ids``), or as ``position_ids`` alone with ``by_positions``.
    Returns the packed logits."""
    reference = copy.deepcopy(model)
    enable_varlen(model)
    rows, length = len(lengths), sum(lengths[0])
    assert all(sum(row) == length for row in lengths), "rows must hold the same number of tokens"
    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=gen).to(device)
    weights = torch.randn(rows, length, vocab, generator=gen).to(device)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).to(device)
    flat = [n for row in lengths for n in row]
    cu = torch.tensor([0, *torch.tensor(flat).cumsum(0).tolist()], dtype=torch.int32, device=device)
    extra = {} if by_positions else dict(
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(flat), max_length_k=max(flat)
    )
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=pos, use_cache=False, **extra).logits
    (logits * weights).sum().backward()

    reference.zero_grad(set_to_none=True)
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            part = slice(start, start + n)
            alone = reference(input_ids=ids[r : r + 1, part], use_cache=False).logits
            where = f"logits of row {r} tokens {start}:{start + n}"
            assert_close_scaled(where, logits[r : r + 1, part].detach(), alone.detach(), rtol)
            (alone * weights[r : r + 1, part]).sum().backward()
            start += n
    mine = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        if param.grad is None:
            assert mine[name].grad is None or not mine[name].grad.any(), f"{name}: gradient only when packed"
            continue
        assert_close_scaled(f"gradient of {name}", mine[name].grad, param.grad, rtol)
    return logits
