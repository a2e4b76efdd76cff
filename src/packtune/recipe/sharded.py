"""Checkpoint folders written by several ranks (DeepSpeed, FSDP2), and reading them back.

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

``read_sharded_model_state(folder)`` consolidates either form into one plain state dict with
the keys of ``model.state_dict()`` of the unwrapped model (only the trainable tensors for a
LoRA run on a downloaded base, as the one-process engine saves them), on CPU, in one process,
without a process group: ZeRO shards through DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``,
FSDP2 shards through ``torch.distributed.checkpoint``. It also reads DeepSpeed folders that
packtune did not write (a ``global_step*`` tag folder or its parent with ``latest``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from packtune.distributed import on_main_rank
from packtune.recipe.checkpoint import INFO, fsync_dir, read_info

INSTALL_HINT = "--deepspeed needs DeepSpeed, which is not installed: pip install 'packtune[deepspeed]' (or pip install deepspeed)"

DEEPSPEED_TAG = "state"
#: DeepSpeed's universal form of ``state`` (made on a resume with another number of processes).
UNIVERSAL_TAG = "state_universal"
FSDP_MODEL = "model"
FSDP_OPTIM = "optim"
FSDP_EXTRA = "extra.pt"


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
    with open(os.path.join(folder, INFO), "w") as f:
        json.dump(info, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def _select(state: dict, info: dict) -> dict:
    """Keep the keys the unwrapped model's ``state_dict`` has (and only the trainable ones
    when the run saved only those)."""
    keys = info.get("state_keys")
    if keys:
        state = {k: state[k] for k in keys if k in state}
    if info.get("full_state") is False and info.get("trainable"):
        names = set(info["trainable"])
        state = {k: v for k, v in state.items() if k in names}
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}


# --- DeepSpeed ---------------------------------------------------------------------------------


def _deepspeed_location(folder: str) -> tuple[str, str] | None:
    """``(checkpoint_dir, tag)`` if ``folder`` is a DeepSpeed checkpoint (or one of its tags)."""
    if os.path.isfile(os.path.join(folder, "latest")):
        with open(os.path.join(folder, "latest")) as f:
            return folder, f.read().strip()
    if any(name.endswith("model_states.pt") for name in os.listdir(folder)):
        return os.path.dirname(os.path.abspath(folder)), os.path.basename(os.path.abspath(folder))
    return None


def deepspeed_world_size(folder: str) -> int | None:
    """The number of data-parallel ranks that wrote the ZeRO checkpoint in ``folder`` (one
    optimizer partition each), or ``None`` when it holds no partitioned optimizer state."""
    location = _deepspeed_location(folder) if os.path.isdir(folder) else None
    if location is None:
        return None
    tag_dir = os.path.join(*location)
    if not os.path.isdir(tag_dir):
        return None
    ranks = {m.group(1) for n in os.listdir(tag_dir) if (m := re.match(r".*zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$", n))}
    return len(ranks) or None


def deepspeed_universal(folder: str, env) -> str:
    """The tag of the universal form of the ZeRO checkpoint in ``folder``, made once.

    DeepSpeed's ZeRO checkpoints hold each rank's partition of the flat optimizer state, so they
    load only on the number of ranks that wrote them. DeepSpeed's own ``ds_to_universal``
    rewrites them per parameter (``state_universal/zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``),
    which any number of ranks loads (``"checkpoint": {"load_universal": true}``). The main rank
    converts into a temporary folder renamed when complete (a kill leaves no half conversion);
    the others wait, and a failed conversion stops every rank with the same error.
    """
    target = os.path.join(folder, UNIVERSAL_TAG)

    def convert() -> None:
        if os.path.isdir(target):
            return
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        location = _deepspeed_location(folder)
        if location is None:
            raise FileNotFoundError(f"{folder}: a DeepSpeed checkpoint without its 'latest' file")
        tmp = f"{target}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=os.path.join(*location), output_folder=tmp, num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        # One worker: a pool forked from a rank with live process-group threads is not safe.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # DeepSpeed narrates every step
            ds_to_universal(args)
        # It points `latest_universal` at the temporary name; the tag is passed explicitly instead.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, "latest_universal"))
        os.replace(tmp, target)
        fsync_dir(folder)

    on_main_rank(env, convert)
    return UNIVERSAL_TAG


def _read_deepspeed(directory: str, tag: str, info: dict) -> dict:
    tag_dir = os.path.join(directory, tag)
    optim_files = [n for n in os.listdir(tag_dir) if n.endswith("optim_states.pt")]
    stage = info.get("zero_stage")
    if stage is None:
        stage = 1 if optim_files and any("zero_pp_rank" in n for n in optim_files) else 0
    if stage == 0:
        model_file = next(n for n in sorted(os.listdir(tag_dir)) if n.endswith("model_states.pt"))
        state = torch.load(os.path.join(tag_dir, model_file), map_location="cpu", weights_only=False)
        return state["module"]
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as exc:
        raise ImportError(f"reading the ZeRO checkpoint {directory} needs DeepSpeed: " + INSTALL_HINT.split(": ", 1)[1]) from exc
    exclude_frozen = info.get("full_state") is False
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed narrates every file it reads
        return get_fp32_state_dict_from_zero_checkpoint(directory, tag=tag, exclude_frozen_parameters=exclude_frozen)


# --- FSDP2 (torch.distributed.checkpoint) --------------------------------------------------------


def read_dcp(folder: str) -> dict:
    """Every tensor of a ``torch.distributed.checkpoint`` folder, in one process, as a flat dict."""
    import warnings

    try:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            return _load_state_dict_from_keys(checkpoint_id=folder)
    except ImportError:  # an older or newer torch without the helper: go through a torch.save file
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "state.pt")
            dcp_to_torch_save(folder, out)
            return torch.load(out, map_location="cpu", weights_only=False)


def read_sharded_model_state(folder: str) -> dict:
    """One plain CPU state dict from a folder checkpoint (DeepSpeed ZeRO or FSDP2)."""
    info = read_info(folder)
    engine = info.get("engine")
    if engine == "fsdp" or (engine is None and os.path.isfile(os.path.join(folder, FSDP_MODEL, ".metadata"))):
        return _select(read_dcp(os.path.join(folder, FSDP_MODEL)), info)
    if engine is None and os.path.isfile(os.path.join(folder, ".metadata")):
        return _select(read_dcp(folder), info)  # a bare DCP folder of a model state dict
    location = _deepspeed_location(folder)
    if engine == "deepspeed" or location:
        if location is None:
            raise FileNotFoundError(f"{folder}: a DeepSpeed checkpoint without its 'latest' file")
        return _select(_read_deepspeed(*location, info), info)
    raise ValueError(f"{folder} is not a checkpoint packtune can read (no {INFO}, DeepSpeed 'latest' or DCP '.metadata')")
