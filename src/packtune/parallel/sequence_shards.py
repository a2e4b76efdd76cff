"""One packed row cut into ``sequence_parallel_size`` contiguous shards.

The row (``batch_size > 1`` packs already flattened into one by ``collate_varlen``) is
padded to a multiple of ``sp`` with a padding document whose labels are -100
(``collate_varlen(..., pad_to_multiple_of=sp)``), then rank ``r`` keeps tokens
``[r * L, (r + 1) * L)``, ``L = T / sp``. Example, a row of documents ``a`` (5 tokens) and
``b`` (2 tokens) padded with ``p`` for ``sp = 2``::

    input_ids     a a a a a b b p  ->  rank 0: a a a a      rank 1: a b b p
    position_ids  0 1 2 3 4 0 1 0  ->  rank 0: 0 1 2 3      rank 1: 4 0 1 0
    cu_seqlens    [0, 5, 7, 8]     ->  the same on both ranks (the whole row's)

Positions stay those of the whole row, so rotary embeddings are exactly as in one process;
attention gets the whole row's ``cu_seqlens`` (``UlyssesContext``).

Targets and loss weights are computed on the **whole** row before it is cut
(``target_weights``), then cut the same way: the last target of shard ``r`` is the first
label of shard ``r + 1``, and ``"sample"``/``"square"`` weights count each document once,
wherever its tokens landed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from packtune.attention.varlen import CuSeqlens
from packtune.parallel.groups import SequenceParallel
from packtune.parallel.ulysses import UlyssesContext

if TYPE_CHECKING:  # packing sits above parallel: its Batch carries this package's context
    from packtune.packing.collate import Batch


def shard_bounds(total: int, size: int, rank: int) -> tuple[int, int]:
    """Token range ``[start, end)`` of shard ``rank`` of a row of ``total`` tokens.

    >>> shard_bounds(12, 4, 1)
    (3, 6)
    """
    if total % size:
        raise ValueError(
            f"a row of {total} tokens cannot be cut into {size} equal shards; collate it with "
            f"collate_varlen(..., pad_to_multiple_of={size})"
        )
    length = total // size
    return rank * length, (rank + 1) * length


def shard_micro_batch(
    batch: Batch, targets: torch.Tensor, weights: torch.Tensor, sp: SequenceParallel
) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """This rank's shard of ``batch`` (one varlen row) and of its ``target_weights``.

    The shard's ``model_inputs()`` carry a ``UlyssesContext`` with the whole row's
    ``cu_seqlens`` for the attention; its ``cu_seqlens``/``max_seqlen`` stay the whole row's too.
    """
    if not batch.varlen or batch.input_ids.shape[0] != 1:
        raise ValueError("sequence parallelism shards one flattened varlen row (collate_varlen), "
                         f"got {'padded rows' if not batch.varlen else f'{batch.input_ids.shape[0]} rows'}")
    total = batch.input_ids.shape[1]
    start, end = shard_bounds(total, sp.size, sp.rank)
    # Validated once per micro-batch (one host read), so no attention layer reads it back.
    cu = CuSeqlens.validate("cu_seqlens", batch.cu_seqlens, total, device=batch.input_ids.device)
    context = UlyssesContext(group=sp.group, size=sp.size, rank=sp.rank, cu_seqlens=cu, max_seqlen=cu.longest, total=total)
    real_end = total - batch.padding  # padding sits at the end of the row
    shard = dataclasses.replace(
        batch,
        input_ids=batch.input_ids[:, start:end],
        labels=batch.labels[:, start:end],
        position_ids=batch.position_ids[:, start:end],
        padding=end - max(start, min(end, real_end)),
        sequence_parallel=context,
    )
    return shard, targets[start:end], weights[start:end]
