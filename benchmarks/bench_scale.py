"""Peak memory per rank of building and loading a model under ZeRO-3 and FSDP2, new and today's.

    python benchmarks/bench_scale.py                      # ~300M Llama; about 10 minutes on 2 CPU cores
    python benchmarks/bench_scale.py --baseline-ref main  # "today" = the packtune of another git ref
    python benchmarks/bench_scale.py --layers 2           # a small model, to try the script

A random-init Llama of about 300M parameters (hidden 1024, 18 layers, 16 heads, intermediate
2816, vocabulary 32,000: 1.19 GB in fp32) is saved as a folder of 100 MB safetensors shards.
``packtune train`` then fine-tunes it with LoRA (so no full optimizer state exists) on 2
processes (torchrun, gloo, CPU) for one step, once per engine (DeepSpeed ZeRO-3, FSDP2), with
this tree's packtune and with today's (the source tree of ``--baseline-ref``, exported with
``git archive``). Each rank runs under a small wrapper that reports the peak resident memory
of its packtune process (``ru_maxrss`` of the waited child), so each figure covers the whole
run. The run stops when the first step starts (``PACKTUNE_DEBUG_RAISE=0:1``: rank 0 raises, rank 1
fails at its first collective), so the peak is that of starting, reading the data, and building
and loading the model; ``--step`` adds runs through the first step (info rows: the step's
gathered layers and activations come on top).

The fixed overhead is measured the same way: the same command on a tiny Llama (hidden 64,
2 layers: 8 MB of weights), same engine and code, so imports (torch, transformers,
DeepSpeed), the process group, the tokenizer and the data are in it and the model is not.
The goal: each rank's peak RSS stays below 0.75 x the fp32 model size + that overhead, i.e.
(peak - overhead) / model size < 0.75.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.75
#: The last commit before sharded construction: the "today" of issue 12's measurements.
DEFAULT_BASELINE = "8895def"
ENGINES = {"ZeRO-3": ["--deepspeed", "deepspeed_zero3"], "FSDP2": ["--fsdp"]}


def model_config(layers: int) -> dict:
    return dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=16, vocab_size=32000, max_position_embeddings=512,
                tie_word_embeddings=False)


TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False)

MAKE_MODEL = """
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from packtune.data import load_tokenizer
folder, config = sys.argv[1], json.loads(sys.argv[2])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
model.save_pretrained(folder, max_shard_size="100MB")
load_tokenizer("packtune://mistral-v1").save_pretrained(folder)
print(sum(p.numel() for p in model.parameters()))
"""


def wrapper(out: str, cmd: list[str]) -> int:
    """Run ``cmd`` (one rank) and write the peak RSS of it and its children to ``out``.

    torchrun stops the other ranks of a failed job with SIGTERM to this process: it passes the
    signal on and still reports the rank's peak once the child is gone."""
    child = subprocess.Popen(cmd)
    signal.signal(signal.SIGTERM, lambda sig, frame: child.send_signal(sig))
    code = child.wait()
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": int(rank), "peak_mb": peak_kb / 1024, "exit_code": code}, f)
    return code


