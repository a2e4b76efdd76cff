"""The ranks as a data-parallel x sequence-parallel grid, built with torch's ``DeviceMesh``.

With ``sequence_parallel_size = sp`` on ``world`` processes the mesh is ``(dp, sp)`` with
``dp = world / sp``: rank ``d * sp + s`` is sequence rank ``s`` of data-parallel rank ``d``.
The ``sp`` ranks of a group are neighbours (one node, where the all-to-alls are cheap), share
the packs of every step (``StepPlan`` counts ``dp`` data-parallel ranks) and each trains one
shard of every row. Parameters stay replicated over the whole grid, so the engines reduce
gradients over all ``world = dp x sp`` ranks, as they always do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from packtune.config.sizes import world_problem


class SequenceParallelError(ValueError):
    """Sequence parallelism cannot run as configured (one line that says which sizes work)."""


@dataclass(frozen=True, eq=False)
class SequenceParallel:
    """This rank's place in the grid: its sequence-parallel group and data-parallel rank."""

    size: int
    rank: int
    group: dist.ProcessGroup | None
    dp_size: int = 1
    dp_rank: int = 0
    mesh: object | None = None  # the torch DeviceMesh ("dp", "sp") when built by init_sequence_parallel


def init_sequence_parallel(size: int, rank: int, world: int, device_type: str) -> SequenceParallel | None:
    """The ``(dp, sp)`` mesh of this run, or ``None`` for ``size == 1`` (no sequence parallelism).

    Every rank must call it (building the mesh creates the process groups collectively).
    Raises ``SequenceParallelError`` when ``size`` does not divide ``world``.
    """
    if size == 1:
        return None
    problem = world_problem(size, world)
    if problem:
        raise SequenceParallelError(problem)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world // size, size), mesh_dim_names=("dp", "sp"))
    return SequenceParallel(
        size=size,
        rank=mesh.get_local_rank("sp"),
        group=mesh.get_group("sp"),
        dp_size=world // size,
        dp_rank=mesh.get_local_rank("dp"),
        mesh=mesh,
    )
