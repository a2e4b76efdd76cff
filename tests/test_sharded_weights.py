"""Every rank of a sharded build ends with exactly the weights one process loads, to the bit.

2 processes (torchrun, gloo, ``DS_ACCELERATOR=cpu``), ZeRO-3 and FSDP2, each rank reading only
its own part of the checkpoint (``sharded_weights_worker.py``): a native family (a tiny Llama in
several safetensors files) and every ported family in its original layout (InternLM 1/2,
Baichuan 1/2 7B and 13B, ChatGLM3, Qwen-1, written as safetensors), whose fused tensors
(``wqkv``, ``W_pack``, ``query_key_value``, ``c_attn``) each rank slices at read time, and an
InternLM2 given as a hub id (``HUB_ID``, found offline in a Hugging Face cache folder).
The reference is ``packtune.load_model`` in one process (for the ported families: the whole
original state dict converted by the family's layout).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from helpers import assert_ran, has_deepspeed, launch_env, run_command
from ports_reference import FAMILIES, write_checkpoint, write_hub_cache

from packtune.distributed import free_port

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_weights_worker.py")
HUB_ID = "packtune-test/tiny-internlm2"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[str]:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("checkpoints")
    llama = root / "llama"
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(llama, max_shard_size="200KB")
    out = [str(llama)]
    for family in FAMILIES:
        folder = root / family
        _, state = write_checkpoint(folder, family)
        bins = [n for n in os.listdir(folder) if n.startswith("pytorch_model")]
        if bins:  # streaming reads safetensors: the same tensors in one
            for name in bins:
                os.remove(folder / name)
            save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
        out.append(str(folder))
    write_hub_cache(root / "hub", HUB_ID, "internlm2")
    return [*out, HUB_ID]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_every_rank_holds_the_weights_one_process_loads(engine, folders, tmp_path):
    if engine == "zero3" and not has_deepspeed():
        pytest.skip("DeepSpeed is not installed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", WORKER, str(tmp_path), engine, *folders]
    hub = os.path.join(os.path.dirname(folders[0]), "hub")
    rc, out, _ = run_command(cmd, launch_env(str(tmp_path / "cache"), HF_HUB_CACHE=hub, HF_HUB_OFFLINE="1"))
    assert_ran(rc, out, f"{engine} sharded load")
    streamed = {"zero3": "zero3_stream", "fsdp": "fsdp_stream"}[engine]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(report) == set(folders)
        for folder, result in report.items():
            name = os.path.basename(folder)
            assert result["how"] == streamed, f"{name} was not streamed ({result['how']}):\n{out[-3000:]}"
            assert result["keys"] > 10 and not result["extra"] and not result["differ"], (rank, name, result)
