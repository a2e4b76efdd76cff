"""Training logs: ``metrics.jsonl``, TensorBoard scalars, a progress bar or log lines, a loss curve."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

log = logging.getLogger("packtune")


class MetricsLogger:
    """Writes every logged step as one JSON line (and to TensorBoard); only on the main rank.

    On a terminal a tqdm bar shows loss, tokens/s and the ETA; otherwise each log step is a
    plain line, so CI logs and ``nohup`` files stay readable.
    """

    def __init__(self, work_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.work_dir = work_dir
        self.path = os.path.join(work_dir, "metrics.jsonl")
        self.total = total_steps
        self.start = time.perf_counter()
        self.bar = None
        self.tb = None
        if not enabled:
            return
        os.makedirs(work_dir, exist_ok=True)
        _keep_until(self.path, start_step)
        # An evaluation at step s runs before the save at s, except the final one, which runs
        # after the last save: a run resumed at its last step redoes it, so drop the old one.
        _keep_until(os.path.join(work_dir, "eval.jsonl"), start_step if start_step < total_steps else start_step - 1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(work_dir, "tensorboard"))
        except ImportError:  # tensorboard is optional at run time
            log.warning("tensorboard is not installed: no TensorBoard scalars (pip install tensorboard)")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, step)
        # Preference training: the pairs' accuracy (TRL's name for DPO/SimPO/ORPO, RewardTrainer's for rewards).
        acc = record.get("rewards/accuracies", record.get("accuracy"))
        if self.bar:
            extra = {} if acc is None else {"acc": f"{acc:.3f}"}
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", **extra)
        elif acc is not None:
            elapsed = time.perf_counter() - self.start
            done = max(step - record.get("start_step", 0), 1)
            log.info(
                "step %d/%d  loss %.4f  accuracy %.3f  lr %.3g  grad_norm %.3g  %.0f tok/s  eta %s",
                step, self.total, record["loss"], acc, record["lr"], record["grad_norm"], record["tokens_per_s"],
                _hms(elapsed / done * (self.total - step)),
            )
        else:
            elapsed = time.perf_counter() - self.start
            done = max(step - record.get("start_step", 0), 1)
            eta = elapsed / done * (self.total - step)
            log.info(
                "step %d/%d  loss %.4f  lr %.3g  grad_norm %.3g  %.0f tok/s  eta %s",
                step, self.total, record["loss"], record["lr"], record["grad_norm"], record["tokens_per_s"], _hms(eta),
            )

    def advance(self, steps: int = 1) -> None:
        if self.bar:
            self.bar.update(steps)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.tb:
            self.tb.add_text(tag, text, step)

    def close(self) -> str | None:
        """Flush and write the loss curve; returns the PNG path."""
        if not self.enabled:
            return None
        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()
        return plot_loss_curve(self.path, os.path.join(self.work_dir, "loss_curve.png"))


def _keep_until(path: str, step: int) -> None:
    """Drop log lines after ``step``: a resumed run re-logs the steps a kill interrupted."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(kept)


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def plot_loss_curve(metrics_path: str, out_path: str) -> str | None:
    """Loss (and learning rate) against step, from ``metrics.jsonl``."""
    if not os.path.exists(metrics_path):
        return None
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_title("packtune training loss")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
