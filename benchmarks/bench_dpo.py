"""Benchmark: DPO on packed rows against TRL's DPOTrainer, and the log-prob head's memory (issue 17).

    python benchmarks/bench_dpo.py                 # 96 pairs, a 32,000-token vocabulary: a few minutes on 2 cores
    python benchmarks/bench_dpo.py --quick         # 32 pairs: about a minute
    python benchmarks/bench_dpo.py --out benchmarks/results-dpo.md

Speed: the same tiny Llama (random init, packtune's tiny demo sizes, the Mistral tokenizer's
32,000-token vocabulary) and the same pairs (random words, lognormal prompt and completion
lengths, as real preference data is long-tailed), fp32 on the CPU, one epoch each:

* TRL 1.16 ``DPOTrainer`` (sigmoid): padded batches of ``--batch`` pairs (chosen and rejected
  rows), sdpa attention, its reference model a frozen copy, its fused log-prob head;
* packtune: the same pairs, TRL's own token ids, packed whole into ``--max-length`` rows (bfd),
  one pack per micro-batch, ``packtune_varlen`` attention, the frozen-copy reference on the
  same packed layout, ``accumulate_preference`` + the optimizer step.

Real tokens/s counts every prompt and completion token of both sequences of every pair (no
pads), over every step but the first (warm-up). Goal: packtune >= 2x TRL.

Memory: one DPO step (policy forward and backward, reference forward) of one packed row of
``--memory-tokens`` tokens with the log-probs in ``loss_chunk_size`` chunks, against the same
step with the full ``(tokens, vocab)`` logits (``loss_chunk_size = None``). Each runs in a fresh
process; its peak is the growth of peak RSS over the step (``bench_model.measure_peak``). Both
must give the same loss. Goal: chunked <= 0.5x full.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see benchmarks/README.md

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import Row, machine  # noqa: E402  (also puts src/ on the path)
from bench_model import _pythonpath, measure_peak  # noqa: E402
from packtune.config.settings import LOSS_CHUNK_SIZE  # noqa: E402

GOAL_SPEED = 2.0  # packed DPO real tokens/s >= 2x TRL's padded batches
GOAL_MEMORY = 0.5  # chunked log-prob head peak <= 0.5x the full-vocabulary logits
MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=4096)
WORDS = ("river stone cloud apple house train winter water plane dream light green quick answer simple story "
         "number garden window mountain letter paper silver market").split()


def _tokenizer():
    from packtune.data import load_tokenizer

    return load_tokenizer("packtune://mistral-v1")


def _model(vocab: int, attn: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    import packtune  # noqa: F401  (registers packtune_varlen)

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=vocab, **MODEL), attn_implementation=attn)


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` text pairs: lognormal word counts (prompts ~40, completions ~60 words, long tails)."""
    rng = np.random.default_rng(seed)

    def text(mean: float) -> str:
        k = int(np.clip(rng.lognormal(np.log(mean), 0.8), 2, 8 * mean))
        return " ".join(rng.choice(WORDS, k))

    return [{"prompt": text(40), "chosen": text(60), "rejected": text(60)} for _ in range(n)]


class _StepTimes:
    """TRL's per-step seconds, from its callbacks."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                outer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                outer.seconds.append(time.perf_counter() - outer.t0)

        self.seconds: list[float] = []
        self.callback = Callback()


def run_trl(rows: list[dict], batch: int, tokenizer, work: str) -> tuple[dict, list[tuple[list[int], ...]]]:
    """One epoch of TRL's DPOTrainer; its real tokens/s and its tokenized pairs."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy = _model(len(tokenizer), "sdpa")
    ref = copy.deepcopy(policy).eval()
    args = DPOConfig(output_dir=work, use_cpu=True, bf16=False, per_device_train_batch_size=batch, num_train_epochs=1,
                     learning_rate=1e-4, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                     max_length=None, loss_type=["sigmoid"], beta=0.1)
    trainer = DPOTrainer(policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=copy.deepcopy(tokenizer))
    data = trainer.train_dataset
    pairs = list(zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]))
    times = _StepTimes()
    trainer.add_callback(times.callback)
    trainer.train()
    cumulative = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r and "loss" in r]
    per_step = np.diff([0, *cumulative])
    seconds = times.seconds
    assert len(per_step) == len(seconds) >= 2, (len(per_step), len(seconds))
    tokens = float(np.sum(per_step[1:]))
    return {"steps": len(seconds), "tokens": tokens, "seconds": float(np.sum(seconds[1:])),
            "tokens_per_s": tokens / float(np.sum(seconds[1:]))}, pairs


