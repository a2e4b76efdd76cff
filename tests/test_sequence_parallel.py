"""Ulysses sequence parallelism over packed varlen rows (issue 11, section 1).

Unit tests (one process, exact values): how a row is padded and cut into shards, global
positions and the whole row's ``cu_seqlens`` on every shard, targets and loss weights cut
after they are computed on the whole row, the KV-head layout per rank, and the one-line
errors (config, command line, models that mix tokens outside attention).

Equivalence (``sequence_parallel_worker.py`` under torchrun, gloo): with sp = 2 and sp = 4
processes, the logits and the gradient of every parameter of llama, qwen2, mistral (sliding
window 4), gemma2 (soft-capping), gpt_bigcode (MQA: 1 KV head) and glm (partial rotary)
equal one process, rel 1e-5, on a row of 6 documents that cross the shards (llama also with
activation checkpointing, which runs the all-to-alls again in backward). The ``gpu``
tests run the same worker on NCCL (a world of one, and every card).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from packtune.config import ConfigError, Settings
from packtune.loss import target_weights
from packtune.packing.collate import collate_padded, collate_varlen
from packtune.packing.packs import IGNORE_INDEX, build_packs
from packtune.parallel.groups import SequenceParallel, SequenceParallelError
from packtune.parallel.limits import check_splittable
from packtune.parallel.sequence_shards import shard_bounds, shard_micro_batch
from packtune.config.sizes import heads_problem, world_problem
from packtune.attention.hf import SP_KWARG
from packtune.parallel.ulysses import kv_head_table

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "sequence_parallel_worker.py")
SRC = os.path.join(os.path.dirname(HERE), "src")
X = IGNORE_INDEX


def _row():
    """Documents a (5 tokens, 3 trained targets) and b (2 tokens, 1), padded for sp = 2."""
    samples = [([10, 11, 12, 13, 14], [X, X, 12, 13, 14]), ([20, 21], [X, 21])]
    packs, _ = build_packs(samples, max_length=8, strategy="sequential")
    return collate_varlen(packs, pad_to_multiple_of=2, pad_token_id=0)


def test_row_is_padded_with_a_document_of_its_own():
    row = _row()
    assert row.input_ids.tolist() == [[10, 11, 12, 13, 14, 20, 21, 0]]
    assert row.labels.tolist() == [[X, X, 12, 13, 14, X, 21, X]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 0]]
    assert row.cu_seqlens.tolist() == [0, 5, 7, 8]
    assert (row.padding, row.num_tokens) == (1, 7)  # the padding is not a real token
    assert collate_varlen(build_packs([([1, 2], [X, 2])], 4)[0], pad_to_multiple_of=2).padding == 0


def test_shards_hold_global_positions_and_the_whole_rows_documents():
    row = _row()
    targets, weights = target_weights(row.labels, row.cu_seqlens, "sample")
    want = {
        # input_ids, position_ids, targets, weights, real tokens
        0: ([10, 11, 12, 13], [0, 1, 2, 3], [X, 12, 13, 14], [0, 1 / 3, 1 / 3, 1 / 3], 4),
        1: ([14, 20, 21, 0], [4, 0, 1, 0], [X, 21, X, X], [0, 1, 0, 0], 3),
    }
    for rank, (ids, pos, tgt, w, real) in want.items():
        shard, t, sw = shard_micro_batch(row, targets, weights, SequenceParallel(size=2, rank=rank, group=None))
        assert shard.input_ids.tolist() == [ids]
        assert shard.position_ids.tolist() == [pos]  # rotary positions of the whole row
        assert shard.labels.tolist() == [row.labels[0, rank * 4 : rank * 4 + 4].tolist()]
        # Shard 0's last target is the first label of shard 1; doc a's 3 targets weigh 1/3
        # each although they sit on two ranks.
        assert t.tolist() == tgt and sw.tolist() == pytest.approx(w)
        assert shard.num_tokens == real
        inputs = shard.model_inputs()
        assert set(inputs) == {"input_ids", "position_ids", SP_KWARG}  # no cu_seq_lens of the shard
        context = inputs[SP_KWARG]
        assert context.cu_seqlens.host == (0, 5, 7, 8) and context.max_seqlen == 5
        assert context.cu_seqlens.tensor.dtype == torch.int32  # validated once, as the kernels take it
        assert (context.size, context.rank, context.total) == (2, rank, 8)
        moved = shard.to("cpu").sequence_parallel  # a sharded batch moves with its validated boundaries
        assert moved.cu_seqlens.host == (0, 5, 7, 8) and moved.cu_seqlens.tensor.tolist() == [0, 5, 7, 8]


def test_a_row_that_does_not_split_evenly_is_an_error():
    odd = collate_varlen(build_packs([([1, 2, 3], [X, 2, 3])], 4)[0])
    targets, weights = target_weights(odd.labels, odd.cu_seqlens)
    with pytest.raises(ValueError, match=r"3 tokens cannot be cut into 2 equal shards.*pad_to_multiple_of=2"):
        shard_micro_batch(odd, targets, weights, SequenceParallel(size=2, rank=0, group=None))
    padded = collate_padded(build_packs([([1, 2], [X, 2]), ([3, 4], [X, 4])], 2, "none")[0])
    targets, weights = target_weights(padded.labels, padded.cu_seqlens)
    with pytest.raises(ValueError, match="one flattened varlen row"):
        shard_micro_batch(padded, targets, weights, SequenceParallel(size=2, rank=0, group=None))
    assert shard_bounds(48, 4, 3) == (36, 48)


@pytest.mark.parametrize(
    "heads, kv_heads, size, table",
    [
        (4, 4, 2, [[0, 1], [2, 3]]),  # MHA: two heads each
        (8, 2, 2, [[0], [1]]),  # GQA, KV heads split evenly
        (4, 1, 2, [[0], [0]]),  # MQA: the KV head replicated
        (4, 2, 4, [[0], [0], [1], [1]]),  # fewer KV heads than ranks
        (6, 3, 2, [[0, 0, 1], [1, 2, 2]]),  # a rank's query heads straddle KV heads: one each
        (12, 3, 4, [[0, 0, 0], [0, 1, 1], [1, 1, 2], [2, 2, 2]]),
    ],
)
def test_kv_head_table(heads, kv_heads, size, table):
    assert kv_head_table(heads, kv_heads, size) == table
    q = heads // size
    for rank, row in enumerate(table):  # local query head i uses local KV head i // (q / k)
        for i in range(q):
            assert row[i // (q // len(row))] == (rank * q + i) // (heads // kv_heads)


def test_size_errors_name_the_sizes_that_work():
    assert world_problem(3, 8) == "sequence_parallel_size = 3 does not divide the 8 processes; valid sizes: 1, 2, 4, 8"
    assert world_problem(4, 8) is None
    assert heads_problem(4, 6, 8) == "sequence_parallel_size = 4 does not divide the 6 query heads; valid sizes with 8 processes: 1, 2"
    with pytest.raises(ValueError, match="does not divide the 4 query heads; valid sizes: 1, 2, 4"):
        kv_head_table(4, 2, 3)


def test_config_setting():
    base = dict(dataset="packtune://demo_tasks.jsonl", tokenizer_name_or_path="packtune://mistral-v1",
                model_config=dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2))
    assert Settings(**base).sequence_parallel_size == 1
    assert Settings(**base, sequence_parallel_size=2).sequence_parallel_size == 2
    with pytest.raises(ConfigError) as err:
        Settings(**base, sequence_parallel_size=3)
    assert "`model_config`: sequence_parallel_size = 3 does not divide the 4 query heads; valid sizes: 1, 2, 4" in str(err.value)
    with pytest.raises(ConfigError, match="`sequence_parallel_size = 2` shards packed varlen rows, but `use_varlen_attn = False`"):
        Settings(**base, sequence_parallel_size=2, use_varlen_attn=False, pack_to_max_length=False)
    with pytest.raises(ConfigError, match="`sequence_parallel_size` must be an int >= 1, got 0"):
        Settings(**base, sequence_parallel_size=0)


def test_command_line_refuses_a_world_it_cannot_split(monkeypatch, capsys):
    from packtune.cli.main import main

    for name in ("RANK", "WORLD_SIZE", "NNODES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NPROC_PER_NODE", "6")  # the tiny model's 4 query heads split 4 ways, 6 processes do not
    assert main(["train", "tiny_mistral_full_demo", "--cfg-options", "sequence_parallel_size=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("sequence_parallel_size = 4 does not divide the 6 processes; valid sizes: 1, 2, 3, 6 (NPROC_PER_NODE x NNODES)")
    assert len(err.splitlines()) == 1


def _tiny(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64, **extra)
    return AutoModelForCausalLM.from_config(config)


def test_models_that_mix_tokens_outside_attention_are_refused_in_one_line():
    check_splittable(_tiny("llama"), 2, 4)  # attention is the only place tokens meet
    with pytest.raises(SequenceParallelError) as err:
        check_splittable(_tiny("lfm2", layer_types=["conv", "full_attention"]), 2, 4)
    assert str(err.value) == (
        "sequence_parallel_size = 2 cannot split Lfm2ForCausalLM: it mixes tokens outside attention "
        "(its config's layer_types has 'conv' layers), where a rank sees only its shard of a row; "
        "set sequence_parallel_size = 1"
    )
    # Found by module type too, whatever the config says.
    model = _tiny("llama")
    model.model.layers[1].mixer = torch.nn.Conv1d(32, 32, 3, groups=32)
    with pytest.raises(SequenceParallelError, match=r"\(its layer model.layers.1.mixer is a Conv1d\)"):
        check_splittable(model, 2)
    with pytest.raises(SequenceParallelError, match="^LlamaForCausalLM: sequence_parallel_size = 3 does not divide the 4 "
                       "query heads; valid sizes with 6 processes: 1, 2$"):
        check_splittable(_tiny("llama"), 3, 6)
    check_splittable(model, 1)  # no sequence parallelism: nothing to refuse


def test_boundary_hook_leaves_a_shard_to_its_context():
    from packtune.attention.hf import attach_boundaries

    kwargs = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "position_ids": torch.tensor([[4, 0, 1, 0]]), SP_KWARG: object()}
    assert attach_boundaries(None, (), kwargs) is None and "cu_seq_lens_q" not in kwargs


# --- several processes ---------------------------------------------------------------------------


def _launch(nproc: int, out: str, *extra: str, timeout: float = 400) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", WORKER, out, *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=SRC + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:]
    with open(out) as f:
        return json.load(f)


def _free_port() -> int:
    from packtune.distributed import free_port

    return free_port()


FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "gpt_bigcode", "glm", "llama+checkpointing")


@pytest.mark.slow
@pytest.mark.parametrize("sp", [2, 4])
def test_logits_and_gradients_equal_one_process(sp, tmp_path):
    report = _launch(sp, str(tmp_path / "report.json"))
    assert report["sp"] == sp and tuple(report["families"]) == FAMILIES
    for family, errors in report["families"].items():
        for what, value in errors.items():
            assert value <= 1e-5, f"sp={sp} {family} {what}: rel {value:.3g}"
    assert len(report["attention"]) >= 5 and max(report["attention"].values()) <= 1e-5
    print(f"\nsp={sp}: worst relative error {report['worst']:.2e}")


def _cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
def test_nccl_all_to_all_on_a_world_of_one(tmp_path):
    """The Ulysses path (all-to-alls included) on NCCL with one card: a group of one."""
    report = _launch(1, str(tmp_path / "report.json"), "--device", "cuda", "--tolerance", "1e-4")
    assert report["sp"] == 1 and report["worst"] <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_devices() < 2, reason="needs at least 2 CUDA devices")
def test_nccl_all_to_all_on_every_card(tmp_path):
    """sp = every card (at most 4): logits and gradients on NCCL equal one card (fp32, TF32 off)."""
    sp = max(d for d in (2, 4) if d <= _cuda_devices())
    report = _launch(sp, str(tmp_path / "report.json"), "--device", "cuda", "--tolerance", "1e-4")
    assert report["sp"] == sp and report["worst"] <= 1e-4
