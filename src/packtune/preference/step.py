"""One optimizer step of preference training on packed rows, normalised by the global pairs.

Every sequence's score is read from the packed row: for DPO, SimPO and ORPO the sum of its
completion tokens' log-probs, for a reward model the score head at its last completion token.
The log-probs come from the output layer ``loss_chunk_size`` trained tokens at a time
(``LogProbHead``): a forward pre-hook on the output layer takes the hidden states the model hands
it (only the completion positions, ``logits_to_keep``), computes the log-probs chunk by chunk
without gradient, sums them per sequence, and hands the sums to the objective. The gradient of
the pairs' loss with respect to a sequence's sum, ``g``, is the same for all its tokens, so the
gradient of the whole step is that of the weighted cross-entropy ``sum_t (-g_t) ce_t``, which the
chunked loss head (``packtune.loss_head``) computes, again in chunks, in the same forward. No
``(tokens, vocab)`` logits ever exist; the model's own layers and every engine's hooks run as in
SFT.

The loss of a step is ``sum of per-pair losses / pairs``, pairs counted over every micro-batch
and rank before any forward pass (``+ NLL sum / its weight`` for ORPO), so the result does not
depend on how the pairs were packed, split into micro-batches or dealt to ranks. With sequence
parallelism each rank holds a shard of the row: per-sequence sums are all-reduced over the group
before the objective, and each rank's tokens get the gradient of the whole pair.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from packtune.loss import target_weights
from packtune.loss_head import (
    LOSS_CHUNK_SIZE,
    chunked_head,
    chunked_loss_sum,
    head_operands,
    product_dtype,
    takes_logits_mask,
)
from packtune.modeling import autocast_context, transformers_model
from packtune.packing.collate import Batch, collate_varlen
from packtune.packing.packs import IGNORE_INDEX
from packtune.parallel.groups import SequenceParallel
from packtune.parallel.sequence_shards import shard_micro_batch
from packtune.preference.objective import METRIC_SUMS, Objective, metric_sums, pair_losses, pair_metrics


@dataclass
class PairBatch(Batch):
    """A micro-batch of pairs: its first ``2 * pairs`` documents are the pairs' sequences,
    chosen then rejected (padding documents may follow). ``margins``: per pair; ``ref_logps``:
    per sequence, when precomputed."""

    pairs: int = 0
    margins: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PairBatch:
        moved = Batch.to(self, device)
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return PairBatch(**{f: getattr(moved, f) for f in Batch.__dataclass_fields__}, pairs=self.pairs,
                         margins=move(self.margins), ref_logps=move(self.ref_logps))


def collate_pairs(packs: Sequence[dict], pad_to_multiple_of: int | None = None, pad_token_id: int = 0) -> PairBatch:
    """Flatten packs of pairs into one row (``collate_varlen``), keeping which documents pair up."""
    row = collate_varlen(packs, pad_to_multiple_of, pad_token_id)
    margins = [np.asarray(p.get("margins", np.zeros(0)), np.float64) for p in packs]
    refs = [p.get("ref_logps") for p in packs]
    pairs = sum(m.size for m in margins)
    ref = None
    if pairs and all(r is not None for r in refs if r is not None) and any(r is not None for r in refs):
        ref = torch.from_numpy(np.concatenate([np.asarray(r, np.float64) for r in refs if r is not None]))
    return PairBatch(**{f: getattr(row, f) for f in Batch.__dataclass_fields__}, pairs=pairs,
                     margins=torch.from_numpy(np.concatenate(margins) if margins else np.zeros(0)), ref_logps=ref)


@dataclass
class Layout:
    """Per-target facts of a (whole) row: ``targets`` (shifted labels), ``seq`` (the sequence a
    target belongs to; ``2 * pairs`` for anything else) and per sequence its completion ``counts``
    and the position of its last completion token (``ends``)."""

    targets: torch.Tensor
    seq: torch.Tensor
    counts: torch.Tensor
    ends: torch.Tensor


def row_layout(batch: PairBatch) -> Layout:
    """``Layout`` of ``batch`` (one flattened row, before any sequence-parallel cut)."""
    targets, _ = target_weights(batch.labels, batch.cu_seqlens, "token")
    total = targets.numel()
    n = 2 * batch.pairs
    cu = batch.cu_seqlens.to(device=targets.device, dtype=torch.int64)
    # Target i is label i + 1, which belongs to the document holding token i + 1.
    doc = torch.searchsorted(cu, torch.arange(1, total + 1, device=targets.device), right=True) - 1
    seq = torch.where((doc < n) & (targets != IGNORE_INDEX), doc, torch.full_like(doc, n))
    counts = torch.zeros(n + 1, dtype=torch.float64, device=targets.device)
    counts.index_add_(0, seq, torch.ones_like(seq, dtype=torch.float64))
    # The last completion token of sequence s is the last target of s, shifted back by one.
    pos = torch.arange(1, total + 1, device=targets.device)
    ends = torch.full((n + 1,), -1, dtype=torch.int64, device=targets.device)
    ends.scatter_reduce_(0, seq, pos, reduce="amax")
    return Layout(targets, seq, counts[:n], ends[:n])


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                transform: tuple, compute_dtype: torch.dtype) -> torch.Tensor:
    """``log_softmax(transform(hidden @ weight.T))[t, targets[t]]`` in fp32, ``chunk_size`` rows
    at a time, without gradient (the products in ``compute_dtype``, as the loss head's)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(compute_dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            z = torch.mm(hidden[rows].to(compute_dtype), w.t()).float()
            for kind, value in transform:
                z = torch.tanh(z / value) * value if kind == "softcap" else z * value if kind == "scale" else z / value
            out[rows] = z.gather(1, targets[rows].unsqueeze(1)).squeeze(1) - torch.logsumexp(z, dim=1)
    return out


Solve = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class LogProbHead:
    """Per-sequence log-prob sums at the output layer, in chunks (see the module docstring).

    ``with head.capture(targets, seq, n, solve): model(...)``; then ``head.result`` is the sums
    ``(n,)`` (``solve=None``: reference, no gradient) or the differentiable step value. ``solve``
    takes this rank's sums and returns ``(value, g)``: the objective's value and its gradient
    with respect to the sums."""

    def __init__(self, module: torch.nn.Module, transform: tuple, chunk_size: int) -> None:
        self.module, self.transform, self.chunk_size = module, transform, chunk_size
        self.result: torch.Tensor | None = None
        self._args: tuple | None = None

    @contextlib.contextmanager
    def capture(self, targets: torch.Tensor, seq: torch.Tensor, n: int, solve: Solve | None):
        self._args, self.result = (targets, seq, n, solve), None
        handle = self.module.register_forward_pre_hook(self._pre_hook)
        try:
            yield self
        finally:
            handle.remove()
            self._args = None

    def _pre_hook(self, module: torch.nn.Module, args: tuple):
        targets, seq, n, solve = self._args
        x = args[0]
        hidden = x.reshape(-1, x.shape[-1])
        if hidden.shape[0] != targets.numel():
            raise RuntimeError(f"the output layer got {hidden.shape[0]} positions for {targets.numel()} targets")
        keep = seq < n
        hidden, targets, seq = hidden[keep], targets[keep], seq[keep]
        h, w = head_operands(module, hidden)
        dtype = product_dtype(h.device, w.dtype)
        tok = token_logps(h.detach(), w.detach(), targets, self.chunk_size, self.transform, dtype)
        sums = torch.zeros(n, dtype=torch.float64, device=tok.device).index_add_(0, seq, tok.double())
        if solve is None:
            self.result = sums
        else:
            value, g = solve(sums)
            pseudo = chunked_loss_sum(h, w, targets, (-g)[seq].float(), self.chunk_size, self.transform)
            self.result = value.float() + (pseudo - pseudo.detach())
        return (x.narrow(-2, 0, 0), *args[1:])


def _score_module(model: torch.nn.Module) -> torch.nn.Module:
    tm = transformers_model(model)
    score = getattr(tm, "score", None)
    if not isinstance(score, torch.nn.Module):
        raise RuntimeError(f"{type(tm).__name__} has no `score` head: a reward model is an AutoModelForSequenceClassification")
    return score


def sequence_scores(model: torch.nn.Module, batch: PairBatch, layout: Layout, objective: Objective,
                    compute_dtype: torch.dtype, loss_chunk_size: int | None, solve: Solve | None,
                    sp: SequenceParallel | None = None) -> torch.Tensor:
    """One forward of ``batch`` (this rank's shard under ``sp``): the sequences' scores (``solve``
    None: summed over the group, no gradient) or the step value whose backward is the gradient."""
    n = 2 * batch.pairs
    device = batch.input_ids.device

    def finish(local: torch.Tensor) -> torch.Tensor:
        """The value from differentiable local sums (plain paths)."""
        if solve is None:
            full = local.detach().clone()
            if sp is not None:
                dist.all_reduce(full, group=sp.group)
            return full
        value, g = solve(local.detach())
        part = (g * local).sum()
        return value.float() + (part - part.detach()).float()

    if objective.is_reward:
        captured: list[torch.Tensor] = []
        handle = _score_module(model).register_forward_hook(lambda m, a, out: captured.append(out))
        try:
            with autocast_context(device, compute_dtype):
                out = model(**batch.model_inputs(), use_cache=False)
        finally:
            handle.remove()
        scores = captured[0].reshape(-1).float()
        start = _shard_start(batch, sp)
        ends = layout.ends - start
        mine = (ends >= 0) & (ends < scores.numel())
        local = torch.zeros(n, dtype=torch.float64, device=device)
        local = local.index_add(0, torch.nonzero(mine).reshape(-1), scores[ends[mine]].double())
        result = finish(local)
        return result + out.logits.float().sum() * 0.0 if solve is not None else result
    targets, seq = layout.targets, layout.seq
    kwargs = {}
    tm = transformers_model(model)
    if takes_logits_mask(type(tm)):
        keep = (seq < n).view(batch.input_ids.shape)
        if not bool(keep.any()):
            keep = keep.clone()
            keep.view(-1)[0] = True  # nothing to score: one position keeps the graph whole
        kwargs["logits_to_keep"] = keep
        flat = keep.view(-1)
        targets, seq = targets[flat], seq[flat]
    head = chunked_head(model, loss_chunk_size)
    if head is not None:
        lp_head = LogProbHead(head.module, head.transform, head.chunk_size)
        with autocast_context(device, compute_dtype), lp_head.capture(targets, seq, n, solve):
            logits = model(**batch.model_inputs(), use_cache=False, **kwargs).logits
        result = lp_head.result
        if solve is None:
            if sp is not None:
                dist.all_reduce(result, group=sp.group)
            return result
        return result + logits.float().sum()  # empty logits: keeps the engines' output hooks
    with autocast_context(device, compute_dtype):
        logits = model(**batch.model_inputs(), use_cache=False, **kwargs).logits
    flat = logits.reshape(-1, logits.shape[-1]).float()
    valid = seq < n
    tok = torch.log_softmax(flat[valid], dim=-1).gather(1, targets[valid].unsqueeze(1)).squeeze(1)
    local = torch.zeros(n, dtype=torch.float64, device=device).index_add(0, seq[valid], tok.double())
    return finish(local)


def _shard_start(batch: Batch, sp: SequenceParallel | None) -> int:
    if sp is None:
        return 0
    return sp.rank * batch.input_ids.shape[1]


@dataclass
class PreferenceStepResult:
    """What one step did, over all ranks: the normalised ``loss``, ``pairs`` and TRL's metrics."""

    loss: float
    pairs: int
    tokens: int
    trained_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


Reference = Callable[[PairBatch, Layout], torch.Tensor]


def _nll_weights(objective: Objective, layout: Layout) -> torch.Tensor:
    """ORPO: the NLL weight of every sequence's summed log-prob (chosen only; ``loss_reduction``)."""
    n = layout.counts.numel()
    w = torch.zeros(n, dtype=torch.float64, device=layout.counts.device)
    counts = layout.counts[0::2].clamp(min=1.0)
    w[0::2] = {"token": torch.ones_like(counts), "sample": 1.0 / counts, "square": counts.rsqrt()}[objective.loss_reduction]
    return w


def accumulate_preference(engine, micro_batches: list[PairBatch], objective: Objective,
                          compute_dtype: torch.dtype = torch.float32, loss_chunk_size: int | None = LOSS_CHUNK_SIZE,
                          sequence_parallel: SequenceParallel | None = None,
                          reference: Reference | None = None) -> PreferenceStepResult:
    """Forward and backward every micro-batch of this rank for one step (no optimizer update).

    ``engine`` as for ``packtune.recipe.step.accumulate_gradients``. ``reference(shard, layout)``
    gives the reference's log-prob sums of a micro-batch's sequences (DPO) unless they were
    precomputed (``PairBatch.ref_logps``).
    """
    sp = sequence_parallel
    device = micro_batches[0].input_ids.device
    layouts = [row_layout(mb) for mb in micro_batches]
    if sp is not None:
        shards = []
        for mb, lay in zip(micro_batches, layouts):
            shard, targets, seq = shard_micro_batch(mb, lay.targets, lay.seq.double(), sp)
            shard = PairBatch(**{f: getattr(shard, f) for f in Batch.__dataclass_fields__}, pairs=mb.pairs,
                              margins=mb.margins, ref_logps=mb.ref_logps)
            shards.append((shard, Layout(targets, seq.long(), lay.counts, lay.ends)))
    else:
        shards = list(zip(micro_batches, layouts))
    owner = sp is None or sp.rank == 0  # a group's ranks share their pairs: count them once
    local = torch.zeros(4, dtype=torch.float64, device=device)
    for (mb, lay), whole in zip(shards, micro_batches):
        if owner:
            local[0] += mb.pairs
            if objective.method == "orpo":
                local[1] += (_nll_weights(objective, lay) * lay.counts).sum()
        local[2] += mb.num_tokens
        local[3] += int((lay.seq < 2 * mb.pairs).sum())
    pairs, nll_total, tokens, trained = (float(x) for x in engine.all_reduce_sum(local))
    nll_ratio = pairs / nll_total if nll_total > 0 else 0.0
    sums = torch.zeros(len(METRIC_SUMS), dtype=torch.float64, device=device)
    value_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (mb, lay) in enumerate(shards):
        ref = None
        if objective.needs_reference and mb.pairs:
            ref = mb.ref_logps if mb.ref_logps is not None else reference(mb, lay)
            ref = ref.to(device=device, dtype=torch.float64)
        nll_w = _nll_weights(objective, lay) if objective.method == "orpo" else None
        logged: dict[str, torch.Tensor] = {}

        def solve(local_sums: torch.Tensor, mb=mb, lay=lay, ref=ref, nll_w=nll_w, logged=logged):
            full = local_sums.detach().clone()
            if sp is not None:
                dist.all_reduce(full, group=sp.group)
            leaf = full.requires_grad_(True)
            with torch.enable_grad():
                losses, values = pair_losses(objective, leaf, lay.counts, ref, mb.margins.to(device))
                value = losses.sum()
                if nll_w is not None:
                    value = value - nll_ratio * (nll_w * leaf).sum()
                (g,) = torch.autograd.grad(value, leaf)
            logged.update(values)
            return value.detach(), g

        with engine.accumulate(last=i == len(shards) - 1):
            part = sequence_scores(engine.model, mb, lay, objective, compute_dtype, loss_chunk_size,
                                   solve if mb.pairs else _nothing, sp)
            scale = engine.world_size / pairs if pairs > 0 else 0.0
            engine.backward(part * scale)
        if mb.pairs and owner:
            value_sum += part.detach().double()
            sums += metric_sums(logged)
    total_value, *summed = engine.all_reduce_sum(torch.cat([value_sum.view(1), sums])).tolist()
    loss = total_value / pairs if pairs > 0 else 0.0
    metrics = pair_metrics(objective, dict(zip(METRIC_SUMS, summed)), pairs)
    return PreferenceStepResult(loss=loss, pairs=int(pairs), tokens=int(tokens), trained_tokens=int(trained),
                                metrics=metrics)


def _nothing(local_sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch without pairs (an empty slot at an epoch's end): zero value and gradient."""
    return torch.zeros((), dtype=torch.float64, device=local_sums.device), torch.zeros_like(local_sums)
