"""From packs to a model batch: ``collate_varlen`` (flattened) and ``collate_padded`` (rows).

``collate_varlen`` puts several packs into **one** row with one ``cu_seqlens`` for all their
documents, so ``batch_size > 1`` works with varlen attention (XTuner allows only 1). The
batch's model inputs are exactly what transformers' ``DataCollatorWithFlattening(
return_flash_attn_kwargs=True, return_position_ids=True)`` produces, so any model loaded
with ``attn_implementation="packtune_varlen"`` (or flash-attention) consumes it.

Example: packs ``[a a a | b b]`` and ``[c c c c]`` become::

    input_ids     [[a a a b b c c c c]]
    position_ids  [[0 1 2 0 1 0 1 2 3]]
    cu_seq_lens_q [0 3 5 9]            (= cu_seq_lens_k)
    max_length_q  4                    (= max_length_k)

``pad_to_multiple_of`` appends padding as a document of its own (labels ``-100``), so it can
never be attended to by, or train, a real token; ``Batch.padding`` counts it (it is not a
real token). Sequence parallelism pads each row this way to a multiple of
``sequence_parallel_size`` and cuts it into shards (``packtune.parallel.sequence_shards``).

``collate_padded`` is the classic layout for models that cannot take varlen rows: one sample
per row, right-padded, with a 2-D ``attention_mask``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from packtune.packing.packs import IGNORE_INDEX
from packtune.attention.hf import SP_KWARG
from packtune.parallel.ulysses import UlyssesContext


@dataclass
class Batch:
    """One micro-batch. ``cu_seqlens`` always describes the documents over the flattened
    ``rows * length`` tokens (a padded batch: one document per row), for the loss.

    ``padding``: trailing tokens of the row that are padding (``pad_to_multiple_of``).
    ``sequence_parallel``: set on a sequence-parallel shard (``shard_micro_batch``): the tensors
    are this rank's shard, ``cu_seqlens``/``max_seqlen`` and the context are the whole row's."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    attention_mask: torch.Tensor | None = None
    padding: int = 0
    sequence_parallel: UlyssesContext | None = None

    @property
    def varlen(self) -> bool:
        return self.attention_mask is None

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        if self.attention_mask is not None:
            return int(self.attention_mask.sum())
        return int(self.input_ids.numel()) - self.padding

    def model_inputs(self) -> dict:
        """Keyword arguments for ``model(**...)``; never a 2-D mask with packed rows.

        A sequence-parallel shard passes its global ``position_ids`` and the context (the
        whole row's documents) instead of ``cu_seq_lens``, which would describe the shard."""
        if self.sequence_parallel is not None:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids, SP_KWARG: self.sequence_parallel}
        if self.varlen:
            return {
                "input_ids": self.input_ids,
                "position_ids": self.position_ids,
                "cu_seq_lens_q": self.cu_seqlens,
                "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_seqlen,
                "max_length_k": self.max_seqlen,
            }
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        return Batch(
            input_ids=move(self.input_ids),
            labels=move(self.labels),
            position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens),
            max_seqlen=self.max_seqlen,
            attention_mask=move(self.attention_mask),
            padding=self.padding,
            sequence_parallel=None if self.sequence_parallel is None else dataclasses.replace(
                self.sequence_parallel, cu_seqlens=move(self.sequence_parallel.cu_seqlens)),
        )


def collate_varlen(packs: Sequence[dict], pad_to_multiple_of: int | None = None, pad_token_id: int = 0) -> Batch:
    """Flatten ``packs`` (dicts from ``get_pack``) into one row; see the module docstring."""
    if not packs:
        raise ValueError("collate_varlen needs at least one pack")
    ids = [p["input_ids"] for p in packs]
    labels = [p["labels"] for p in packs]
    pos = [p["position_ids"] for p in packs]
    cu = [np.asarray([0], dtype=np.int64)]
    total = 0
    for p in packs:
        cu.append(np.asarray(p["cu_seqlens"][1:], dtype=np.int64) + total)
        total += len(p["input_ids"])
    max_seqlen = max(int(p["max_seqlen"]) for p in packs)
    pad = 0
    if pad_to_multiple_of and total % pad_to_multiple_of:
        pad = pad_to_multiple_of - total % pad_to_multiple_of
        ids.append(np.full(pad, pad_token_id, dtype=np.int64))
        labels.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
        pos.append(np.arange(pad, dtype=np.int64))
        total += pad
        cu.append(np.asarray([total], dtype=np.int64))
        max_seqlen = max(max_seqlen, pad)
    return Batch(
        input_ids=torch.from_numpy(np.concatenate(ids).astype(np.int64)).unsqueeze(0),
        labels=torch.from_numpy(np.concatenate(labels).astype(np.int64)).unsqueeze(0),
        position_ids=torch.from_numpy(np.concatenate(pos).astype(np.int64)).unsqueeze(0),
        cu_seqlens=torch.from_numpy(np.concatenate(cu)).to(torch.int32),
        max_seqlen=max_seqlen,
        padding=pad,
    )


def collate_padded(packs: Sequence[dict], pad_token_id: int = 0) -> Batch:
    """One single-document pack per row, right-padded; for models without varlen support."""
    if not packs:
        raise ValueError("collate_padded needs at least one pack")
    for p in packs:
        if len(p["cu_seqlens"]) != 2:
            raise ValueError("collate_padded takes one document per pack; packed rows need collate_varlen")
    width = max(len(p["input_ids"]) for p in packs)
    rows = len(packs)
    ids = np.full((rows, width), pad_token_id, dtype=np.int64)
    labels = np.full((rows, width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    for r, p in enumerate(packs):
        n = len(p["input_ids"])
        ids[r, :n], labels[r, :n], mask[r, :n] = p["input_ids"], p["labels"], 1
    return Batch(
        input_ids=torch.from_numpy(ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.arange(width).expand(rows, width).clone(),
        cu_seqlens=torch.arange(0, rows * width + 1, width, dtype=torch.int32),
        max_seqlen=width,
        attention_mask=torch.from_numpy(mask),
    )