def run_packed(pairs, steps: int, max_length: int, vocab: int) -> dict:
    """One epoch of packtune on ``pairs`` (TRL's token ids), the packs dealt over ``steps`` steps."""
    from types import SimpleNamespace

    from packtune.data.report import DataReport
    from packtune.distributed import DistEnv
    from packtune.packing.packs import IGNORE_INDEX, TokenizedSamples
    from packtune.preference.data import PairDataset, layout_pairs
    from packtune.preference.objective import Objective
    from packtune.preference.step import accumulate_preference, collate_pairs, sequence_scores
    from packtune.recipe.engines.plain import PlainEngine

    seqs = []
    for p, c, r in pairs:
        seqs += [(p + c, [IGNORE_INDEX] * len(p) + c), (p + r, [IGNORE_INDEX] * len(p) + r)]
    samples = TokenizedSamples.from_lists(seqs)
    layout, _ = layout_pairs(samples, max_length, "bfd", "error", np.random.default_rng(0).permutation(len(pairs)))
    margins = np.zeros(len(pairs))
    dataset = PairDataset(samples, layout, DataReport(), margins, np.arange(len(pairs)))
    policy = _model(vocab, "packtune_varlen")
    ref = copy.deepcopy(policy).eval()
    settings = SimpleNamespace(max_norm=1.0, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_ratio=0.0, lora=None,
                               model_config=None)
    if len(dataset) < 2:
        raise ValueError(f"{len(dataset)} pack: too few to time a step after the first; use more pairs or a smaller --max-length")
    groups = np.array_split(np.arange(len(dataset)), min(steps, len(dataset)))  # every step holds a pack
    engine = PlainEngine(policy, DistEnv(), settings, total_steps=len(groups), compute_dtype=torch.float32)
    objective = Objective("dpo", "sigmoid", beta=0.1)

    def reference(mb, lay):
        with torch.no_grad():
            return sequence_scores(ref, mb, lay, objective, torch.float32, LOSS_CHUNK_SIZE, None)

    seconds, tokens = [], []
    for ids in groups:
        t0 = time.perf_counter()
        batches = [collate_pairs([dataset[int(i)]]) for i in ids]
        result = accumulate_preference(engine, batches, objective, torch.float32, LOSS_CHUNK_SIZE, reference=reference)
        engine.step()
        seconds.append(time.perf_counter() - t0)
        tokens.append(result.tokens)
    return {"steps": len(groups), "packs": len(dataset), "tokens": float(sum(tokens[1:])),
            "seconds": float(sum(seconds[1:])), "tokens_per_s": sum(tokens[1:]) / sum(seconds[1:])}


def memory_child(kind: str, tokens: int, vocab: int) -> dict:
    """Peak memory growth of one packed DPO step (``kind``: chunked or full logits)."""
    from types import SimpleNamespace

    from packtune.data.report import DataReport
    from packtune.distributed import DistEnv
    from packtune.packing.packs import IGNORE_INDEX, TokenizedSamples
    from packtune.preference.data import PairDataset, layout_pairs
    from packtune.preference.objective import Objective
    from packtune.preference.step import accumulate_preference, collate_pairs, sequence_scores
    from packtune.recipe.engines.plain import PlainEngine

    chunk = LOSS_CHUNK_SIZE if kind == "chunked" else None
    rng = np.random.default_rng(0)
    seqs, used = [], 0
    while used + 2 * 256 <= tokens:  # pairs of 256-token sequences: a 96-token prompt, a 160-token completion
        prompt = rng.integers(3, vocab, 96).tolist()
        for _ in range(2):
            completion = rng.integers(3, vocab, 160).tolist()
            seqs.append((prompt + completion, [IGNORE_INDEX] * 96 + completion))
        used += 512
    samples = TokenizedSamples.from_lists(seqs)
    pairs = len(seqs) // 2
    layout, _ = layout_pairs(samples, tokens, "sequential", "error", None)
    dataset = PairDataset(samples, layout, DataReport(), np.zeros(pairs), np.arange(pairs))
    policy = _model(vocab, "packtune_varlen")
    ref = _model(vocab, "packtune_varlen", seed=1).eval()  # not the policy: the loss is not log 2 on both sides
    engine = PlainEngine(policy, DistEnv(), SimpleNamespace(max_norm=0.0, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                                                            warmup_ratio=0.0, lora=None, model_config=None),
                         total_steps=2, compute_dtype=torch.float32)
    objective = Objective("dpo", "sigmoid", beta=0.1)

    def reference(mb, lay):
        with torch.no_grad():
            return sequence_scores(ref, mb, lay, objective, torch.float32, chunk, None)

    batch = collate_pairs([dataset[0]])
    step = lambda b: accumulate_preference(engine, [b], objective, torch.float32, chunk, reference=reference)  # noqa: E731
    step(collate_pairs([dataset[0]]))  # warm-up: kernels, allocator, lazy inits
    policy.zero_grad(set_to_none=True)
    result, peak, exact, seconds = measure_peak("cpu", lambda: step(batch))
    return {"kind": kind, "tokens": int(batch.num_tokens), "mb": peak / 2**20, "exact": exact, "seconds": seconds,
            "loss": result.loss}


