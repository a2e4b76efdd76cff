"""Checkpoints that survive a kill: atomic writes, ``last_checkpoint``, rotation, RNG states.

Layout of a work dir::

    work_dirs/<config>/
        iter_100.pth          a file (one process, DDP), or a folder (FSDP2, DeepSpeed)
        iter_200.pth
        last_checkpoint       one line: the absolute path of the newest complete checkpoint

A checkpoint is written under a temporary name in the same folder and renamed into place
only when complete (``os.replace`` is atomic on POSIX); ``last_checkpoint`` is replaced the
same way afterwards. A kill at any moment leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from packtune.config.settings import Settings

LAST = "last_checkpoint"
#: The file a checkpoint folder's writer describes it in (engine, meta, state keys).
INFO = "packtune.json"


def fsync_dir(path: str) -> None:
    """Make a rename into ``path`` durable (fsync the folder; nothing where it cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, mode: str, write) -> None:
    """``write(f)`` into a temporary file, fsynced, then renamed to ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to ``path`` so that readers only ever see a complete file."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers only ever see the whole of it."""
    _atomic_write(path, "w", lambda f: f.write(text))


def checkpoint_path(work_dir: str, step: int) -> str:
    return os.path.join(os.path.abspath(work_dir), f"iter_{step}.pth")


def mark_last(work_dir: str, path: str) -> None:
    atomic_write_text(os.path.join(work_dir, LAST), os.path.abspath(path) + "\n")


def _pointed(work_dir: str) -> str | None:
    """The path ``last_checkpoint`` holds (existing or not), or ``None`` without a pointer."""
    pointer = os.path.join(work_dir, LAST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        return f.read().strip()


def find_last(work_dir: str) -> str | None:
    """The newest complete checkpoint of ``work_dir``, or ``None``."""
    path = _pointed(work_dir)
    if path is None:
        return None
    if not os.path.exists(path):
        pointer = os.path.join(work_dir, LAST)
        raise FileNotFoundError(f"{pointer} points to {path}, which does not exist")
    return path


def _step_of(path: str) -> int:
    m = re.search(r"iter_(\d+)\.pth$", path)
    return int(m.group(1)) if m else -1


def rotate(work_dir: str, keep: int) -> list[str]:
    """Delete all but ``keep`` checkpoints (``<= 0``: keep all) and stale temporaries;
    returns the deleted.

    The one ``last_checkpoint`` points to is always kept, with the ``keep - 1`` highest-step
    others: a fresh run in a work dir that still holds higher-step checkpoints of an earlier
    run must not delete the checkpoint it has just written.
    """
    found = sorted(glob.glob(os.path.join(work_dir, "iter_*.pth")), key=_step_of)
    doomed: list[str] = []
    if keep > 0:
        last = _pointed(work_dir)
        others = [p for p in found if os.path.abspath(p) != last]
        keep_others = keep - (len(found) - len(others))
        doomed = others[:-keep_others] if keep_others > 0 else others
    doomed += glob.glob(os.path.join(work_dir, "iter_*.pth.tmp*"))
    for path in doomed:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return doomed


def read_info(folder: str) -> dict:
    """The ``INFO`` file of a checkpoint folder (``{}`` when it has none)."""
    path = os.path.join(folder, INFO)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_meta(path: str) -> dict:
    """The run's ``meta`` (step, data position, geometry, settings) saved with a checkpoint,
    read without loading its tensors (``packtune.json`` of a folder; a file is memory-mapped)."""
    if os.path.isdir(path):
        return read_info(path).get("meta") or {}
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return state.get("meta") or {}


# --- what goes in ----------------------------------------------------------------------------


def needs_full_state(settings: Settings) -> bool:
    """A LoRA run on a downloaded base saves only what trains; a random-init base saves all."""
    return not settings.lora or settings.model_config is not None


def trainable_state(model: torch.nn.Module, full: bool = True) -> dict:
    """The model's state dict on CPU; only trainable tensors unless ``full``."""
    if full:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}


def load_trainable_state(model: torch.nn.Module, state: dict) -> None:
    """Load a (possibly partial, trainable-only) state dict; every saved key must be used."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint has tensors the model does not: {unexpected[:5]}")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lost = sorted(trainable & set(missing))
    if lost:
        raise ValueError(f"checkpoint lacks trainable tensors: {lost[:5]}")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(env) -> list[dict]:
    """Every rank's RNG state, on every rank (rank ``r`` restores entry ``r``)."""
    mine = rng_state()
    if env.world_size == 1 or not dist.is_initialized():
        return [mine]
    out = [None] * env.world_size
    dist.all_gather_object(out, mine)
    return out


def restore_rng_states(states: list[dict], env) -> None:
    if len(states) != env.world_size:
        # A different number of processes cannot replay the same dropout masks; the data
        # order and weights still resume exactly.
        set_rng_state(states[0])
        return
    set_rng_state(states[env.rank])
