"""Process groups for the launchers XTuner users know: none, torchrun (``pytorch``), slurm.

* ``NPROC_PER_NODE=N packtune train ...`` re-executes itself under ``torchrun`` with N
  processes per node (``NNODES``, ``NODE_RANK``, ``ADDR``, ``PORT`` honoured; a free port when
  ``PORT`` is unset on a single node).
* ``--launcher pytorch``: already started by torchrun; rank and world size from its variables.
* ``--launcher slurm``: started by ``srun``; rank, world size and the master address come
  from ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and ``SLURM_NODELIST``.

CUDA gets NCCL; the CPU gets gloo. ``cleanup`` destroys the process group so a finished run
exits 0 instead of aborting in a background thread at interpreter exit.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

LAUNCHERS = ("none", "pytorch", "slurm")


@dataclass
class DistEnv:
    """Where this process sits: rank, world size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(argv: list[str]) -> list[str] | None:
    """The torchrun command that relaunches ``packtune argv`` when ``NPROC_PER_NODE`` asks for it."""
    nproc = os.environ.get("NPROC_PER_NODE")
    if not nproc or "RANK" in os.environ:
        return None
    nnodes = os.environ.get("NNODES", "1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--nnodes={nnodes}",
        f"--node_rank={os.environ.get('NODE_RANK', '0')}",
        f"--master_addr={os.environ.get('ADDR', '127.0.0.1')}",
        f"--master_port={os.environ.get('PORT') or free_port()}",
        "-m",
        "packtune",
        *argv,
        "--launcher",
        "pytorch",
    ]
    return cmd


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if nodes and shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    if nodes and "[" not in nodes:
        return nodes.split(",")[0]
    return os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"{name} is not set: is this process started by the launcher you named?")
    return int(value)


def init_distributed(launcher: str = "none", timeout_s: float = 600.0) -> DistEnv:
    """Join (or skip) the process group for ``launcher`` and pick this process's device."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    cuda = torch.cuda.is_available()
    if launcher == "none":
        return DistEnv(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    if launcher == "slurm":
        os.environ["RANK"] = str(_env_int("SLURM_PROCID"))
        os.environ["WORLD_SIZE"] = str(_env_int("SLURM_NTASKS"))
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_ADDR", _slurm_master())
        os.environ.setdefault("MASTER_PORT", os.environ.get("PORT", "29500"))
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def cleanup() -> None:
    """Leave the process group cleanly (a barrier first, so no rank tears down a peer's op)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
