"""Preference losses on per-sequence scores, TRL 1.16's formulas.

``pair_losses`` takes every sequence's summed completion log-prob (``logps``, chosen at ``2 i``,
rejected at ``2 i + 1``), its count of completion tokens, the reference's log-probs (DPO) and the
pairs' margins (reward models), and returns the loss of every pair and TRL's logged values:

* ``dpo`` (``DPOTrainer``): scores ``s = logp - ref_logp``; ``sigmoid``: ``-logsigmoid(beta (s_c - s_r))``;
  ``hinge``: ``relu(1 - beta (s_c - s_r))``; ``ipo``: ``(s_c / n_c - s_r / n_r - 1 / (2 beta))^2``.
  Rewards ``beta s``; logged log-probs are the sums.
* ``simpo`` (``CPOTrainer``, ``loss_type="simpo"``, ``cpo_alpha=0``): per-token means ``a``;
  ``-logsigmoid(beta (a_c - a_r - gamma / beta))``; rewards ``beta a``.
* ``orpo`` (``ORPOTrainer``): per-token means ``a``; ``-beta logsigmoid(log_odds)`` with
  ``log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))``; rewards ``beta a``. Its NLL
  term (the chosen completion's cross-entropy, ``loss_reduction`` weights, its own global
  normaliser) is added by the caller (``packtune.preference.step``).
* ``reward`` (``RewardTrainer``): ``logps`` are the rewards; ``-logsigmoid(r_c - r_r - margin)``
  plus ``center_rewards_coefficient * (r_c + r_r)^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Objective:
    """The preference settings of a run."""

    method: str
    dpo_loss: str = "sigmoid"
    beta: float = 0.1
    simpo_gamma: float = 0.5
    center_rewards_coefficient: float | None = None
    loss_reduction: str = "token"

    @classmethod
    def from_settings(cls, settings) -> Objective:
        return cls(settings.method, settings.dpo_loss, settings.beta, settings.simpo_gamma,
                   settings.center_rewards_coefficient, settings.loss_reduction)

    @property
    def needs_reference(self) -> bool:
        return self.method == "dpo"

    @property
    def is_reward(self) -> bool:
        return self.method == "reward"


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable (the branch at ``-ln 2``, as TRL's)."""
    t = -0.6931471805599453
    return torch.where(x < t, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(objective: Objective, logps: torch.Tensor, counts: torch.Tensor, ref_logps: torch.Tensor | None = None,
                margins: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses ``(pairs,)`` and the per-pair values TRL logs (see the module docstring).

    ``logps``/``counts``/``ref_logps`` are ``(2 * pairs,)``, chosen then rejected for each pair.
    The logged values: ``chosen``/``rejected`` rewards and ``logps_chosen``/``logps_rejected``;
    for a reward model ``chosen``/``rejected`` are the rewards themselves.
    """
    o = objective
    x = logps.double().view(-1, 2)
    n = counts.double().view(-1, 2).clamp(min=1.0)
    c, r = x[:, 0], x[:, 1]
    if o.method == "reward":
        m = margins.double() if margins is not None else torch.zeros_like(c)
        loss = -F.logsigmoid(c - r - m)
        if o.center_rewards_coefficient is not None:
            loss = loss + o.center_rewards_coefficient * (c + r) ** 2
        return loss, {"chosen": c.detach(), "rejected": r.detach()}
    if o.method == "dpo":
        ref = ref_logps.double().view(-1, 2)
        sc, sr = c - ref[:, 0], r - ref[:, 1]
        delta = sc - sr
        if o.dpo_loss == "sigmoid":
            loss = -F.logsigmoid(o.beta * delta)
        elif o.dpo_loss == "hinge":
            loss = torch.relu(1 - o.beta * delta)
        elif o.dpo_loss == "ipo":
            loss = (sc / n[:, 0] - sr / n[:, 1] - 1 / (2 * o.beta)) ** 2
        else:
            raise ValueError(f"unknown dpo_loss {o.dpo_loss!r}")
        shown = (c, r)
        rewards = (o.beta * sc, o.beta * sr)
    elif o.method in ("simpo", "orpo"):
        ac, ar = c / n[:, 0], r / n[:, 1]
        if o.method == "simpo":
            loss = -F.logsigmoid(o.beta * (ac - ar - o.simpo_gamma / o.beta))
        else:
            log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
            loss = -o.beta * F.logsigmoid(log_odds)
        shown = (ac, ar)
        rewards = (o.beta * ac, o.beta * ar)
    else:
        raise ValueError(f"method {o.method!r} has no pair loss")
    return loss, {"chosen": rewards[0].detach(), "rejected": rewards[1].detach(),
                  "logps_chosen": shown[0].detach(), "logps_rejected": shown[1].detach()}


def pair_metrics(objective: Objective, sums: dict[str, float], pairs: float) -> dict[str, float]:
    """TRL's logged names from the step's sums over pairs (``step`` gathers them)."""
    if pairs <= 0:
        return {}
    if objective.is_reward:
        return {"accuracy": sums["correct"] / pairs, "margin": sums["margin"] / pairs}
    return {
        "rewards/chosen": sums["chosen"] / pairs,
        "rewards/rejected": sums["rejected"] / pairs,
        "rewards/accuracies": sums["correct"] / pairs,
        "rewards/margins": sums["margin"] / pairs,
        "logps/chosen": sums["logps_chosen"] / pairs,
        "logps/rejected": sums["logps_rejected"] / pairs,
    }


#: The order of the sums ``step`` all-reduces for the metrics.
METRIC_SUMS = ("chosen", "rejected", "correct", "margin", "logps_chosen", "logps_rejected")


def metric_sums(values: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sums over this micro-batch's pairs, in ``METRIC_SUMS`` order (a tie counts as wrong)."""
    c, r = values["chosen"], values["rejected"]
    out = [c.sum(), r.sum(), (c > r).double().sum(), (c - r).sum(),
           values.get("logps_chosen", c).sum(), values.get("logps_rejected", r).sum()]
    return torch.stack([v.double() for v in out])
