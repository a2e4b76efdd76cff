"""Peak memory per rank of building and loading a model under ZeRO-3 and FSDP2, at 2 and 4 processes.

    python benchmarks/bench_scale.py                         # about 10 minutes on 2 CPU cores
    python benchmarks/bench_scale.py --layers 2 --small-layers 2   # small models, to try the script
    python benchmarks/bench_scale.py --procs 2 --engines ZeRO-3      # one block of rows

Random-init models saved as folders of 100 MB safetensors shards: at 2 processes a Llama of
about 300M parameters (hidden 1024, 18 layers, 16 heads, intermediate 2816, vocabulary
32,000: 1.19 GB in fp32) and an InternLM2 of the same sizes in its original layout (fused,
interleaved ``wqkv``; a ported family); at 4 processes (8 processes' worth of work on 2 cores
is slow) a smaller Llama of the same widths with ``--small-layers`` layers (8: 166M parameters,
0.67 GB). ``packtune train`` fine-tunes each with LoRA (so no full optimizer state exists) on
N processes (torchrun, gloo, CPU), once per engine (DeepSpeed ZeRO-3, FSDP2), stopped when
the first step starts (``PACKTUNE_DEBUG_RAISE=0:1``: rank 0 raises, the others fail at their
first collective).

Two figures per rank: packtune's own log line once the model is built and loaded (``model
built and loaded (...): peak host memory per rank ...``: ``VmHWM``; for ZeRO-3 before the
varlen leak check and the DeepSpeed engine, for FSDP2 once the engine holds the loaded shards,
before the leak check), and the peak resident memory of the whole process until the first
step (``ru_maxrss`` of the waited child, through a small wrapper; it adds the varlen leak
check, a forward through the sharded model). The fixed overhead is measured the same way on a
tiny model of the same family (hidden 64, 2 layers, same vocabulary: 8 MB), same engine and
process count, so imports (torch, transformers, DeepSpeed), the process group, the tokenizer
and the data are in it and the model is not. The goal, on the build-and-load figure:
(peak - overhead) / model size <= 0.6 at 2 processes and <= 0.35 at 4 (the ideal: 1/N), and
InternLM2 within 0.05 of Llama.
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
GOALS = {2: 0.6, 4: 0.35}
#: How close the ported family must come to Llama at the same size.
PORTED_MARGIN = 0.05
ENGINES = {"ZeRO-3": ["--deepspeed", "deepspeed_zero3"], "FSDP2": ["--fsdp"]}
FAMILIES = ("llama", "internlm2")


def model_config(layers: int, hidden: int = 1024, intermediate: int = 2816, heads: int = 16) -> dict:
    return dict(model_type="llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000, max_position_embeddings=512,
                tie_word_embeddings=False)


TINY = model_config(2, hidden=64, intermediate=128, heads=4)

MAKE_MODEL = """
import json, os, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
folder, family, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
if family == "llama":
    model.save_pretrained(folder, max_shard_size="100MB")
else:  # the same weights in InternLM2's original layout, as published checkpoints are
    from packtune.ports.detect import PORTS
    from packtune.ports.files import write_weights
    original = {k: v for k, v in config.items() if k not in ("model_type", "num_key_value_heads")}
    original.update(model_type="internlm2", architectures=["InternLM2ForCausalLM"], bias=False, rope_theta=10000,
                    num_key_value_heads=config["num_key_value_heads"], rms_norm_eps=1e-6, torch_dtype="float32",
                    auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                              "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"})
    state = PORTS["internlm2"].layout(original).to_original(model.state_dict())
    write_weights(state, folder, "safetensors", "100MB")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(original, f)
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


