"""The packing boundaries a layer with state received, as ``Segments``."""

from __future__ import annotations

from packtune.attention.hf import BOUNDARIES_KWARG, SP_KWARG
from packtune.attention.segments import Segments

__all__ = ["Segments", "segments_of"]


def segments_of(kwargs: dict, rows: int, length: int) -> Segments | None:
    """The packing boundaries a layer received (``None``: every row is one document as it is).

    Reads the ``Boundaries`` that ``enable_varlen``'s hook hands every layer. Sequence-parallel
    shards are refused: a scan over a shard would need the state of the rank before it.
    """
    if kwargs.get(SP_KWARG) is not None:
        raise NotImplementedError(
            "sequence parallelism cannot run layers with state (scans, causal convolutions): "
            "set sequence_parallel_size = 1 for this model"
        )
    bounds = kwargs.get(BOUNDARIES_KWARG)
    if bounds is None:
        return None
    return Segments.build(bounds.q, rows, length)