def _spawn_memory(kind: str, args) -> dict:
    if args.in_process:
        return memory_child(kind, args.memory_tokens, args.vocab)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--memory-tokens", str(args.memory_tokens),
           "--vocab", str(args.vocab)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args, log=print) -> tuple[list[Row], dict]:
    import tempfile

    tokenizer = _tokenizer()
    rows = pair_rows(args.pairs, seed=0)
    with tempfile.TemporaryDirectory() as work:
        log(f"TRL DPOTrainer: {args.pairs} pairs, batches of {args.batch} ...")
        trl, pairs = run_trl(rows, args.batch, tokenizer, work)
    log(f"packtune: the same pairs in rows of {args.max_length} tokens ...")
    ours = run_packed(pairs, trl["steps"], args.max_length, len(tokenizer))
    speed = ours["tokens_per_s"] / trl["tokens_per_s"]
    log(f"memory: one step of {args.memory_tokens} tokens, chunked then full logits ...")
    chunked, full = _spawn_memory("chunked", args), _spawn_memory("full", args)
    if abs(chunked["loss"] - full["loss"]) > 1e-5 * max(1.0, abs(full["loss"])):
        raise RuntimeError(f"the chunked and full-logit steps disagree: loss {chunked['loss']} vs {full['loss']}")
    memory = chunked["mb"] / full["mb"]
    table = [
        Row("DPO real tokens/s (packed vs TRL padded)", f"{ours['tokens_per_s']:,.0f}", f"{trl['tokens_per_s']:,.0f}",
            f"{speed:.2f}x", f">= {GOAL_SPEED}x", "PASS" if speed >= GOAL_SPEED else "FAIL"),
        Row(f"DPO step peak memory, {chunked['tokens']:,} tokens (chunked vs full logits)", f"{chunked['mb']:,.0f} MB",
            f"{full['mb']:,.0f} MB", f"{memory:.2f}x", f"<= {GOAL_MEMORY}x", "PASS" if memory <= GOAL_MEMORY else "FAIL"),
    ]
    return table, {"trl": trl, "packtune": ours, "memory": {"chunked": chunked, "full": full},
                   "ratios": {"speed": speed, "memory": memory}}


def render(rows: list[Row], info: dict, args, details: dict, seconds: float) -> str:
    lines = [f"# DPO benchmark ({args.pairs} pairs, batches of {args.batch}, rows of {args.max_length} tokens, vocab {args.vocab})",
             "", f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, transformers {info['transformers']}, "
             f"{info['date']}; {seconds:.0f} s", "",
             "| what | packtune | baseline | ratio | goal | result |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.what} | {r.ours} | {r.baseline} | {r.ratio} | {r.goal} | {r.result} |" for r in rows]
    t, p = details["trl"], details["packtune"]
    lines += ["", f"TRL: {t['steps']} steps, {t['tokens']:,.0f} real tokens in {t['seconds']:.1f} s after the first step; "
              f"packtune: {p['packs']} packs in {p['steps']} steps, {p['tokens']:,.0f} tokens in {p['seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8, help="TRL's pairs per step (its padded batch)")
    parser.add_argument("--max-length", type=int, default=2048, help="packtune's packed row length")
    parser.add_argument("--memory-tokens", type=int, default=4096, help="tokens of the memory step's packed row")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of the memory step's model")
    parser.add_argument("--quick", action="store_true", help="32 pairs")
    parser.add_argument("--out", type=Path, help="also save the table here (and the raw numbers next to it as .json)")
    parser.add_argument("--child", choices=("chunked", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs = 32
    if args.child:
        print(json.dumps(memory_child(args.child, args.memory_tokens, args.vocab)))
        return 0
    t0 = time.perf_counter()
    rows, details = run(args)
    text = render(rows, machine("cpu"), args, details, time.perf_counter() - t0)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(details, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
