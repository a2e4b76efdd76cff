"""Which ``sequence_parallel_size`` values work: plain arithmetic, without torch.

Imported by config validation and the command line (which must not wait for torch) as well
as by the sequence-parallel code.
"""

from __future__ import annotations


def divisors(n: int) -> list[int]:
    """The sizes that divide ``n`` evenly.

    >>> divisors(12)
    [1, 2, 3, 4, 6, 12]
    """
    return [d for d in range(1, n + 1) if n % d == 0]


def world_problem(size: int, world: int) -> str | None:
    """Why ``sequence_parallel_size = size`` cannot split ``world`` processes, or ``None``.

    >>> world_problem(3, 4)
    'sequence_parallel_size = 3 does not divide the 4 processes; valid sizes: 1, 2, 4'
    """
    if world % size:
        return f"sequence_parallel_size = {size} does not divide the {world} processes; valid sizes: {', '.join(map(str, divisors(world)))}"
    return None


def heads_problem(size: int, heads: int, world: int | None = None) -> str | None:
    """Why ``size`` ranks cannot share ``heads`` query heads evenly, or ``None``.

    >>> heads_problem(4, 6, world=8)
    'sequence_parallel_size = 4 does not divide the 6 query heads; valid sizes with 8 processes: 1, 2'
    """
    if heads % size == 0:
        return None
    valid = [d for d in divisors(heads) if world is None or world % d == 0]
    where = f" with {world} processes" if world else ""
    return f"sequence_parallel_size = {size} does not divide the {heads} query heads; valid sizes{where}: {', '.join(map(str, valid))}"
