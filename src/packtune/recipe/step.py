"""One optimizer step over many micro-batches, normalised by the global batch.

The loss of a step is ``sum(weight * ce) / sum(weight)`` over *every* target of the step: all
micro-batches of all ranks (see ``packtune.loss``). The denominator is known from the labels
before any forward pass, so it is summed over the micro-batches, all-reduced across ranks,
and each micro-batch's backward already carries its final scale. The gradient is then the
same whether the samples were packed or padded, in 1 row or 8, in 1 micro-batch or 4, on 1
rank or 2.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from packtune.loss import target_weights, weighted_loss_sum
from packtune.loss_head import LOSS_CHUNK_SIZE, chunked_head, takes_logits_mask
from packtune.modeling import autocast_context, transformers_model
from packtune.packing.collate import Batch
from packtune.packing.packs import IGNORE_INDEX
from packtune.parallel.groups import SequenceParallel
from packtune.parallel.sequence_shards import shard_micro_batch


@dataclass
class StepResult:
    """What one optimizer step did, summed over all ranks (``loss`` is the normalised loss)."""

    loss: float
    weight_total: float
    tokens: int
    trained_tokens: int


def forward_loss_sum(
    model: torch.nn.Module,
    batch: Batch,
    targets: torch.Tensor,
    weights: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32,
    loss_chunk_size: int | None = LOSS_CHUNK_SIZE,
) -> torch.Tensor:
    """``sum(weight * cross_entropy)`` of one micro-batch (``target_weights`` of its labels).

    Logits are computed only where a target is trained (``logits_to_keep``): in chat data most
    tokens are prompt, and the vocabulary projection is the largest matmul of a small model.
    With ``loss_chunk_size`` (and a head packtune knows, ``packtune.loss_head``) they are
    computed ``loss_chunk_size`` positions at a time and never exist for all of them at once.
    """
    kwargs = {}
    if takes_logits_mask(type(transformers_model(model))):
        keep = (targets != IGNORE_INDEX).view(batch.labels.shape)
        if not bool(keep.any()):
            keep = keep.clone()
            keep.view(-1)[0] = True  # nothing to train: one position keeps the graph whole
        kwargs["logits_to_keep"] = keep
        flat = keep.view(-1)
        targets, weights = targets[flat], weights[flat]
    head = chunked_head(model, loss_chunk_size)
    with autocast_context(batch.input_ids.device, compute_dtype):
        with head.capture(targets, weights) if head else contextlib.nullcontext():
            logits = model(**batch.model_inputs(), use_cache=False, **kwargs).logits
    if head is not None:
        return head.loss(logits)
    if logits.numel() != targets.numel() * logits.shape[-1]:
        raise RuntimeError(
            f"{type(transformers_model(model)).__name__} returned logits of shape {tuple(logits.shape)} for "
            f"{targets.numel()} targets: its logits_to_keep does not keep what was asked"
        )
    return weighted_loss_sum(logits, targets, weights)


def accumulate_gradients(
    engine, micro_batches: list[Batch], reduction: str, compute_dtype: torch.dtype = torch.float32,
    loss_chunk_size: int | None = LOSS_CHUNK_SIZE, sequence_parallel: SequenceParallel | None = None,
) -> StepResult:
    """Forward and backward every micro-batch of this rank for one step; no optimizer update.

    ``engine`` provides ``model``, ``world_size``, ``all_reduce_sum(tensor)``,
    ``accumulate(last)`` (a context that skips gradient sync except on the last micro-batch)
    and ``backward(loss)``. Engines average gradients over ranks, hence the ``world_size``.

    With ``sequence_parallel``, each micro-batch is a whole row shared by the ranks of the
    group: its targets and weights are computed on the whole row, then every rank keeps its
    shard of tokens, targets and weights, so each target is counted once over all ranks.
    """
    device = micro_batches[0].input_ids.device
    weighted = [target_weights(mb.labels, mb.cu_seqlens, reduction) for mb in micro_batches]
    if sequence_parallel is not None:
        shards = [shard_micro_batch(mb, t, w, sequence_parallel) for mb, (t, w) in zip(micro_batches, weighted)]
        micro_batches, weighted = [s[0] for s in shards], [s[1:] for s in shards]
    local = torch.zeros(3, dtype=torch.float64, device=device)
    for mb, (targets, weights) in zip(micro_batches, weighted):
        local[0] += weights.sum().double()
        local[1] += mb.num_tokens
        local[2] += (targets != IGNORE_INDEX).sum()
    total, tokens, trained = (float(x) for x in engine.all_reduce_sum(local))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (mb, (targets, weights)) in enumerate(zip(micro_batches, weighted)):
        with engine.accumulate(last=i == len(micro_batches) - 1):
            part = forward_loss_sum(engine.model, mb, targets, weights, compute_dtype, loss_chunk_size)
            # A step with nothing to train still runs backward (every rank must join the
            # gradient sync) but with a zero loss.
            scale = engine.world_size / total if total > 0 else 0.0
            engine.backward(part * scale)
        loss_sum += part.detach().double()
    loss = float(engine.all_reduce_sum(loss_sum)) / total if total > 0 else 0.0
    return StepResult(loss=loss, weight_total=total, tokens=int(tokens), trained_tokens=int(trained))