def run_packtune(folder: str, nproc: int, engine: list[str], work: str, cache: str, log) -> dict:
    """One N-process LoRA run, stopped when its first step starts: each rank's peak RSS (MiB)
    over the run (``peaks``) and, from packtune's own log, once the model was built and loaded
    (``loaded``)."""
    out = tempfile.mkdtemp(prefix="rss-", dir=work)
    options = [f"pretrained_model_name_or_path={folder!r}", "model_config=None", "tokenizer_name_or_path='packtune://mistral-v1'",
               "lora={'r': 8, 'alpha': 16, 'dropout': 0.0}", "max_steps=1", "batch_size=1", "max_length=128",
               "evaluation_inputs=[]", "log_steps=1", "dtype='float32'"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "--no-python", sys.executable, str(Path(__file__).resolve()),
           "--wrap", out, "--", sys.executable, "-m", "packtune", "train", "tiny_llama_lora_demo",
           "--work-dir", os.path.join(work, "run"), *engine, "--launcher", "pytorch", "--cfg-options", *options]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               PACKTUNE_CACHE=cache, TOKENIZERS_PARALLELISM="false", PACKTUNE_DEBUG_RAISE="0:1")
    tic = time.monotonic()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if "InjectedFault" not in proc.stdout:
        raise RuntimeError(f"{' '.join(engine)} on {folder} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    peaks = []
    for rank in range(nproc):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            peaks.append(json.load(f)["peak_mb"])
    shutil.rmtree(os.path.join(work, "run"), ignore_errors=True)
    ready = re.search(r"model built and loaded \((\w+)\): peak host memory per rank ([\d., ]+) GiB", proc.stdout)
    if ready is None:
        raise RuntimeError(f"no 'model built and loaded' line in the log of {' '.join(engine)} on {folder}:\n{proc.stdout[-3000:]}")
    loaded = [float(x) * 1024 for x in ready.group(2).split(",")]
    log(f"  {nproc} x {' '.join(engine):28s} {os.path.basename(folder):16s} ({ready.group(1)}) loaded "
        f"{' / '.join(f'{x:.0f}' for x in loaded)} MiB, until step 1 {' / '.join(f'{x:.0f}' for x in peaks)} MiB "
        f"({time.monotonic() - tic:.0f} s)")
    return {"peaks": peaks, "loaded": loaded, "how": ready.group(1)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(folder: str, family: str, config: dict) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", MAKE_MODEL, folder, family, json.dumps(config)], env=env, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=18, help="layers of the 2-process models (18: ~300M parameters)")
    parser.add_argument("--small-layers", type=int, default=8, help="layers of the 4-process Llama (8: 166M parameters)")
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 4], choices=sorted(GOALS))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES), help="engines to measure")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    parser.add_argument("--wrap", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.wrap:
        return wrapper(args.wrap, rest[1:] if rest[:1] == ["--"] else rest)

    tic = time.monotonic()
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    work = tempfile.mkdtemp(prefix="bench-scale-")
    try:
        cache = os.path.join(work, "cache")
        plans = {2: (FAMILIES, args.layers), 4: (("llama",), args.small_layers)}
        results = []
        for nproc in args.procs:
            families, layers = plans[nproc]
            for family in families:
                tiny, big = os.path.join(work, f"{family}-tiny"), os.path.join(work, f"{family}-{layers}")
                if not os.path.isdir(tiny):
                    make_model(tiny, family, TINY)
                params = make_model(big, family, model_config(layers))
                log(f"{family}: {params / 1e6:.1f}M parameters ({layers} layers), {params * 4 / 2**20:.0f} MiB in fp32")
                for engine in args.engines:
                    flags = ENGINES[engine]
                    results.append({"procs": nproc, "engine": engine, "family": family, "layers": layers, "params": params,
                                    "tiny": run_packtune(tiny, nproc, flags, work, cache, log),
                                    "big": run_packtune(big, nproc, flags, work, cache, log)})
        table = render(results, time.monotonic() - tic)
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ratio(result: dict, what: str) -> float:
    """(peak - fixed overhead) / model size, the worst rank of each."""
    size_mb = result["params"] * 4 / 2**20
    return (max(result["big"][what]) - max(result["tiny"][what])) / size_mb


def render(results: list[dict], seconds: float) -> str:
    lines = [
        "| processes | engine | model | built as | built and loaded, per rank | fixed overhead | (peak - overhead) / model | goal | result "
        "| until step 1 (leak check in) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["procs"], r["engine"], r["family"]): r for r in results}
    for r in results:
        goal = GOALS[r["procs"]]
        loaded = ratio(r, "loaded")
        size = r["params"] * 4 / 2**30
        lines.append(
            f"| {r['procs']} | {r['engine']} | {r['family']} {r['params'] / 1e6:.0f}M ({size:.2f} GiB) | {r['big']['how']} | "
            f"{' / '.join(f'{x:.0f}' for x in r['big']['loaded'])} MiB | {max(r['tiny']['loaded']):.0f} MiB | "
            f"**{loaded:.2f}x** | <= {goal} | {'PASS' if loaded <= goal else 'FAIL'} | {ratio(r, 'peaks'):.2f}x |")
    notes = []
    for (nproc, engine, family), r in by_key.items():
        llama = by_key.get((nproc, engine, "llama"))
        if family != "llama" and llama is not None:
            gap = ratio(r, "loaded") - ratio(llama, "loaded")
            notes.append(f"{engine}, {nproc} processes: {family} - llama = {gap:+.3f}x "
                         f"({'PASS' if abs(gap) <= PORTED_MARGIN else 'FAIL'}, goal within {PORTED_MARGIN})")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += ["", *(f"- {n}" for n in notes), "",
              "LoRA r=8, 100 MB safetensors shards, torchrun + gloo on the CPU. 'Built and loaded': packtune's log line "
              "(VmHWM) once every rank holds its part of the loaded model; 'until step 1': ru_maxrss of each rank's process "
              "up to the first step (adds the varlen leak check, a forward through the sharded model). Fixed overhead: "
              f"the same on an 8 MB model of the same family. Load average {load}; whole benchmark {seconds / 60:.1f} min."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
