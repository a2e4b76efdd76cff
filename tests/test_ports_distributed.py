"""A ported family trains the same under ZeRO-3 and FSDP2 on 2 processes as in 1 process.

The checkpoint is a tiny InternLM2 in its original layout (interleaved ``wqkv``), loaded
into each engine's sharded construction (each rank reads its own part of the original tensors,
slicing the fused ``wqkv``; ``test_sharded_weights.py`` checks those weights bit for bit). 2 processes x 1
accumulation step and 1 process x 2 take the same packs in every step, so the losses and the
final weights agree.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from ports_reference import write_checkpoint
from helpers import assert_ran, has_deepspeed, launch_env, run_command

from packtune.convert import read_checkpoint
from packtune.distributed import free_port

CONFIG = '''
pretrained_model_name_or_path = {model!r}
tokenizer_name_or_path = 'packtune://mistral-v1'
use_varlen_attn = True
pack_to_max_length = True
dataset = {data!r}
dataset_format = 'alpaca'
prompt_template = 'default'
max_length = 96
batch_size = 1
accumulative_counts = {accumulation}
max_steps = 2
lr = 1e-3
warmup_ratio = 0.0
save_steps = 2
evaluation_inputs = []
dtype = 'float32'
log_steps = 1
'''

ENGINES = {"zero3": ["--deepspeed", "deepspeed_zero3"], "fsdp": ["--fsdp"]}


def _train(tmp_path, name: str, nproc: int, engine_args: list[str], model, data, cache) -> tuple[list[dict], dict]:
    config = tmp_path / f"{name}.py"
    config.write_text(CONFIG.format(model=str(model), data=str(data), accumulation=2 // nproc))
    work = tmp_path / name
    cmd = [sys.executable, "-m", "packtune", "train", str(config), "--work-dir", str(work), *engine_args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", *cmd[1:], "--launcher", "pytorch"]
    rc, out, _ = run_command(cmd, launch_env(str(cache)))
    assert_ran(rc, out, name)
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return metrics, read_checkpoint(str(work / "iter_2.pth"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_ported_family_trains_the_same_sharded(engine, tmp_path):
    if engine == "zero3" and not has_deepspeed():
        pytest.skip("DeepSpeed is not installed")
    model, data, cache = tmp_path / "internlm2-tiny", tmp_path / "data.json", tmp_path / "cache"
    write_checkpoint(model, "internlm2", vocab_size=32000)
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))} for i in range(2, 14)]
    data.write_text(json.dumps(rows))
    one, one_state = _train(tmp_path, "one", 1, [], model, data, cache)
    two, two_state = _train(tmp_path, engine, 2, ENGINES[engine], model, data, cache)
    for a, b in zip(two, one, strict=True):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert set(two_state) == set(one_state)
    worst = max(float((two_state[k].float() - one_state[k].float()).norm() / one_state[k].float().norm().clamp(min=1e-12))
                for k in one_state)
    assert worst <= 1e-5, f"{engine}: worst tensor relative difference {worst:.3g}"
    # The run really trained: the weights moved away from the checkpoint's.
    assert any(not torch.equal(one_state[k], v) for k, v in _native_start(model).items() if k in one_state)


def _native_start(folder) -> dict:
    from packtune import load_model

    return {k: v.detach() for k, v in load_model(folder).state_dict().items()}
