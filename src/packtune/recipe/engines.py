"""``make_engine``: the engine for a run (one process, DDP, FSDP2 or DeepSpeed)."""

from __future__ import annotations

import torch

from packtune.config.settings import Settings
from packtune.distributed import DistEnv
from packtune.recipe.engine_plain import DDPEngine, PlainEngine


def make_engine(kind: str, model, env: DistEnv, settings: Settings, total_steps: int, compute_dtype: torch.dtype, deepspeed_config=None,
                *, resume: str | None = None, weights=None):
    """The engine for ``kind``: ``"single"``, ``"ddp"``, ``"fsdp"`` or ``"deepspeed"``.

    ``resume``: the checkpoint the run will load, for engines that must know before they are
    built (DeepSpeed loads a checkpoint of another world size through its universal form).
    ``weights``: for FSDP2 on a model built from placeholders, what fills its shards
    (``sharded_init.StreamedWeights``).
    """
    if kind == "single":
        return PlainEngine(model, env, settings, total_steps, compute_dtype)
    if kind == "ddp":
        return DDPEngine(model, env, settings, total_steps, compute_dtype)
    if kind == "fsdp":
        from packtune.recipe.engine_fsdp import FSDPEngine

        return FSDPEngine(model, env, settings, total_steps, compute_dtype, weights=weights)
    if kind == "deepspeed":
        from packtune.recipe.engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, env, settings, total_steps, compute_dtype, deepspeed_config, resume=resume)
    raise ValueError(f"unknown engine {kind!r}")


def engine_kind(env: DistEnv, deepspeed: str | None, fsdp: bool) -> str:
    if deepspeed:
        return "deepspeed"
    if fsdp:
        return "fsdp"
    # Under a launcher a world of one is DDP too: the same engine and collectives as on N GPUs.
    return "ddp" if env.distributed else "single"