def run_packtune(src: Path, folder: str, engine: list[str], work: str, cache: str, log, step: bool = False) -> list[float]:
    """One 2-process LoRA run with the packtune in ``src``, stopped when its first step starts
    (``step``: after it). Each rank's peak RSS (MiB) over the run (``peaks``) and, from
    packtune's own log, once the model was built and loaded (``loaded``; ``None`` in today's)."""
    out = tempfile.mkdtemp(prefix="rss-", dir=work)
    options = [f"pretrained_model_name_or_path={folder!r}", "model_config=None", "tokenizer_name_or_path=None",
               "lora={'r': 8, 'alpha': 16, 'dropout': 0.0}", "max_steps=1", "batch_size=1", "max_length=128",
               "evaluation_inputs=[]", "log_steps=1", "dtype='float32'"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "--no-python", sys.executable, str(Path(__file__).resolve()),
           "--wrap", out, "--", sys.executable, "-m", "packtune", "train", "tiny_llama_lora_demo",
           "--work-dir", os.path.join(work, "run"), *engine, "--launcher", "pytorch", "--cfg-options", *options]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(src), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               PACKTUNE_CACHE=cache, TOKENIZERS_PARALLELISM="false")
    if not step:
        # Stop when the first step starts: rank 0 raises (packtune's fault rehearsal), rank 1
        # fails at its first collective, before any forward. The peaks are then building and loading.
        env["PACKTUNE_DEBUG_RAISE"] = "0:1"
    tic = time.monotonic()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = "InjectedFault" in proc.stdout
    if (proc.returncode != 0) if step else not stopped:
        raise RuntimeError(f"{' '.join(engine)} with {src} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    peaks = []
    for rank in (0, 1):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            peaks.append(json.load(f)["peak_mb"])
    shutil.rmtree(os.path.join(work, "run"), ignore_errors=True)
    # packtune's own line once the engine holds the loaded model (this tree; not in today's).
    ready = re.search(r"model built and loaded \((\w+)\): peak host memory per rank ([\d., ]+) GiB", proc.stdout)
    loaded = [float(x) * 1024 for x in ready.group(2).split(",")] if ready else None
    log(f"  {' '.join(engine):28s} {str(src):45s} {'step 1' if step else 'setup':6s} peaks {peaks[0]:.0f} / {peaks[1]:.0f} MB"
        + (f", loaded ({ready.group(1)}) {loaded[0]:.0f} / {loaded[1]:.0f} MB" if loaded else "") + f" ({time.monotonic() - tic:.0f} s)")
    return {"peaks": peaks, "loaded": loaded}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_baseline(ref: str, into: str) -> Path | None:
    """The ``src`` folder of git ``ref`` of this repository, or ``None`` without git or the ref."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return Path(into) / "src"


def make_model(folder: str, config: dict, src: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", MAKE_MODEL, folder, json.dumps(config)], env=env, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=18, help="decoder layers of the big model (18: ~300M parameters)")
    parser.add_argument("--baseline-ref", default=DEFAULT_BASELINE, help="git ref of today's packtune ('' to skip it)")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    parser.add_argument("--step", action="store_true", help="also measure runs through their first step (info rows)")
    parser.add_argument("--wrap", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.wrap:
        return wrapper(args.wrap, rest[1:] if rest[:1] == ["--"] else rest)

    tic = time.monotonic()
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    work = tempfile.mkdtemp(prefix="bench-scale-")
    try:
        sources = {"new": ROOT / "src"}
        today = export_baseline(args.baseline_ref, work) if args.baseline_ref else None
        if today is not None:
            sources["today"] = today
        else:
            log(f"no source tree for --baseline-ref {args.baseline_ref!r}: today's rows are skipped")
        big, tiny, cache = (os.path.join(work, n) for n in ("big", "tiny", "cache"))
        params = make_model(big, model_config(args.layers), sources["new"])
        make_model(tiny, TINY, sources["new"])
        size_mb = params * 4 / 2**20
        log(f"model: {params / 1e6:.1f}M parameters, {size_mb:.0f} MB in fp32, "
            f"{len([n for n in os.listdir(big) if n.endswith('.safetensors')])} safetensors shards")
        runs = {}
        for engine, flags in ENGINES.items():
            for version, src in sources.items():
                runs[(engine, version)] = (run_packtune(src, tiny, flags, work, cache, log),
                                           run_packtune(src, big, flags, work, cache, log))
                if args.step:
                    runs[(engine, version, "step")] = (run_packtune(src, tiny, flags, work, cache, log, step=True),
                                                       run_packtune(src, big, flags, work, cache, log, step=True))
        table = render(runs, size_mb, params, args, time.monotonic() - tic)
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(runs: dict, size_mb: float, params: int, args, seconds: float) -> str:
    lines = [
        "| engine, until | packtune | peak RSS rank 0 / rank 1 | fixed overhead | (peak - overhead) / model size | goal | result |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(engine, version, what, tiny, big, goal):
        ratio = (max(big) - max(tiny)) / size_mb
        label = "this tree" if version == "new" else f"today ({args.baseline_ref})"
        verdict = ("PASS" if ratio < GOAL else "FAIL") if goal else "info"
        lines.append(f"| {engine}, {what} | {label} | {big[0]:.0f} / {big[1]:.0f} MiB | {max(tiny):.0f} MiB | "
                     f"**{ratio:.2f}x** | {f'< {GOAL}' if goal else '-'} | {verdict} |")

    for key, (tiny, big) in runs.items():
        engine, version = key[:2]
        if len(key) == 3:
            row(engine, version, "end of step 1", tiny["peaks"], big["peaks"], False)
        elif version == "new":
            row(engine, version, "model built and loaded", tiny["loaded"], big["loaded"], True)
            row(engine, version, "first step starts", tiny["peaks"], big["peaks"], False)
        else:
            row(engine, version, "first step starts (= built and loaded)", tiny["peaks"], big["peaks"], False)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += [
        "",
        f"Llama {params / 1e6:.0f}M parameters ({size_mb:.0f} MiB in fp32, {args.layers} layers) saved in 100 MB "
        "safetensors shards; LoRA r=8, 2 processes (torchrun, gloo, CPU). 'Model built and loaded': each rank's "
        "peak RSS when the engine holds the loaded model, as packtune logs it (the ZeRO-3 leak check, run before "
        "the engine one module at a time, is in it). 'First step starts': ru_maxrss of each rank's process, stopped "
        "there (adds the FSDP2 leak check, a forward through the sharded model; today's code checks the whole model "
        "before sharding, so for it this is its build and load). Fixed overhead: the same, on an 8 MB Llama. "
        f"Load average {load}; whole benchmark {seconds / 60:.1f} min.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
