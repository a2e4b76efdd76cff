"""One process (``PlainEngine``) and PyTorch DDP (``DDPEngine``).

Both hold the whole model on every rank, built and leak-checked by ``build_model``
(``BaseEngine.construction``), and write a checkpoint as one file from the main rank.
"""

from __future__ import annotations

import contextlib
import os

import torch

from packtune.config.settings import Settings
from packtune.distributed import DistEnv
from packtune.recipe import checkpoint as ckpt
from packtune.recipe.engines.base import BaseEngine, build_optimizer, grad_scaler, lr_lambda, not_my_checkpoint


class PlainEngine(BaseEngine):
    """One process: AdamW, warmup + cosine, clipping, fp16 loss scaling on CUDA."""

    name = "single"

    def __init__(self, model, env: DistEnv, settings: Settings, total_steps: int, compute_dtype: torch.dtype):
        self.env = env
        self.model = model
        self.settings = settings
        self.max_norm = float(settings.max_norm)
        self.optimizer = build_optimizer(self.unwrapped(), settings.lr, settings.betas, settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(total_steps, settings.warmup_ratio))
        self.scaler = grad_scaler(compute_dtype, env.device)

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
        return self.clip_and_update(self.max_norm)

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

    def __init__(self, model, env: DistEnv, settings: Settings, total_steps: int, compute_dtype: torch.dtype):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        wrapped = DDP(model, device_ids=ids)
        super().__init__(wrapped, env, settings, total_steps, compute_dtype)

    def unwrapped(self) -> torch.nn.Module:
        return self.model.module

    def accumulate(self, last: bool):
        return contextlib.nullcontext() if last else self.model.no_sync()
