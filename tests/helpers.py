"""Helpers shared by packtune's tests (fixtures live in ``conftest.py``).

* tiny models: ``tiny_config(model_type, **overrides)`` (a tiny, valid, dropout-free config of
  every family in ``FAMILIES``), ``tiny_model``, ``same_weights``; ``leaky_attention``, an
  attention that ignores document boundaries;
* data: ``naive_bfd`` (the textbook packing ``pack_plan`` must match), ``random_samples``;
* memory: ``Largest``, the largest tensor any operation returns;
* runs: ``TRAIN_OPTIONS`` (a tiny in-process training run), ``read_metrics``; subprocesses
  (``launch_env``, ``run_command``, ``assert_ran``) and ``has_deepspeed`` for multi-process runs.

Packed rows against each document alone: ``packed_reference.py``; the dense attention
reference: ``varlen_reference.py``; the ported families' reference: ``ports_reference.py``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import packtune  # noqa: F401  (registers the "packtune_varlen" attention)
from packtune.packing.packs import IGNORE_INDEX, TokenizedSamples

# --- tiny models ---------------------------------------------------------------------------

# Small but valid settings shared by every family: 64 hidden units, 4 heads, 128 tokens.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    attention_dropout=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# Per-family differences. ``sliding_window=4`` everywhere a family has one, so that documents
# longer than four tokens exercise the window.
_FAMILY = {
    "llama": dict(),
    "mistral": dict(sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": dict(head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "gemma": dict(head_dim=16),
    "gemma2": dict(
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=20.0,
        final_logit_softcapping=10.0,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gemma3_text": dict(
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi3": dict(sliding_window=4, resid_pdrop=0.0, embd_pdrop=0.0),
    "starcoder2": dict(sliding_window=4, residual_dropout=0.0, embedding_dropout=0.0),
    "olmo2": dict(),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,  # MLA: v head_dim differs from q/k (24)
        rope_interleave=True,
    ),
    "glm4": dict(head_dim=16),
}

# GPT-BigCode names everything differently.
_GPT_BIGCODE = dict(
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_inner=96,
    n_positions=256,
    vocab_size=128,
    multi_query=True,
    attn_pdrop=0.0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

FAMILIES = (*_FAMILY, "gpt_bigcode")
SLIDING = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "starcoder2")


def tiny_config(model_type: str, **overrides):
    """A fresh tiny config of ``model_type`` (a new object on every call: transformers mutates it)."""
    from transformers import AutoConfig

    if model_type == "gpt_bigcode":
        kwargs = {**_GPT_BIGCODE, **overrides}
    else:
        kwargs = {**_COMMON, **_FAMILY[model_type], **overrides}
    return AutoConfig.for_model(model_type, **copy.deepcopy(kwargs))


def tiny_model(model_type: str, attn_implementation: str = "eager", seed: int = 0, **overrides):
    """A tiny fp32 causal LM with random weights (seeded), on CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)


def same_weights(model, model_type: str, attn_implementation: str, **overrides):
    """A second model of the same family with ``model``'s weights and another attention."""
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_config(
        tiny_config(model_type, **overrides), attn_implementation=attn_implementation, dtype=torch.float32
    )
    other.load_state_dict(model.state_dict())
    return other


def leaky_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain causal attention over the whole row: ignores every document boundary."""
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


# --- data ------------------------------------------------------------------------------------


def naive_bfd(lengths, max_length):
    """Textbook best-fit decreasing, O(n^2): the specification pack_plan must match."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rooms, packs = [], []
    for i in order:
        best = None
        for b, room in enumerate(rooms):
            if room >= lengths[i] and (best is None or room < rooms[best]):
                best = b
        if best is None:
            rooms.append(max_length)
            packs.append([])
            best = len(rooms) - 1
        rooms[best] -= lengths[i]
        packs[best].append(i)
    return [sorted(p) for p in packs]


def random_samples(seed: int, n: int = 7, vocab: int = 96) -> TokenizedSamples:
    """``n`` random samples of 3-13 tokens (ids below ``vocab``), each with a masked prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(3, 14))
        prompt = int(rng.integers(1, length - 1))
        ids = rng.integers(1, vocab, length)
        labels = np.where(np.arange(length) < prompt, IGNORE_INDEX, ids)
        out.append((ids.tolist(), labels.tolist()))
    return TokenizedSamples.from_lists(out)


# --- memory ----------------------------------------------------------------------------------


class Largest(TorchDispatchMode):
    """Records the largest ``size(t)`` over every tensor an operation returns (forward and backward)."""

    def __init__(self, size=torch.Tensor.numel):
        super().__init__()
        self.size = size
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, self.size(t))
        return out


# --- runs ------------------------------------------------------------------------------------

TINY_MODEL = (
    "model_config={'model_type': 'mistral', 'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2, "
    "'num_attention_heads': 4, 'num_key_value_heads': 2, 'vocab_size': 32000, 'max_position_embeddings': 256}"
)
#: A tiny in-process training run: a random-init Mistral, short rows, a step per log line.
TRAIN_OPTIONS = [
    TINY_MODEL,
    "max_length=128",
    "batch_size=2",
    "max_samples=120",
    "log_steps=1",
    "save_total_limit=2",
    "evaluation_freq=1000",
    "warmup_ratio=0.0",
]


def read_metrics(work: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` in the work dir ``work``."""
    with open(os.path.join(work, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def has_deepspeed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


#: A multi-process run takes 15-25 s on 2 shared cores.
RUN_TIMEOUT = 300
#: What a launcher (torchrun, slurm) or a fault rehearsal sets, left out of a subprocess run.
LAUNCH_VARS = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PACKTUNE_DEBUG_RAISE")


def launch_env(cache: str, **extra) -> dict:
    """The environment of a subprocess run: this one without launcher variables, a data cache,
    one thread, DeepSpeed on the CPU."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(PACKTUNE_CACHE=cache, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def run_command(cmd: list[str], env: dict, timeout: float = RUN_TIMEOUT) -> tuple[int, str, float]:
    """``(exit code, output, seconds)`` of ``cmd``; a test failure when it runs past ``timeout``."""
    tic = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"{' '.join(cmd)} did not end within {timeout} s:\n{out[-4000:]}")
    return proc.returncode, proc.stdout, time.monotonic() - tic


def assert_ran(rc: int, out: str, what: str) -> None:
    """``what`` exited 0 and did not abort at exit."""
    assert rc == 0, f"{what} exited {rc}:\n{out[-6000:]}"
    assert "terminate called" not in out, f"{what} aborted at exit:\n{out[-3000:]}"


def randomize_constant_parameters(model: torch.nn.Module) -> None:
    """Random values for a model's parameters that initialise to one constant (norms aside), around
    it and at its scale: a learned per-head value at 0 (Doge's dynamic-mask A, attention sinks)
    hides what it drives, and a wrong or missing gradient of it; Doge's top-k over equal biases
    would break the tie by slot in the row. Scales kept small (nGPT-style 0.0177 x 56) stay small."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() <= 1 and p.numel() > 1 and bool((p == p.flatten()[0]).all()) and "norm" not in name:
                value = float(p.flatten()[0])
                p.normal_(value, 0.5 * (abs(value) or 1.0))
