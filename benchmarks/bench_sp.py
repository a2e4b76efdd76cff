"""Sequence parallelism (Ulysses) on one long packed row: memory per rank, step time, traffic.

    python benchmarks/bench_sp.py                    # 32k tokens, sp = 1, 2, 4 on the CPU (gloo)
    python benchmarks/bench_sp.py --device cuda      # NCCL, one GPU per rank (sp = 4 needs 4 GPUs)
    python benchmarks/bench_sp.py --tokens 8192 --sizes 1 2 --out benchmarks/results-sp.md

Each size runs in fresh processes under torchrun (``sp`` ranks, one sequence-parallel group):
a 2-layer Llama (hidden 128, 4 query heads, 2 KV heads, vocabulary 2,048) trains one step on
one packed row of long-tail documents (at most 4,096 tokens each), every token trained,
through packtune's own step (``accumulate_gradients``, the DDP engine, AdamW). Printed:

* peak memory per rank of that training step, sp = 1, 2, 4: growth of the peak RSS over
  the step (CPU; fresh processes, after a warm-up step on a short row) or
  ``max_memory_allocated`` (CUDA). Parameters and optimizer state are allocated before, so
  this is the step's activation and gradient memory; the goal is about 1/sp per rank;
* sp = 2 against sp = 1 on the same row: the time of a step (best of ``--repeats``), the
  all-to-all volume per layer (bytes each rank sends to the others, from the buffers'
  shapes), and where the time goes: attention (``varlen_attn_func`` forward and backward
  over the whole row with this rank's heads) and the all-to-alls (the 4 forward and 4
  backward of a layer), each timed alone in the same processes, times the layers; the rest
  (embeddings, MLPs, head, loss, gradient sync, optimizer) is the step minus those.

On the CPU every rank gets one thread (``--threads``), as every rank gets one GPU: sp = 2
uses twice the hardware of sp = 1, and the ideal step time is half. With more ranks than
cores (sp = 4 on 2 cores) the time is not comparable and only memory is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench_common import Settings, longtail_lengths, machine, synchronize
from bench_model import _llama_config, _make_model, _pythonpath, _samples, measure_peak

GOAL = 1.5  # sp = N must use at most GOAL / N of sp = 1's memory per rank (1.0 = exactly 1/N)
MAX_DOC = 4096


def _row(tokens: int, vocab: int, sp: int, device):
    from packtune.packing.collate import collate_varlen
    from packtune.packing.packs import get_pack, layout_packs

    docs = max(1, round(tokens / 160))  # ~25 documents per 4k, as bench.py's packs
    lengths = longtail_lengths(tokens, docs, seed=1, max_len=MAX_DOC)
    samples = _samples(lengths, vocab)
    layout, _ = layout_packs(samples, max_length=tokens, strategy="sequential")
    return collate_varlen([get_pack(samples, layout, 0)], pad_to_multiple_of=sp).to(device), lengths


def _engine(model, env, dtype):
    from packtune.recipe.engines.plain import DDPEngine, PlainEngine

    settings = SimpleNamespace(max_norm=1.0, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_ratio=0.0,
                               lora=None, model_config=None)
    cls = DDPEngine if env.world_size > 1 else PlainEngine
    return cls(model, env, settings, total_steps=100, compute_dtype=dtype)


def _timed(fn, device: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def child(args) -> None:
    """One rank: a warm-up step, the measured step, then the timings (rank 0 prints JSON)."""
    import torch.distributed as dist

    from packtune.distributed import DistEnv
    from packtune.parallel.groups import init_sequence_parallel
    from packtune.parallel.ulysses import heads_to_seq, kv_head_table, seq_to_heads
    from packtune.recipe.step import accumulate_gradients

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    env = DistEnv(rank=rank, world_size=world, local_rank=local, device=device)
    sp = init_sequence_parallel(world, rank, world, device.type) if world > 1 else None

    torch.manual_seed(0)
    cfg = _llama_config(Settings("full"), layers=2, max_positions=args.tokens)
    model = _make_model(cfg, "packtune_varlen", device.type, torch.float32)
    engine = _engine(model, env, torch.float32)
    row, lengths = _row(args.tokens, cfg.vocab_size, world, device)
    warm, _ = _row(256, cfg.vocab_size, world, device)

    def step(batch):
        accumulate_gradients(engine, [batch], "token", sequence_parallel=sp)
        engine.step()

    step(warm)  # kernels, allocator, optimizer state
    _, peak, _, first = measure_peak(args.device, lambda: step(row))
    step_s = min(first, _timed(lambda: step(row), args.device, args.repeats - 1)) if args.repeats > 1 else first

    # Where the time goes: one layer's attention and all-to-alls, timed alone.
    from packtune.attention.varlen import varlen_attn_func

    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = cfg.hidden_size // heads
    total = row.input_ids.shape[1]
    local_len = total // world
    mine = heads // world
    kv_mine = len(kv_head_table(heads, kv_heads, world)[0])
    q = torch.randn(total, mine, dim, device=device, requires_grad=True)
    kv = torch.randn(total, kv_mine, dim, device=device, requires_grad=True)
    grad = torch.randn(total, mine, dim, device=device)

    def attention():
        out = varlen_attn_func(q, kv, kv, row.cu_seqlens, row.cu_seqlens, row.max_seqlen, row.max_seqlen, causal=True)
        out.backward(grad)

    attention_s = _timed(attention, args.device, args.repeats)
    sent = 0  # bytes this rank sends to the others per layer, forward (the backward sends as much)
    all_to_all_s = 0.0
    if sp is not None:
        shard_q = torch.randn(local_len, heads, dim, device=device, requires_grad=True)
        shard_kv = torch.randn(local_len, world * kv_mine, dim, device=device, requires_grad=True)
        out_grad = torch.randn(local_len, heads, dim, device=device)

        def all_to_alls():  # q, k, v to heads; the output back; and the 4 backward ones
            full = [seq_to_heads(t, sp.group, world) for t in (shard_q, shard_kv, shard_kv)]
            back = heads_to_seq(full[0] * 1.0, sp.group, world)
            torch.autograd.backward([back, *full[1:]], [out_grad, *(torch.zeros_like(f) for f in full[1:])])

        all_to_all_s = _timed(all_to_alls, args.device, args.repeats)
        buffers = 2 * shard_q.numel() + 2 * shard_kv.numel()  # q and the output; k and v
        sent = buffers * 4 * (world - 1) // world
    layers = cfg.num_hidden_layers
    result = {
        "rank": rank, "peak_mb": peak / 2**20, "step_s": step_s, "first_step_s": first,
        "attention_s": attention_s * layers, "all_to_all_s": all_to_all_s * layers,
        "sent_mb_per_layer": sent / 2**20, "threads": args.threads,
    }
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        info = {"sp": world, "tokens": total, "docs": len(lengths), "max_doc": max(lengths), "ranks": results,
                "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "vocab": cfg.vocab_size}
        print("RESULT " + json.dumps(info), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def launch(sp: int, args) -> dict:
    from packtune.distributed import free_port

    threads = args.threads or 1
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={sp}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, "--child", "--tokens", str(args.tokens), "--device", args.device,
           "--threads", str(threads), "--repeats", str(args.repeats)]
    # Passive OpenMP waits, as bench.py: spinning threads steal the cores of the other ranks.
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"sp={sp} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def render(results: dict[int, dict], args, seconds: float) -> str:
    one = results[min(results)]
    peak = {sp: max(r["peak_mb"] for r in res["ranks"]) for sp, res in results.items()}
    cores = os.cpu_count() or 1
    lines = [
        f"One packed row of {one['tokens']:,} tokens ({one['docs']} documents, longest {one['max_doc']:,}); Llama "
        f"{one['layers']} layers, hidden {one['heads'] * one['head_dim']}, {one['heads']} query heads / {one['kv_heads']} KV heads "
        f"(head_dim {one['head_dim']}), vocabulary {one['vocab']:,}, float32, every token trained; {args.device}.",
        "",
        "| sp | ranks | peak memory per rank of a training step | vs sp = 1 | goal (about 1/sp) | result |",
        "|---|---|---|---|---|---|",
    ]
    for sp, res in sorted(results.items()):
        ratio = peak[sp] / peak[1] if 1 in peak else float("nan")
        ok = ratio <= GOAL / sp
        lines.append(f"| {sp} | {sp} | {peak[sp]:.0f} MB | {ratio:.2f}x (1/sp = {1 / sp:.2f}) | <= {GOAL / sp:.2f}x | "
                     f"{'PASS' if ok else 'FAIL'} |")
    if 1 in results and 2 in results:
        a, b = results[1]["ranks"][0], max(results[2]["ranks"], key=lambda r: r["step_s"])
        rest = lambda r: r["step_s"] - r["attention_s"] - r["all_to_all_s"]  # noqa: E731
        lines += [
            "",
            f"| one {one['tokens']:,}-token row ({a['threads']} thread{'s' if a['threads'] > 1 else ''} per rank) | sp = 1 | sp = 2 (slowest rank) |",
            "|---|---|---|",
            f"| step (forward, backward, gradient sync, AdamW) | {a['step_s'] * 1e3:.0f} ms | {b['step_s'] * 1e3:.0f} ms ({b['step_s'] / a['step_s']:.2f}x) |",
            f"| attention (`varlen_attn_func` fwd+bwd, whole row; all heads / this rank's heads) | {a['attention_s'] * 1e3:.0f} ms | {b['attention_s'] * 1e3:.0f} ms |",
            f"| all-to-alls (4 forward + 4 backward per layer) | - | {b['all_to_all_s'] * 1e3:.0f} ms |",
            f"| the rest (embeddings, MLPs, head and loss on the shard; gradient sync; AdamW) | {rest(a) * 1e3:.0f} ms | {rest(b) * 1e3:.0f} ms |",
            f"| all-to-all volume per layer, sent by each rank to the other | - | {b['sent_mb_per_layer']:.1f} MB forward + {b['sent_mb_per_layer']:.1f} MB backward |",
        ]
    m = machine(args.device)
    lines += ["", f"Measured on {m['cpu']}, {cores} cores, {m.get('memory', '?')} RAM, load average {m['load_average']}; "
              f"torch {m['torch']}, transformers {m['transformers']}; {m['date']}; whole run {seconds:.0f} s."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768, help="tokens of the packed row (default 32768)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="sequence_parallel_size values (default 1 2 4)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best kept)")
    parser.add_argument("--threads", type=int, help="torch threads per rank (default 1)")
    parser.add_argument("--out", type=Path, help="also write the table here (and the raw numbers next to it as .json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    tic = time.perf_counter()
    results = {}
    for sp in args.sizes:
        print(f"sp = {sp} ...", file=sys.stderr, flush=True)
        results[sp] = launch(sp, args)
    table = render(results, args, time.perf_counter() - tic)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
