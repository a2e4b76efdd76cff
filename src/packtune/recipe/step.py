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
import functools
import inspect
from dataclasses import dataclass

import torch

from packtune.loss import target_weights, weight_total, weighted_loss_sum
from packtune.packing.collate import Batch
from packtune.packing.packs import IGNORE_INDEX


@dataclass
class StepResult:
    """What one optimizer step did, summed over all ranks (``loss`` is the normalised loss)."""

    loss: float
    weight_total: float
    tokens: int
    trained_tokens: int


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device``, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under engine and PEFT wrappers."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


@functools.lru_cache(maxsize=None)
def _takes_mask(model_class: type) -> bool:
    """Whether the model's forward accepts a boolean ``logits_to_keep`` mask (transformers >= 5)."""
    from transformers import modeling_utils

    if "logits_to_keep" not in inspect.signature(model_class.forward).parameters:
        return False
    slicer = getattr(modeling_utils, "slice_logits_to_keep", None)
    return slicer is not None and "bool" in (slicer.__doc__ or "")


def forward_loss_sum(model: torch.nn.Module, batch: Batch, reduction: str, compute_dtype: torch.dtype = torch.float32):
    """``(sum(weight * ce), sum(weight))`` of one micro-batch; the first carries the graph.

    Logits are computed only where a target is trained (``logits_to_keep``): in chat data most
    tokens are prompt, and the vocabulary projection is the largest matmul of a small model.
    """
    targets, weights = target_weights(batch.labels, batch.cu_seqlens, reduction)
    kwargs = {}
    if _takes_mask(type(_inner_model(model))):
        keep = (targets != IGNORE_INDEX).view(batch.labels.shape)
        if not bool(keep.any()):
            keep = keep.clone()
            keep.view(-1)[0] = True  # nothing to train: one position keeps the graph whole
        kwargs["logits_to_keep"] = keep
        flat = keep.view(-1)
        targets, weights = targets[flat], weights[flat]
    with autocast_context(batch.input_ids.device, compute_dtype):
        logits = model(**batch.model_inputs(), use_cache=False, **kwargs).logits
    return weighted_loss_sum(logits, targets, weights), weights.sum()


def accumulate_gradients(engine, micro_batches: list[Batch], reduction: str, compute_dtype: torch.dtype = torch.float32) -> StepResult:
    """Forward and backward every micro-batch of this rank for one step; no optimizer update.

    ``engine`` provides ``model``, ``world_size``, ``all_reduce_sum(tensor)``,
    ``accumulate(last)`` (a context that skips gradient sync except on the last micro-batch)
    and ``backward(loss)``. Engines average gradients over ranks, hence the ``world_size``.
    """
    device = micro_batches[0].input_ids.device
    local = torch.zeros(3, dtype=torch.float64, device=device)
    for mb in micro_batches:
        local[0] += weight_total(mb.labels, mb.cu_seqlens, reduction)
        local[1] += mb.num_tokens
        local[2] += (mb.labels[:, 1:] != IGNORE_INDEX).sum()
    total, tokens, trained = (float(x) for x in engine.all_reduce_sum(local))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, mb in enumerate(micro_batches):
        with engine.accumulate(last=i == len(micro_batches) - 1):
            part, _ = forward_loss_sum(engine.model, mb, reduction, compute_dtype)
            # A step with nothing to train still runs backward (every rank must join the
            # gradient sync) but with a zero loss.
            scale = engine.world_size / total if total > 0 else 0.0
            engine.backward(part * scale)
        loss_sum += part.detach().double()
    loss = float(engine.all_reduce_sum(loss_sum)) / total if total > 0 else 0.0
    return StepResult(loss=loss, weight_total=total, tokens=int(tokens), trained_tokens=int(trained))
