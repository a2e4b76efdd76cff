"""Which models sequence parallelism can split, and the one-line refusal for the others.

Ulysses gives attention the whole row; every other layer sees only this rank's shard. That is
exact only when attention is the one place where tokens meet. A layer that mixes tokens on
its own (linear attention, state-space and recurrent layers, token convolutions) would see a
shard as if it were the whole row, so such models are refused, found generically:

* the config's ``layer_types`` / ``layers_block_type`` name a kind of layer that is not
  attention (``"linear_attention"``, ``"conv"``, ``"mamba"``, ``"recurrent"``, ...);
* the model holds a convolution module (``nn.Conv1d``/``2d``/``3d``), which state-space,
  linear-attention and short-convolution layers use to mix neighbouring tokens.

The query heads must also divide evenly over the group (each rank attends with its share).
"""

from __future__ import annotations

import torch

from packtune.attention.hf import text_config
from packtune.parallel.groups import SequenceParallelError
from packtune.config.sizes import heads_problem

#: Substrings of a layer kind that mixes tokens outside attention.
TOKEN_MIXING_KINDS = ("linear", "conv", "mamba", "recurrent", "ssm", "rwkv", "delta", "hybrid")
_CONVOLUTIONS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _text_config(model: torch.nn.Module):
    return text_config(model) if getattr(model, "config", None) is not None else None


def token_mixing_outside_attention(model: torch.nn.Module) -> str | None:
    """What in ``model`` mixes tokens outside attention (for the refusal), or ``None``."""
    cfg = _text_config(model)
    for key in ("layer_types", "layers_block_type"):
        kinds = getattr(cfg, key, None) if cfg is not None else None
        if isinstance(kinds, (list, tuple)):
            mixing = sorted({str(k) for k in kinds if any(word in str(k).lower() for word in TOKEN_MIXING_KINDS)})
            if mixing:
                return f"its config's {key} has {', '.join(repr(k) for k in mixing)} layers"
    for name, module in model.named_modules():
        if isinstance(module, _CONVOLUTIONS):
            return f"its layer {name} is a {type(module).__name__}"
    return None


def check_splittable(model: torch.nn.Module, size: int, world: int | None = None) -> None:
    """Raise ``SequenceParallelError`` (one line) if ``size`` ranks cannot split ``model``."""
    if size == 1:
        return
    name = type(model).__name__
    what = token_mixing_outside_attention(model)
    if what:
        raise SequenceParallelError(
            f"sequence_parallel_size = {size} cannot split {name}: it mixes tokens outside attention ({what}), "
            "where a rank sees only its shard of a row; set sequence_parallel_size = 1"
        )
    cfg = _text_config(model)
    heads = getattr(cfg, "num_attention_heads", None) if cfg is not None else None
    problem = heads_problem(size, heads, world) if isinstance(heads, int) else None
    if problem:
        raise SequenceParallelError(f"{name}: {problem}")
