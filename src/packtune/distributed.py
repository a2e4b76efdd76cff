"""Process groups for the launchers XTuner users know: none, torchrun (``pytorch``), slurm.

* ``NPROC_PER_NODE=N packtune train ...`` runs itself under torchrun with N processes per
  node (``NNODES``, ``NODE_RANK``, ``ADDR``, ``PORT`` honoured; a free port when ``PORT`` is
  unset on a single node). torchrun's elastic agent runs in the launching process
  (``run_under_torchrun``), so the launcher ends like any packtune command: a failing rank's
  one-line error last, exit code 2 for a configuration, data or setup error and 1 for anything
  else, without torchrun's ``ChildFailedError`` traceback. Each rank reports its error through
  torchelastic's error file (``TORCHELASTIC_ERROR_FILE``, written by ``packtune.cli.main``).
* ``--launcher pytorch``: already started by torchrun; rank and world size from its variables.
* ``--launcher slurm``: started by ``srun``; rank, world size and the master address come
  from ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and ``SLURM_NODELIST``.

CUDA gets NCCL; the CPU gets gloo. ``cleanup`` destroys the process group so a finished run
exits 0 instead of aborting in a background thread at interpreter exit.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
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


def torchrun_args(argv: list[str]) -> list[str] | None:
    """torchrun's arguments for running ``packtune argv`` when ``NPROC_PER_NODE`` asks for it
    (``None`` without it, or when this process is already a worker)."""
    nproc = os.environ.get("NPROC_PER_NODE")
    if not nproc or "RANK" in os.environ:
        return None
    nnodes = os.environ.get("NNODES", "1")
    return [
        f"--nproc_per_node={nproc}",
        f"--nnodes={nnodes}",
        f"--node_rank={os.environ.get('NODE_RANK', '0')}",
        f"--master_addr={os.environ.get('ADDR', '127.0.0.1')}",
        f"--master_port={_master_port(nnodes)}",
        "-m",
        "packtune",
        *argv,
        "--launcher",
        "pytorch",
    ]


#: Where torchrun tells each worker to write its error (torchelastic's error-file protocol).
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
#: The key under which packtune's own record sits in that file, next to torchelastic's fields.
ERROR_RECORD = "packtune"


def run_under_torchrun(argv: list[str], prog: str) -> int:
    """Run ``packtune argv`` on ``NPROC_PER_NODE`` processes; returns the exit code to end with.

    torchrun's agent runs in this process (``torch.distributed.run.run``). When a rank fails,
    the agent stops the others and raises ``ChildFailedError``; instead of its traceback this
    prints the first failing rank's error as one line, last, and returns 2 when that rank ended
    with a configuration, data or setup error (its own exit code 2), else 1.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_args(argv)))
    except ChildFailedError as exc:
        code, line = failure_summary(exc.failures, prog)
    except (KeyboardInterrupt, SignalException) as exc:
        code, line = 130, f"{prog}: interrupted ({exc})" if str(exc) else f"{prog}: interrupted"
    else:
        return 0
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    print(line, file=sys.stderr, flush=True)
    return code


def failure_summary(failures: dict, prog: str) -> tuple[int, str]:
    """``(exit code, one line)`` for the failed ranks of a torchrun job.

    ``failures`` maps a global rank to torchelastic's ``ProcessFailure``. The rank whose error
    happened first wins: a rank that fails on its own usually takes its peers down with it (they
    see a broken connection a moment later), so the earliest error is the cause.
    """
    reported = []
    for rank, failure in failures.items():
        data = getattr(failure, "error_file_data", None)
        record = data.get(ERROR_RECORD) if isinstance(data, dict) else None
        if isinstance(record, dict):
            reported.append((float(record.get("time", 0.0)), rank, record))
    if reported:
        _, rank, record = min(reported, key=lambda r: (r[0], r[1]))
        if record.get("exit_code") == 2:
            return 2, record["line"]
        world = record.get("world_size")
        where = f"rank {rank} of {world}" if world else f"rank {rank}"
        return 1, f"{prog}: error: {where} failed: {record['error']}"
    rank = min(failures, key=lambda r: (failures[r].timestamp, r))
    failure = failures[rank]
    if failure.signal_name() != "<N/A>":
        return 1, f"{prog}: error: rank {rank} was killed by {failure.signal_name()} (out of memory?)"
    return 1, f"{prog}: error: rank {rank} exited with code {failure.exitcode} without an error message (its output above says why)"


def record_failure(line: str, error: str, exit_code: int, environ=None) -> None:
    """Write this worker's error where torchrun's agent reads it (``TORCHELASTIC_ERROR_FILE``).

    ``line`` is the one line the command printed, ``error`` the message without the command's
    prefix. The file follows torchelastic's format (``message`` and ``timestamp``) so any
    torchrun reports it, with packtune's record beside it for ``failure_summary``. Without a
    torchrun parent this does nothing.
    """
    environ = os.environ if environ is None else environ
    path = environ.get(ERROR_FILE_ENV)
    if not path:
        return
    record = {
        "line": line,
        "error": error,
        "exit_code": exit_code,
        "rank": int(environ.get("RANK", "0")),
        "world_size": int(environ.get("WORLD_SIZE", "1")),
        "time": time.time(),
    }
    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(record["time"]), ERROR_RECORD: record}, f)
    except OSError:
        pass  # the error is on the console already; the launcher falls back to the exit code


