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

A checkpoint keeps the data position in packs trained on, over all ranks (``position``), and
a resumed run keeps the global batch it was trained with (``keep_global_batch``): on another
number of processes the accumulation is scaled to it, or the run is refused in one line that
names the choices. So a run continues where it stopped on any number of processes.
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

    def packs_consumed(self, step: int) -> int:
        """Packs trained on, over all ranks, after ``step`` steps: the data position a checkpoint
        keeps (it does not depend on how the packs were split over ranks)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return epoch * len(self.dataset) + min(within * self.global_packs, len(self.dataset))

    def step_after(self, packs: int) -> int:
        """The step after which ``packs`` packs have been trained on (``packs_consumed``'s inverse).

        >>> plan = StepPlan(range(10), 2, 1, 2, 3, None)   # 4 packs a step: 3 steps an epoch
        >>> [plan.packs_consumed(s) for s in (1, 2, 3, 4)], plan.step_after(14)
        ([4, 8, 10, 14], 4)
        """
        epoch, within = divmod(packs, len(self.dataset))
        step = epoch * self.steps_per_epoch + within // self.global_packs
        if self.packs_consumed(step) != packs:
            raise ValueError(f"{packs} packs is not the end of a step of {self.global_packs} packs "
                             f"over {len(self.dataset)} packs an epoch")
        return step

    def position(self, step: int) -> dict:
        """What a checkpoint saved after ``step`` keeps of the data position."""
        return {"packs_consumed": self.packs_consumed(step), "packs_per_epoch": len(self.dataset)}

    def resume_step(self, meta: dict, where: str) -> int:
        """The step to continue from after checkpoint ``meta`` (saved by ``position``).

        The position is kept in packs, over all ranks, not in steps of a rank, and the data must
        be what the checkpoint was trained on (otherwise the same position holds other packs).
        """
        per_epoch = meta.get("packs_per_epoch")
        if per_epoch is not None and per_epoch != len(self.dataset):
            raise ValueError(f"{where} was trained on {per_epoch} packs an epoch, and the data now makes {len(self.dataset)}: "
                             "resume with the data (and packing settings) it was trained on")
        if "packs_consumed" not in meta:  # written before the position was kept in packs
            return int(meta["step"])
        return self.step_after(int(meta["packs_consumed"]))

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


def keep_global_batch(meta: dict, batch_size: int, accumulative_counts: int, world_size: int, where: str) -> int:
    """The ``accumulative_counts`` with which this run keeps the global batch of checkpoint ``meta``.

    A run resumes with the packs per step it was trained with (they fix which packs every step
    holds, the schedule and the update). On the same geometry nothing changes. On another
    number of processes, with ``batch_size`` and ``accumulative_counts`` as they were, the
    accumulation is scaled to keep the global batch (2 processes x 1 -> 1 process x 2). Anything
    else raises ``ValueError`` in one line naming the choices that would keep it.

    >>> meta = {"global_packs": 4, "world_size": 2, "settings": {"batch_size": 1, "accumulative_counts": 2}}
    >>> keep_global_batch(meta, 1, 2, 2, "ckpt"), keep_global_batch(meta, 1, 2, 1, "ckpt"), keep_global_batch(meta, 1, 2, 4, "ckpt")
    (2, 4, 1)
    """
    want = meta.get("global_packs")
    have = batch_size * accumulative_counts * world_size
    if not want or have == want:
        return accumulative_counts
    was = meta.get("settings") or {}
    was_batch, was_accum, was_world = was.get("batch_size"), was.get("accumulative_counts"), data_parallel_size(meta)
    unchanged = (batch_size, accumulative_counts) == (was_batch, was_accum)
    if world_size != was_world and unchanged and want % (batch_size * world_size) == 0:
        return want // (batch_size * world_size)
    if want % (batch_size * world_size) == 0:
        choice = f"set accumulative_counts = {want // (batch_size * world_size)}"
    else:
        worlds = [w for w in range(1, want + 1) if want % (batch_size * w) == 0]
        choice = "with batch_size {}, resume on {}".format(batch_size, " or ".join(
            f"{processes(w)} (accumulative_counts = {want // (batch_size * w)})" for w in worlds) or "no number of processes")
        sizes = [b for b in range(1, want + 1) if want % (b * world_size) == 0]
        if sizes:
            choice += (f"; on {processes(world_size)}, set batch_size to {' or '.join(map(str, sizes))} "
                       f"(accumulative_counts = {want // world_size} / batch_size)")
    origin = "its settings"
    if was_batch and was_accum and was_world:
        origin = f"batch_size {was_batch} x accumulative_counts {was_accum} x {processes(was_world)}"
    raise ValueError(
        f"{where} was trained with {want} packs per step ({origin}); this run would take {have} (batch_size "
        f"{batch_size} x accumulative_counts {accumulative_counts} x {processes(world_size)}). Resuming keeps the "
        f"global batch: {choice}"
    )


def data_parallel_size(meta: dict) -> int | None:
    """The data-parallel ranks a checkpoint was trained on: its processes, or its sequence-parallel
    groups (checkpoints of runs without sequence parallelism record only ``world_size``)."""
    return meta.get("data_parallel_size", meta.get("world_size"))


def processes(n) -> str:
    """``1 process``, ``2 processes``."""
    return f"{n} process" if n == 1 else f"{n} processes"


def empty_pack(pad_token_id: int = 0) -> dict:
    """A one-token pack that trains nothing, for ranks whose slot is empty at an epoch's end."""
    return {
        "input_ids": np.array([pad_token_id], dtype=np.int64),
        "labels": np.array([IGNORE_INDEX], dtype=np.int64),
        "position_ids": np.zeros(1, dtype=np.int64),
        "cu_seqlens": np.array([0, 1], dtype=np.int32),
        "max_seqlen": 1,
    }
