"""Checkpoint folders written by several ranks (DeepSpeed, FSDP2): writing them whole or not at all.

A folder checkpoint ``iter_<step>.pth/`` holds the engine's own files and ``packtune.json``
(which engine wrote it, the ZeRO stage, whether the whole model or only its trainable
tensors were saved, the state-dict key names of the unwrapped model, the run's meta)::

    iter_200.pth/                      DeepSpeed                 iter_200.pth/        FSDP2
        packtune.json                                                packtune.json
        latest, zero_to_fp32.py                                      model/  (DCP shards)
        state/mp_rank_00_model_states.pt                             optim/  (DCP shards)
        state/*zero_pp_rank_*_optim_states.pt                        extra.pt (schedule, RNG, meta)
        state_universal/   (made when another number of ranks resumes it: ``deepspeed_universal``)

Every rank writes into ``iter_<step>.pth.tmp``; when all are done the main rank renames it
into place (``atomic_folder``), so a kill leaves either the complete folder or none.

Each engine that writes folders reads its own back (``read_folder`` in
``packtune.recipe.engines.fsdp`` and ``.deepspeed``); ``packtune.recipe.engines.read_model_state``
asks each in turn and returns one plain state dict with the keys of ``model.state_dict()`` of the
unwrapped model (``select_state``: only the trainable tensors for a LoRA run on a downloaded
base, as the one-process engine saves them), on CPU, in one process, without a process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import torch
import torch.distributed as dist

from packtune.recipe.checkpoint import INFO, fsync_dir


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def atomic_folder(path: str, env):
    """Yield a temporary folder every rank writes into; renamed to ``path`` when all are done."""
    tmp = f"{path}.tmp"
    if env.is_main and os.path.exists(tmp):
        shutil.rmtree(tmp)
    _barrier()
    if env.is_main:
        os.makedirs(tmp)
    _barrier()
    yield tmp
    _barrier()
    if env.is_main:
        old = None
        if os.path.exists(path):  # the same step saved again: swap, then drop the old one
            old = f"{path}.tmp-old"
            if os.path.exists(old):
                shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        if old:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    _barrier()


def write_info(folder: str, **info) -> None:
    """Write ``INFO`` (which engine wrote the folder, its state keys, the run's meta) durably."""
    with open(os.path.join(folder, INFO), "w") as f:
        json.dump(info, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def select_state(state: dict, info: dict) -> dict:
    """Keep the keys the unwrapped model's ``state_dict`` has (and only the trainable ones
    when the run saved only those)."""
    keys = info.get("state_keys")
    if keys:
        state = {k: state[k] for k in keys if k in state}
    if info.get("full_state") is False and info.get("trainable"):
        names = set(info["trainable"])
        state = {k: v for k, v in state.items() if k in names}
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}
