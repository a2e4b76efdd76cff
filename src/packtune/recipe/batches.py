"""Which packs each rank trains on at each step, independent of the number of processes.

Global step ``k`` of epoch ``e`` takes the next ``G = batch_size * accumulative_counts *
world_size`` packs of that epoch's shuffled order. Those ``G`` packs are cut into ``G /
batch_size`` slots; slot ``a * world_size + r`` is micro-batch ``a`` of rank ``r``. So 2
processes x 1 accumulation step and 1 process x 2 accumulation steps train on the same packs
at every step, and (with the global loss normalisation) make the same update.

With sequence parallelism (``sequence_parallel_size = sp``) the plan counts data-parallel
ranks: ``world_size = world / sp`` and ``rank = global rank // sp``; the ``sp`` ranks of a
group train on the same packs, each on its shard of every row (``packtune.parallel``).

The last step of an epoch may have fewer packs than slots: a rank with an empty slot runs a
one-token batch with nothing to train (every rank must join the gradient sync), so no pack is
dropped and none is repeated.

``balance=True`` (off by default) deals the packs of a step to the ranks by attention cost,
the sum of squared document lengths (a pack with one long document costs more than a pack
of many short ones): the costliest pack first, each to the rank with the least cost so far.
The packs of each step, and so the loss and the update, stay the same; only which rank
computes which pack changes, so no rank waits long for the slowest at the gradient sync.
"""

from __future__ import annotations

import math

import numpy as np

from packtune.packing.packs import IGNORE_INDEX


class StepPlan:
    """Maps a global step to the pack indices of each of this rank's micro-batches."""

    def __init__(self, dataset, batch_size: int, accumulative_counts: int, world_size: int, max_epochs: int, max_steps: int | None,
                 balance: bool = False):
        self.dataset = dataset
        self.balance = balance
        self._costs: np.ndarray | None = None
        self.batch_size = batch_size
        self.accum = accumulative_counts
        self.world_size = world_size
        self.global_packs = batch_size * accumulative_counts * world_size
        self.steps_per_epoch = max(1, math.ceil(len(dataset) / self.global_packs))
        self.total_steps = int(max_steps) if max_steps else max_epochs * self.steps_per_epoch
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def epoch_progress(self, step: int) -> float:
        """Epochs completed after ``step`` steps, as a float."""
        return step / self.steps_per_epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self.dataset.epoch_order(epoch), epoch
        return self._order

    def step_packs(self, step: int) -> list[int]:
        """All pack indices of global ``step`` (0-based), across every rank."""
        order = self._epoch_order(self.epoch_of(step))
        first = (step % self.steps_per_epoch) * self.global_packs
        return [int(i) for i in order[first : first + self.global_packs]]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Pack indices of each micro-batch of ``rank`` at ``step`` (an inner list may be empty)."""
        if self.balance:
            mine = self.balanced_packs(step)[rank]
            return [mine[a * self.batch_size : (a + 1) * self.batch_size] for a in range(self.accum)]
        packs = self.step_packs(step)
        out = []
        for a in range(self.accum):
            slot = a * self.world_size + rank
            out.append(packs[slot * self.batch_size : (slot + 1) * self.batch_size])
        return out

    def attention_costs(self) -> np.ndarray:
        """Per pack, the sum of its documents' squared lengths."""
        if self._costs is None:
            layout = getattr(self.dataset, "layout", None)
            if layout is not None and hasattr(layout, "doc_start"):
                per_doc = (layout.doc_end - layout.doc_start).astype(np.float64)
                cum = np.concatenate([[0.0], np.cumsum(per_doc**2)])
                self._costs = cum[layout.pack_offsets[1:]] - cum[layout.pack_offsets[:-1]]
            else:  # any dataset of packs with cu_seqlens
                self._costs = np.array([float((np.diff(self.dataset[i]["cu_seqlens"]).astype(np.float64) ** 2).sum())
                                        for i in range(len(self.dataset))])
        return self._costs

    def balanced_packs(self, step: int) -> list[list[int]]:
        """The packs of ``step`` dealt to the ranks (one list per rank, in micro-batch order),
        the costliest first, each to the rank with the least attention cost so far."""
        costs = self.attention_costs()
        room = self.accum * self.batch_size
        mine: list[list[int]] = [[] for _ in range(self.world_size)]
        load = [0.0] * self.world_size
        for p in sorted(self.step_packs(step), key=lambda i: (-costs[i], i)):
            r = min((r for r in range(self.world_size) if len(mine[r]) < room), key=lambda r: (load[r], r))
            mine[r].append(p)
            load[r] += costs[p]
        return mine


def empty_pack(pad_token_id: int = 0) -> dict:
    """A one-token pack that trains nothing, for ranks whose slot is empty at an epoch's end."""
    return {
        "input_ids": np.array([pad_token_id], dtype=np.int64),
        "labels": np.array([IGNORE_INDEX], dtype=np.int64),
        "position_ids": np.zeros(1, dtype=np.int64),
        "cu_seqlens": np.array([0, 1], dtype=np.int32),
        "max_seqlen": 1,
    }
