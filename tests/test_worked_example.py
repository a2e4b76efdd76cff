"""The seed's worked example, end to end, on a tiny InternLM checkpoint made here.

``list-cfg -p internlm`` -> ``copy-cfg internlm_7b_full_oasst1_e3 .`` -> ``use_varlen_attn =
True`` -> ``train`` -> ``convert pth_to_hf`` (original and native layouts) -> ``chat``, through
the command line as a user runs it. The checkpoint is in InternLM's original layout (model_type
``internlm``, ``auto_map``, a ``.bin`` file, a ``modeling_internlm.py`` that must never be
imported); the vocabulary is the bundled Mistral v1 tokenizer's.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from ports_reference import write_checkpoint

from packtune.cli.main import main

CATALOG_NAME = "internlm_7b_full_oasst1_e3"
PROMPTS = [("What sound does a cow make?", "Moo."), ("What is the opposite of hot?", "Cold."),
           ("Repeat after me: red river stone", "red river stone")]

# What a user changes in the copy of internlm_7b_full_oasst1_e3: the tiny checkpoint, a local
# dataset, a few steps (appended to the copy: a later assignment overrides the catalog's).
EDITS = '''
# --- edited for the test ---
pretrained_model_name_or_path = {model!r}
use_varlen_attn = True

dataset = {data!r}
dataset_format = 'alpaca'
prompt_template = 'default'
max_length = 128
pack_to_max_length = True

batch_size = 1
accumulative_counts = 1
max_steps = 4
lr = 3e-3
warmup_ratio = 0.0
save_steps = 4
evaluation_freq = 1000
evaluation_inputs = ['What sound does a cow make?']

tokenizer_name_or_path = 'packtune://mistral-v1'
dtype = 'float32'
lora = None
log_steps = 1
max_new_tokens = 4
'''


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PACKTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_worked_example_end_to_end(tmp_path, capsys, monkeypatch):
    assert main(["list-cfg", "-p", "internlm"]) == 0
    assert CATALOG_NAME in capsys.readouterr().out.split()
    monkeypatch.chdir(tmp_path)
    assert main(["copy-cfg", CATALOG_NAME, "."]) == 0
    config = tmp_path / f"{CATALOG_NAME}_copy.py"
    text = config.read_text()
    assert any(line.split("#")[0].strip() == "use_varlen_attn = True" for line in text.splitlines())

    base = tmp_path / "internlm-tiny"
    write_checkpoint(base, "internlm", vocab_size=32000)
    data = tmp_path / "tasks.json"
    data.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in PROMPTS * 12]))
    config.write_text(text + EDITS.format(model=str(base), data=str(data)))
    work = tmp_path / "work"

    assert main(["train", str(config), "--work-dir", str(work)]) == 0
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    pth = str(work / "iter_4.pth")

    original, native = tmp_path / "hf_original", tmp_path / "hf_native"
    assert main(["convert", "pth_to_hf", str(config), pth, str(original)]) == 0
    assert main(["convert", "pth_to_hf", str(config), pth, str(native), "--format", "native"]) == 0
    written = json.loads((original / "config.json").read_text())
    assert written["model_type"] == "internlm" and written["architectures"] == ["InternLMForCausalLM"]
    assert written["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm.InternLMForCausalLM"
    assert (original / "pytorch_model.bin").exists() and (original / "modeling_internlm.py").exists()
    assert "model.layers.0.self_attn.o_proj.bias" in torch.load(original / "pytorch_model.bin", weights_only=True)
    assert json.loads((native / "config.json").read_text())["model_type"] == "llama"

    # The native folder is plain transformers; the original one loads through packtune; both are
    # the trained model.
    from transformers import AutoModelForCausalLM

    from packtune.ports.api import load_model

    ids = torch.tensor([[1, 1824, 2369, 1235, 264, 11503, 1038, 28804]])
    trained = load_model(base)
    trained.load_state_dict(torch.load(pth, map_location="cpu", weights_only=False)["model"])
    with torch.no_grad():
        expected = trained(ids).logits
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(native)(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_model(original)(ids).logits, expected, rtol=1e-5, atol=1e-5)

    for folder in (original, native):
        capsys.readouterr()
        assert main(["chat", str(folder), "--prompt", "What sound does a cow make?", "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out.strip() != ""
