"""How gradients are synchronised and parameters updated: one small class per engine.

Every engine offers the same few operations the recipe uses: ``model`` (call forward on it),
``accumulate(last)``, ``backward(loss)``, ``step()`` (clip, update, schedule; returns the
gradient norm), ``all_reduce_sum``, ``lr``, ``save(path)``/``load(path)`` and
``unwrapped()``, and ``loss_scaling`` (fp16 dynamic loss scaling: a step with a non-finite
gradient norm is an overflow the engine has already skipped). ``PlainEngine`` is one
process; ``DDPEngine`` adds PyTorch DDP. FSDP2 and DeepSpeed live in ``engine_fsdp.py`` and
``engine_deepspeed.py``.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.distributed as dist

from packtune.distributed import DistEnv
from packtune.recipe import checkpoint as ckpt


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
            (decay if p.ndim >= 2 else no_decay).append(p)
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
    from packtune.recipe import sharded

    writer = "one process or DDP (a file)"
    if os.path.isdir(path):
        writer = sharded.read_info(path).get("engine") or "an unknown engine (a folder)"
    return CheckpointMismatch(
        f"{path} was written by {writer}, and this run uses {engine}: resume with the engine "
        "and number of processes that wrote it, or convert it (packtune convert pth_to_hf) and start from that"
    )


class CheckpointMismatch(ValueError):
    """A checkpoint cannot be resumed by this engine."""


class PlainEngine(Engine):
    """One process: AdamW, warmup + cosine, clipping, fp16 loss scaling on CUDA."""

    name = "single"

    def __init__(self, model, env: DistEnv, settings, total_steps: int, compute_dtype: torch.dtype):
        self.env = env
        self.model = model
        self.settings = settings
        self.max_norm = float(settings.max_norm)
        self.optimizer = build_optimizer(self.unwrapped(), settings.lr, settings.betas, settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(total_steps, settings.warmup_ratio))
        use_scaler = compute_dtype == torch.float16 and env.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    @property
    def loss_scaling(self) -> bool:
        return self.scaler is not None

    def accumulate(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> float:
        """Clip, update, advance the schedule, clear gradients; returns the pre-clip norm.

        With a non-finite norm the weights are left unchanged (fp16 loss scaling handles its
        own overflow steps)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = clip_gradients(self.trainable(), self.max_norm)
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

    # --- checkpoints ----------------------------------------------------------------------

    def model_state(self) -> dict:
        return ckpt.trainable_state(self.unwrapped(), full=ckpt.needs_full_state(self.settings))

    def save(self, path: str, meta: dict) -> None:
        rng = ckpt.gather_rng_states(self.env)
        if self.env.is_main:
            state = {
                "model": self.model_state(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": rng,
                "meta": meta,
            }
            ckpt.atomic_torch_save(state, path)
        self.barrier()

    def load(self, path: str) -> dict:
        if os.path.isdir(path):
            raise not_my_checkpoint(path, f"{self.name} ({self.world_size} process{'es' if self.world_size > 1 else ''})")
        state = torch.load(path, map_location="cpu", weights_only=False)
        ckpt.load_trainable_state(self.unwrapped(), state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_states(state["rng"], self.env)
        return state["meta"]


class DDPEngine(PlainEngine):
    """PyTorch DistributedDataParallel; gradients averaged across ranks on the last micro-batch."""

    name = "ddp"

    def __init__(self, model, env: DistEnv, settings, total_steps: int, compute_dtype: torch.dtype):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        wrapped = DDP(model, device_ids=ids)
        super().__init__(wrapped, env, settings, total_steps, compute_dtype)

    def unwrapped(self) -> torch.nn.Module:
        return self.model.module

    def accumulate(self, last: bool):
        return contextlib.nullcontext() if last else self.model.no_sync()


def make_engine(kind: str, model, env: DistEnv, settings, total_steps: int, compute_dtype: torch.dtype, deepspeed_config=None):
    """The engine for ``kind``: ``"single"``, ``"ddp"``, ``"fsdp"`` or ``"deepspeed"``."""
    if kind == "single":
        return PlainEngine(model, env, settings, total_steps, compute_dtype)
    if kind == "ddp":
        return DDPEngine(model, env, settings, total_steps, compute_dtype)
    if kind == "fsdp":
        from packtune.recipe.engine_fsdp import FSDPEngine

        return FSDPEngine(model, env, settings, total_steps, compute_dtype)
    if kind == "deepspeed":
        from packtune.recipe.engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, env, settings, total_steps, compute_dtype, deepspeed_config)
    raise ValueError(f"unknown engine {kind!r}")


def engine_kind(env: DistEnv, deepspeed: str | None, fsdp: bool) -> str:
    if deepspeed:
        return "deepspeed"
    if fsdp:
        return "fsdp"
    return "ddp" if env.world_size > 1 else "single"
