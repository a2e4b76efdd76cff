"""``make demo``: the whole workflow, offline, on a CPU, in a few minutes.

list-cfg -> copy-cfg -> train (varlen on) -> convert pth_to_hf -> chat, on a tiny random-init
Mistral with the Mistral v1 tokenizer that ships in ``mistral-common`` and the bundled demo
tasks (``packtune.demo_data``). Before and after training it measures, on held-out prompts
that never occur in the training data, the exact-match rate of greedy answers and the
model's mean loss on the reference answers, and prints both.

    python -m packtune.demo [--out demo_out] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

CONFIG = "tiny_mistral_full_demo"


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _cli(*argv: str) -> None:
    from packtune.cli.main import main

    print("$ packtune " + " ".join(argv), flush=True)
    code = main(list(argv))
    if code != 0:
        raise SystemExit(f"demo: 'packtune {' '.join(argv)}' exited with {code}")


def held_out() -> list[dict]:
    from packtune.data.sources import assets_dir

    path = assets_dir() / "demo_heldout.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score(model, tokenizer, rows: list[dict], template: str) -> dict:
    """Exact match of greedy answers and mean reference-answer loss, overall and per task."""
    import torch

    from packtune.data import render_prompt
    from packtune.recipe.evaluate import generate_reply

    hits, losses = defaultdict(list), defaultdict(list)
    device = next(model.parameters()).device
    for row in rows:
        reply = generate_reply(model, tokenizer, row["instruction"], template, max_new_tokens=12)
        hits[row["task"]].append(reply == row["output"])
        prompt = render_prompt(row["instruction"], tokenizer, template)
        answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
        losses[row["task"]].append(float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt) :])))
    out = {task: {"exact": sum(v) / len(v), "loss": sum(losses[task]) / len(losses[task])} for task, v in hits.items()}
    every = [h for v in hits.values() for h in v]
    out["all"] = {"exact": sum(every) / len(every), "loss": sum(sum(v) for v in losses.values()) / len(every)}
    return out


def _table(before: dict, after: dict, n: dict) -> str:
    lines = ["| held-out task | prompts | exact match before | after | answer loss before | after |", "|---|---|---|---|---|---|"]
    for task in [t for t in before if t != "all"] + ["all"]:
        b, a = before[task], after[task]
        lines.append(
            f"| {task} | {n.get(task, sum(n.values()))} | {b['exact']:.0%} | {a['exact']:.0%} | {b['loss']:.2f} | {a['loss']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m packtune.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="folder for the copied config, work dir and model")
    parser.add_argument("--steps", type=int, default=None, help="override max_steps of the demo config")
    args = parser.parse_args(argv)
    os.environ.setdefault("PACKTUNE_CACHE", str(Path(args.out).resolve() / "cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    _say("1. the tiny configs of the catalog")
    _cli("list-cfg", "-p", "tiny")
    _say("2. copy one, and switch varlen attention on (as an XTuner user would)")
    _cli("copy-cfg", CONFIG, str(out))
    config = out / f"{CONFIG}_copy.py"
    text = re.sub(r"^use_varlen_attn = .*$", "use_varlen_attn = True", config.read_text(), flags=re.M)
    config.write_text(text)
    print(f"{config}: " + next(line for line in text.splitlines() if line.startswith("use_varlen_attn")))

    from packtune.config import load_settings
    from packtune.data import load_tokenizer
    from packtune.recipe.model_setup import load_base_model

    overrides = [f"max_steps={args.steps}"] if args.steps else []
    settings = load_settings(str(config), overrides)
    tokenizer = load_tokenizer(settings.tokenizer_name_or_path)
    rows = held_out()
    counts = defaultdict(int)
    for row in rows:
        counts[row["task"]] += 1
    _say(f"3. score the untrained model on {len(rows)} held-out prompts")
    import torch

    before = score(load_base_model(settings, torch.device("cpu")), tokenizer, rows, settings.prompt_template)
    print(f"exact match {before['all']['exact']:.0%}, answer loss {before['all']['loss']:.2f}")

    _say("4. train with packed rows and varlen attention")
    work = out / "work"
    _cli("train", str(config), "--work-dir", str(work), *(["--cfg-options", *overrides] if overrides else []))
    last = (work / "last_checkpoint").read_text().strip()

    _say("5. convert the checkpoint to a Hugging Face folder")
    hf = out / "hf"
    _cli("convert", "pth_to_hf", str(config), last, str(hf), *(["--cfg-options", *overrides] if overrides else []))

    _say("6. chat with the converted model (plain transformers, no packtune attention)")
    for prompt in ("Repeat after me: green castle song", "What noise does a duck make?"):
        _cli("chat", str(hf), "--prompt", prompt, "--max-new-tokens", "12")

    _say("7. what was learned: the converted model on the same held-out prompts")
    from transformers import AutoModelForCausalLM

    after = score(AutoModelForCausalLM.from_pretrained(hf), tokenizer, rows, settings.prompt_template)
    print(_table(before, after, counts))
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\ntraining loss {metrics[0]['loss']:.2f} -> {metrics[-1]['loss']:.2f} over {metrics[-1]['step']} steps; "
        f"loss curve: {work / 'loss_curve.png'}; total {minutes:.1f} min"
    )
    if not (after["all"]["exact"] > before["all"]["exact"] and after["all"]["loss"] < before["all"]["loss"]):
        print("demo: the model did not improve on the held-out prompts", file=sys.stderr)
        return 1
    return 0 if math.isfinite(after["all"]["loss"]) else 1


if __name__ == "__main__":
    sys.exit(main())
