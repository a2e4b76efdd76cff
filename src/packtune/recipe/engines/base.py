"""What every engine shares: the optimizer, the schedule, clipping, and the ``BaseEngine`` class.

The operations the recipe uses are the ``Engine`` protocol (``packtune.recipe.engines``); the
engines themselves live in ``plain.py`` (one process, DDP), ``fsdp.py`` and ``deepspeed.py``,
and ``ENGINES`` names them. Modules import downward only: base <- each engine <- ``ENGINES``.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from packtune.config.settings import Settings
from packtune.distributed import DistEnv
from packtune.recipe.checkpoint import read_info
from packtune.recipe.engines.construction import Construction, whole_model


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


#: Elements per chunk of a gradient whose norm is taken in fp32 (the chunks' squares are then
#: summed in fp64). On the CPU, fp32 sums drift with their length (a 4M-element norm in one
#: piece is off by ~7e-5 relative, in 64k-element chunks by ~1e-7); CUDA reduces in a tree.
NORM_CHUNK = {"cuda": 1 << 22}
NORM_CHUNK_DEFAULT = 1 << 16


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``sum(g ** 2)`` over every element of ``grads``, as an fp64 scalar on ``device``.

    Each gradient is cut into chunks whose norms are computed in fp32 without a copy
    (``_foreach_norm`` accumulates half gradients in fp32), so no fp64 (or fp32) copy of a
    whole gradient is ever made: the transient memory is a few scalars per chunk.
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        chunk = NORM_CHUNK.get(g.device.type, NORM_CHUNK_DEFAULT)
        by_device.setdefault(g.device, []).extend(g.detach().reshape(-1).split(chunk))
    for pieces in by_device.values():
        norms = torch._foreach_norm(pieces, 2, dtype=torch.float32)
        total += torch.stack(norms).double().square().sum().to(device)
    return total


def grad_norm(grads: list[torch.Tensor], device: torch.device | None = None) -> float:
    """The 2-norm of all ``grads`` together (``device``: where to sum; default the first's).

    DTensor gradients (FSDP2) contribute their local shards, and the sum of squares is
    all-reduced over their mesh, so every rank returns the global norm, computed the same way
    as one process computes it over whole gradients.
    """
    from torch.distributed.tensor import DTensor

    local, meshes = [], {}
    for g in grads:
        if isinstance(g, DTensor):
            if not all(p.is_shard() for p in g.placements):
                raise NotImplementedError(f"gradient norm of a DTensor placed {g.placements}: only sharded gradients are summed")
            meshes[id(g.device_mesh)] = g.device_mesh
            g = g.to_local()
        local.append(g)
    if device is None:
        device = local[0].device if local else torch.device("cpu")
    total = _sum_of_squares(local, device)
    if len(meshes) > 1:
        raise NotImplementedError("gradients sharded over several device meshes")
    for mesh in meshes.values():
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=mesh.get_group())
    return float(total.sqrt())


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, device: torch.device | None = None) -> float:
    """Clip to ``max_norm`` (``<= 0``: no clipping); returns the norm before clipping.

    The norm (``grad_norm``) sums per-chunk fp32 norms in fp64: in fp32 alone the norm of a
    4M-element gradient (a small model's output layer) is off by ~1e-4 relative, enough to make
    two engines that compute the same gradient report (and clip by) different norms; a whole
    fp64 copy of every gradient would cost gigabytes on a large model. The scale is
    ``max_norm / (norm + 1e-6)`` when below 1, as in ``torch.nn.utils.clip_grad_norm_``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = grad_norm(grads, device)
    coef = max_norm / (norm + 1e-6)
    if max_norm > 0 and math.isfinite(norm) and coef < 1.0:
        torch._foreach_mul_(grads, coef)
    return norm


def grad_scaler(compute_dtype: torch.dtype, device: torch.device):
    """A dynamic loss scaler for fp16 on CUDA (fp16 gradients underflow without one), else None.

    It also works on FSDP2's DTensor gradients: the overflow check is reduced over the shards.
    """
    if compute_dtype == torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


class BaseEngine:
    """What every engine shares. Subclasses set ``env``, ``model``, ``optimizer`` and
    ``scheduler`` and implement ``accumulate``, ``backward``, ``step``, ``save`` and ``load``;
    an engine that builds its model otherwise than whole on every rank, or writes checkpoint
    folders, overrides ``construction``, ``create`` and ``read_folder``."""

    name = "base"

    @classmethod
    def construction(cls, settings: Settings, env: DistEnv, dtype: torch.dtype, deepspeed: str | dict | None = None):
        """How the model is built and where its leak check runs: the whole model on every rank."""
        return whole_model(settings, env, dtype, deepspeed)

    @classmethod
    def create(cls, model: torch.nn.Module, env: DistEnv, settings: Settings, total_steps: int,
               compute_dtype: torch.dtype, construction: Construction, resume: str | None = None) -> BaseEngine:
        """The engine for ``model``, built as ``construction`` says."""
        return cls(model, env, settings, total_steps, compute_dtype)

    @staticmethod
    def read_folder(folder: str, info: dict) -> dict | None:
        """The model state of a checkpoint folder this engine writes (``None``: none it writes)."""
        return None
    #: Whether a non-finite gradient norm can be a loss-scale overflow (fp16), which the
    #: engine skips on its own, rather than a real divergence.
    loss_scaling = False
    #: The fp16 loss scaler of engines that update through ``clip_and_update`` (or None).
    scaler = None

    def clip_and_update(self, max_norm: float, device: torch.device | None = None) -> float:
        """Unscale (fp16), clip, update, advance the schedule, clear; returns the pre-clip norm.

        With a non-finite norm the weights are left unchanged: without a scaler the step is
        skipped here; with one, the scaler skips it and lowers the scale (an fp16 overflow)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = clip_gradients(self.trainable(), max_norm, device)
        if not self.scaler and not math.isfinite(norm):
            # NaN/inf gradients would poison the weights: leave them as they are.
            self.skip_step()
            return norm
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

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
        writer = read_info(path).get("engine") or "an unknown engine (a folder)"
    return CheckpointMismatch(
        f"{path} was written by {writer}, and this run uses {engine}: resume with the engine "
        "that wrote it (on any number of processes), or convert it (packtune convert pth_to_hf) and start from that"
    )


class CheckpointMismatch(ValueError):
    """A checkpoint cannot be resumed by this engine."""
