"""What every engine shares: the optimizer, the schedule, clipping, and the ``Engine`` base class.

Every engine offers the same few operations the recipe uses: ``model`` (call forward on it),
``accumulate(last)``, ``backward(loss)``, ``step()`` (clip, update, schedule; returns the
gradient norm), ``all_reduce_sum``, ``lr``, ``save(path)``/``load(path)`` and
``unwrapped()``, and ``loss_scaling`` (fp16 dynamic loss scaling: a step with a non-finite
gradient norm is an overflow the engine has already skipped). The engines themselves live in
``engine_plain.py`` (one process, DDP), ``engine_fsdp.py`` and ``engine_deepspeed.py``;
``engines.make_engine`` picks one. Modules import downward only: base <- engines <- make_engine.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from packtune.recipe import sharded


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warmup over ``ceil(warmup_ratio * total)`` steps, then cosine decay to 0.

    >>> f = lr_lambda(10, 0.2)
    >>> [round(f(s), 3) for s in (0, 1, 2, 6, 9)]
    [0.5, 1.0, 1.0, 0.5, 0.038]
    """
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, lr: float, betas, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # A parameter partitioned by ZeRO-3's zero.Init is a flat stub: its shape is ds_shape.
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas))


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip to ``max_norm`` (``<= 0``: no clipping); returns the norm before clipping.

    The norm is summed in float64: in float32 the norm of a 4M-element gradient (a small
    model's output layer) is off by ~2e-4 relative, enough to make two engines that compute
    the same gradient report (and clip by) different norms.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float64) for g in grads])
    total = torch.linalg.vector_norm(norms)
    if max_norm > 0 and torch.isfinite(total):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.to(grads[0].dtype))
    return float(total)


class Engine:
    """What every engine shares. Subclasses set ``env``, ``model``, ``optimizer`` and
    ``scheduler`` and implement ``accumulate``, ``backward``, ``step``, ``save`` and ``load``."""

    name = "base"
    #: Whether a non-finite gradient norm can be a loss-scale overflow (fp16), which the
    #: engine skips on its own, rather than a real divergence.
    loss_scaling = False

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def unwrapped(self) -> torch.nn.Module:
        """The model without engine wrappers (a PEFT model stays a PEFT model)."""
        return self.model

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unwrapped().parameters() if p.requires_grad]

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over every rank (itself on one process)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def skip_step(self) -> None:
        """Drop this step's gradients (non-finite loss); the schedule still advances."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def not_my_checkpoint(path: str, engine: str) -> CheckpointMismatch:
    """The error for resuming ``engine`` from a checkpoint written by another engine."""
    writer = "one process or DDP (a file)"
    if os.path.isdir(path):
        writer = sharded.read_info(path).get("engine") or "an unknown engine (a folder)"
    return CheckpointMismatch(
        f"{path} was written by {writer}, and this run uses {engine}: resume with the engine "
        "that wrote it (on any number of processes), or convert it (packtune convert pth_to_hf) and start from that"
    )


class CheckpointMismatch(ValueError):
    """A checkpoint cannot be resumed by this engine."""
