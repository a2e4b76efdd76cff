"""The plain reference of preference training: each pair alone as a padded batch of two rows
through the model's own sdpa forward with full logits, TRL 1.16's formulas, the mean over the pairs
of the step (``plain_step``); and packtune's packed step on the same pairs (``packed_step``).

Written independently of packtune.preference's objective; shared by the preference tests.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoConfig

import packtune  # noqa: F401  (registers packtune_varlen)
from packtune.data.report import DataReport
from packtune.distributed import DistEnv
from packtune.packing.packs import IGNORE_INDEX, TokenizedSamples
from packtune.preference.data import PairDataset, layout_pairs
from packtune.preference.objective import Objective
from packtune.preference.step import accumulate_preference, collate_pairs, sequence_scores
from packtune.recipe.engines.plain import PlainEngine

VOCAB = 96

def tiny_config():
    return AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0)


def tiny_model(cls, attn: str, seed: int):
    torch.manual_seed(seed)
    cfg = copy.deepcopy(tiny_config())
    cfg.num_labels = 1
    return cls.from_config(cfg, attn_implementation=attn)


def random_pairs(seed: int, n: int = 7):
    """``n`` pairs: a shared prompt, two different completions; and their margins."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n):
        prompt = rng.integers(3, VOCAB, int(rng.integers(2, 7))).tolist()
        for _side in range(2):
            completion = rng.integers(3, VOCAB, int(rng.integers(1, 9))).tolist()
            seqs.append((prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
    return TokenizedSamples.from_lists(seqs), rng.normal(size=n).round(2)


def pair_dataset(samples, margins, max_length, strategy="bfd", seed=0):
    order = np.random.default_rng(seed).permutation(len(samples) // 2)
    layout, _ = layout_pairs(samples, max_length, strategy, "error", order)
    return PairDataset(samples, layout, DataReport(), margins, np.arange(margins.size))


def plain_engine(model):
    settings = SimpleNamespace(max_norm=0.0, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, warmup_ratio=0.0, lora=None,
                               model_config=None)
    return PlainEngine(model, DistEnv(), settings, total_steps=1, compute_dtype=torch.float32)


def gradients(model):
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return g


def plain_step(objective: Objective, policy, ref, samples, margins):
    """TRL's loss, one pair per padded batch of two rows, averaged over the pairs."""
    o = objective
    pairs = len(samples) // 2
    policy.zero_grad(set_to_none=True)
    losses, nll_sum, nll_weight = [], 0.0, 0.0
    stats = []
    for i in range(pairs):
        rows = [samples.input_ids[samples.offsets[2 * i + k]:samples.offsets[2 * i + k + 1]] for k in (0, 1)]
        labs = [samples.labels[samples.offsets[2 * i + k]:samples.offsets[2 * i + k + 1]] for k in (0, 1)]
        width = max(len(r) for r in rows)
        ids = torch.zeros(2, width, dtype=torch.long)
        labels = torch.full((2, width), IGNORE_INDEX)
        mask = torch.zeros(2, width, dtype=torch.long)
        for k in (0, 1):
            ids[k, :len(rows[k])] = torch.as_tensor(rows[k])
            labels[k, :len(rows[k])] = torch.as_tensor(labs[k])
            mask[k, :len(rows[k])] = 1
        if o.method == "reward":
            last = torch.tensor([int(np.flatnonzero(np.asarray(labs[k]) != IGNORE_INDEX)[-1]) for k in (0, 1)])
            hidden = policy.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            r = policy.score(hidden)[torch.arange(2), last, 0]
            loss = -F.logsigmoid(r[0] - r[1] - float(margins[i]))
            if o.center_rewards_coefficient is not None:
                loss = loss + o.center_rewards_coefficient * (r[0] + r[1]) ** 2
            losses.append(loss)
            stats.append((float(r[0].detach()), float(r[1].detach())))
            continue

        def logps(model):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            t = labels[:, 1:]
            lp = torch.log_softmax(logits, -1).gather(2, t.clamp(min=0).unsqueeze(2)).squeeze(2)
            return (lp * (t != IGNORE_INDEX)).sum(1), (t != IGNORE_INDEX).sum(1).double()

        lp, n = logps(policy)
        lp = lp.double()
        if o.method == "dpo":
            with torch.no_grad():
                ref_lp, _ = logps(ref)
            s = lp - ref_lp.double()
            if o.dpo_loss == "sigmoid":
                loss = -F.logsigmoid(o.beta * (s[0] - s[1]))
            elif o.dpo_loss == "hinge":
                loss = torch.relu(1 - o.beta * (s[0] - s[1]))
            else:
                loss = (s[0] / n[0] - s[1] / n[1] - 1 / (2 * o.beta)) ** 2
            stats.append((o.beta * float(s[0].detach()), o.beta * float(s[1].detach())))
        else:
            a = lp / n
            if o.method == "simpo":
                loss = -F.logsigmoid(o.beta * (a[0] - a[1]) - o.simpo_gamma)
            else:
                log_odds = (a[0] - a[1]) - (torch.log1p(-torch.exp(a[0])) - torch.log1p(-torch.exp(a[1])))
                loss = -o.beta * F.logsigmoid(log_odds)
                w = 1.0 if o.loss_reduction == "token" else 1.0 / float(n[0])
                nll_sum = nll_sum - w * lp[0]
                nll_weight += w * float(n[0])
            stats.append((o.beta * float(a[0].detach()), o.beta * float(a[1].detach())))
        losses.append(loss)
    total = torch.stack(losses).sum() / pairs
    if o.method == "orpo":
        total = total + nll_sum / nll_weight
    total.backward()
    acc = float(np.mean([c > r for c, r in stats]))
    return float(total), gradients(policy), acc


def packed_step(objective, policy, ref, dataset, batch_size, accumulation, chunk, reference=None):
    """packtune's step; the DPO reference is ``ref``'s log-probs, or ``reference`` when given."""
    order = list(range(len(dataset)))
    per_mb = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    assert len(per_mb) <= accumulation
    per_mb += [[]] * (accumulation - len(per_mb))
    from packtune.recipe.step_plan import empty_pack

    batches = [collate_pairs([dataset[j] for j in ids] or [empty_pack()]) for ids in per_mb]

    def by_ref(mb, layout):
        with torch.no_grad():
            return sequence_scores(ref, mb, layout, objective, torch.float32, chunk, None)

    policy.zero_grad(set_to_none=True)
    result = accumulate_preference(plain_engine(policy), batches, objective, torch.float32, chunk, reference=reference or by_ref)
    return result, gradients(policy)