def _master_port(nnodes: str) -> str:
    """``PORT``, or a free port on one node; several nodes must agree, so 29500 there."""
    if os.environ.get("PORT"):
        return os.environ["PORT"]
    return str(free_port()) if str(nnodes) == "1" else "29500"


def first_host(nodelist: str) -> str:
    """The first host of a slurm node list, without ``scontrol``.

    >>> first_host("gpu[007-010,012],cpu3")
    'gpu007'
    >>> first_host("node1,node2")
    'node1'
    """
    nodelist = nodelist.strip()
    first_comma, first_bracket = nodelist.find(","), nodelist.find("[")
    if first_bracket < 0 or 0 <= first_comma < first_bracket:
        return nodelist.split(",")[0]  # the first entry is a plain host name
    prefix, ranges = nodelist[:first_bracket], nodelist[first_bracket + 1 :]
    return prefix + ranges.split("]")[0].split(",")[0].split("-")[0]


def _slurm_master(environ=None) -> str:
    environ = os.environ if environ is None else environ
    nodes = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if nodes and shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    if nodes:
        return first_host(nodes)
    return environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def _env_int(name: str, environ=None) -> int:
    environ = os.environ if environ is None else environ
    value = environ.get(name)
    if value is None:
        raise RuntimeError(f"{name} is not set: is this process started by the launcher you named?")
    return int(value)


def slurm_env(environ=None) -> dict[str, str]:
    """The torch.distributed variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) of a task started by ``srun``, from its ``SLURM_*``
    variables; an explicit ``MASTER_ADDR``/``MASTER_PORT`` (or ``ADDR``/``PORT``) wins."""
    environ = os.environ if environ is None else environ
    return {
        "RANK": str(_env_int("SLURM_PROCID", environ)),
        "WORLD_SIZE": str(_env_int("SLURM_NTASKS", environ)),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or environ.get("ADDR") or _slurm_master(environ),
        "MASTER_PORT": environ.get("MASTER_PORT") or environ.get("PORT") or "29500",
    }


def init_distributed(launcher: str = "none", timeout_s: float = 600.0) -> DistEnv:
    """Join (or skip) the process group for ``launcher`` and pick this process's device."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    cuda = torch.cuda.is_available()
    if launcher == "none":
        return DistEnv(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    if launcher == "slurm":
        os.environ.update(slurm_env())
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), int(os.environ.get("LOCAL_RANK", "0"))
    # A scheduler that shows each task only its own GPU makes local rank 3 device 0.
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
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


def ensure_process_group(env: DistEnv) -> None:
    """A one-process group when none was started (``packtune train --deepspeed ...`` on one
    GPU, as XTuner users run ZeRO offload): DeepSpeed and FSDP2 need one. ``cleanup``
    destroys it like any other."""
    if dist.is_initialized():
        return
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def on_main_rank(env: DistEnv, fn, shared: tuple[type[Exception], ...] = ()):
    """``fn()`` on the main rank while the others wait; returns its result there, ``None`` elsewhere.

    A failure on the main rank is sent to the others, which raise it too: as the same class
    when it is one of ``shared`` (errors whose message is meant for the user), else as a
    ``RuntimeError`` naming the main rank's error. So every rank ends with the same line and
    exit code instead of dying of a broken connection.
    """
    if not (env.distributed and dist.is_initialized()):
        return fn()
    outcome: list = [None]
    result = None
    if env.is_main:
        try:
            result = fn()
        except Exception as exc:
            cls = type(exc) if isinstance(exc, shared) else None
            outcome = [(cls, str(exc) if cls else f"{type(exc).__name__}: {exc}")]
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        cls, message = outcome[0]
        raise cls(message) if cls else RuntimeError(f"rank 0 failed: {message}")
    return result


def peak_memory(env: DistEnv) -> str:
    """Each rank's peak memory so far, as one line: host RSS (``VmHWM``: this process since it
    started, not the launcher it was forked from), and on CUDA the peak allocated by torch."""
    mine = {"host": _host_peak_bytes()}
    if env.device.type == "cuda":
        mine["gpu"] = torch.cuda.max_memory_allocated(env.device)
    peaks = [mine]
    if env.distributed and dist.is_initialized() and dist.get_world_size() > 1:
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, mine)
    line = "peak host memory per rank " + ", ".join(f"{p['host'] / 2**30:.2f}" for p in peaks) + " GiB"
    if "gpu" in mine:
        line += ", peak GPU memory per rank " + ", ".join(f"{p['gpu'] / 2**30:.2f}" for p in peaks) + " GiB"
    return line


def _host_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def exit_process(code: int = 0) -> None:
    """Flush the logs and end this process now, without the interpreter's teardown.

    For a worker whose run is complete (checkpoints fsynced, logs closed, process group
    destroyed). DDP's reducer keeps its process group alive past ``destroy_process_group``:
    the gloo threads (``gloo_tcp_loop``, ``pt_gloo_runloop``) still run while Python tears
    down, the situation in which a finished run can abort with "terminate called without an
    active exception" and torchrun reports a failure. Skipping the teardown leaves them no
    chance.
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def cleanup(ok: bool = True) -> None:
    """Leave the process group cleanly (a barrier first, so no rank tears down a peer's op).

    After an error (``ok=False``) there is no barrier: the other ranks may be inside a
    collective that this rank will never join. Destroying the group closes this rank's
    connections, so the others fail at once instead of waiting for the timeout (and torchrun
    stops them as soon as this process exits).
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if ok:
                dist.barrier()
        finally:
            dist.destroy_process_group()
