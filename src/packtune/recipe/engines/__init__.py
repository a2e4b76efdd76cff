"""The engines: one process, DDP, FSDP2 and DeepSpeed, each a module of this package.

An engine decides how gradients are synchronised and weights updated, and also how its model
is built (``construction``: whole on every rank, or sharded as it is built), where the varlen
leak check runs on it (the ``Construction``'s ``check_in_build``, ``built`` and ``ready``), and
how its checkpoints are written (``save``/``load``) and read back in one process
(``read_folder``). ``Engine`` is what the recipe asks of one; ``ENGINES`` names them. Adding an
engine: a module holding its class, and a row in ``ENGINES``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from packtune.config.settings import Settings
from packtune.distributed import DistEnv
from packtune.recipe.checkpoint import INFO, read_info
from packtune.recipe.engines.construction import Construction
from packtune.recipe.engines.deepspeed import DeepSpeedEngine
from packtune.recipe.engines.fsdp import FSDPEngine
from packtune.recipe.engines.plain import DDPEngine, PlainEngine

__all__ = ["ENGINES", "Engine", "engine_kind", "model_construction", "read_sharded_model_state"]


class Engine(Protocol):
    """What the recipe asks of an engine (``base.BaseEngine`` implements the shared part).

    ``loss_scaling``: fp16 dynamic loss scaling is on, so a step with a non-finite gradient
    norm is an overflow the engine has already skipped.
    """

    name: str
    model: torch.nn.Module
    loss_scaling: bool

    @classmethod
    def construction(cls, settings: Settings, env: DistEnv, dtype: torch.dtype,
                     deepspeed: str | dict | None = None) -> AbstractContextManager[Construction]:
        """How the model is built and where its leak check runs, valid until the context exits."""

    @classmethod
    def create(cls, model: torch.nn.Module, env: DistEnv, settings: Settings, total_steps: int,
               compute_dtype: torch.dtype, construction: Construction, resume: str | None = None) -> Engine:
        """The engine for ``model`` (``resume``: the checkpoint the run will load)."""

    @staticmethod
    def read_folder(folder: str, info: dict) -> dict | None:
        """One plain CPU state dict from a checkpoint folder it writes (``None``: not one)."""

    def unwrapped(self) -> torch.nn.Module:
        """The model without engine wrappers (a PEFT model stays a PEFT model)."""

    def accumulate(self, last: bool) -> AbstractContextManager[Any]:
        """The context of one micro-batch's forward and backward (``last``: of the step)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float:
        """Clip, update, advance the schedule; returns the gradient norm before clipping."""

    def skip_step(self) -> None:
        """Drop this step's gradients (non-finite loss); the schedule still advances."""

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor: ...

    @property
    def lr(self) -> float: ...

    def save(self, path: str, meta: dict) -> None: ...

    def load(self, path: str) -> dict:
        """Load a checkpoint it wrote; returns the run's meta."""


#: Every engine by the name ``engine_kind`` gives it.
ENGINES: dict[str, type[Engine]] = {
    "single": PlainEngine,
    "ddp": DDPEngine,
    "fsdp": FSDPEngine,
    "deepspeed": DeepSpeedEngine,
}


def engine_kind(env: DistEnv, deepspeed: str | None, fsdp: bool) -> str:
    """The name in ``ENGINES`` of the engine for ``--deepspeed``, ``--fsdp`` and this world."""
    if deepspeed:
        return "deepspeed"
    if fsdp:
        return "fsdp"
    # Under a launcher a world of one is DDP too: the same engine and collectives as on N GPUs.
    return "ddp" if env.distributed else "single"


def model_construction(kind: str, settings: Settings, env: DistEnv, dtype: torch.dtype,
                       deepspeed: str | dict | None = None) -> AbstractContextManager[Construction]:
    """The ``Construction`` of engine ``kind``, valid until the context exits (for ZeRO-3:
    transformers' DeepSpeed integration is on)."""
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}: one of {', '.join(ENGINES)}")
    return ENGINES[kind].construction(settings, env, dtype, deepspeed)


def read_sharded_model_state(folder: str) -> dict:
    """One plain CPU state dict from a folder checkpoint (DeepSpeed ZeRO or FSDP2), with the keys
    of the unwrapped model's ``state_dict``, in one process, without a process group."""
    info = read_info(folder)
    for engine in ENGINES.values():
        state = engine.read_folder(folder, info)
        if state is not None:
            return state
    raise ValueError(f"{folder} is not a checkpoint packtune can read (no {INFO}, DeepSpeed 'latest' or DCP '.metadata')")
