"""Training options end to end: refusal of leaking models, checkpointing, precision, chat."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from packtune.cli.main import main
from helpers import TRAIN_OPTIONS, read_metrics

# A "remote code" model whose attention is its own: causal SDPA over the whole row, blind to
# attn_implementation and to packing boundaries (what baichuan-style code does).
LEAKY_MODELING = textwrap.dedent(
    '''
    import torch
    import torch.nn.functional as F
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput


    class LeakyConfig(PretrainedConfig):
        model_type = "leaky_lm"

        def __init__(self, vocab_size=32000, hidden_size=32, **kwargs):
            self.vocab_size = vocab_size
            self.hidden_size = hidden_size
            super().__init__(**kwargs)


    class LeakyForCausalLM(PreTrainedModel):
        config_class = LeakyConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
            self.qkv = torch.nn.Linear(config.hidden_size, 3 * config.hidden_size)
            self.head = torch.nn.Linear(config.hidden_size, config.vocab_size)
            self.post_init()

        def forward(self, input_ids=None, **kwargs):
            h = self.embed(input_ids)
            q, k, v = self.qkv(h).chunk(3, dim=-1)
            h = h + F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return CausalLMOutput(logits=self.head(h))
    '''
)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PACKTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def leaky_folder(tmp_path):
    from packtune.data import load_tokenizer

    folder = tmp_path / "leaky"
    folder.mkdir()
    (folder / "modeling_leaky.py").write_text(LEAKY_MODELING)
    config = {
        "model_type": "leaky_lm",
        "vocab_size": 32000,
        "hidden_size": 32,
        "architectures": ["LeakyForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_leaky.LeakyConfig", "AutoModelForCausalLM": "modeling_leaky.LeakyForCausalLM"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("modeling_leaky_fixture", folder / "modeling_leaky.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_leaky_fixture"] = module
    spec.loader.exec_module(module)
    module.LeakyForCausalLM(module.LeakyConfig()).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **{"auto_map": config["auto_map"]}}))
    load_tokenizer("packtune://mistral-v1").save_pretrained(folder)
    return folder


def _options(folder: Path) -> list[str]:
    rest = [o for o in TRAIN_OPTIONS if not o.startswith("model_config")]
    return [f"pretrained_model_name_or_path={str(folder)!r}", "model_config=None", "tokenizer_name_or_path=None",
            "trust_remote_code=True", "max_steps=1", "evaluation_inputs=[]", *rest]


def test_remote_code_model_that_leaks_is_refused(tmp_path, leaky_folder, capsys):
    code = main(["train", "tiny_llama_full_demo", "--work-dir", str(tmp_path / "w"), "--cfg-options", *_options(leaky_folder)])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
    assert code == 2 and len(err) == 1, err
    assert "LeakyForCausalLM" in err[0] and "does not honour packing boundaries" in err[0]
    assert "use_varlen_attn = False" in err[0]
    assert not list((tmp_path / "w").glob("iter_*"))


def test_the_same_model_trains_unpacked(tmp_path, leaky_folder):
    options = _options(leaky_folder) + ["use_varlen_attn=False", "pack_to_max_length=False"]
    work = tmp_path / "w"
    assert main(["train", "tiny_llama_full_demo", "--work-dir", str(work), "--cfg-options", *options]) == 0
    assert (work / "iter_1.pth").exists()


def _first_loss(tmp_path, name, *options):
    work = tmp_path / name
    assert main(["train", "tiny_mistral_full_demo", "--work-dir", str(work), "--cfg-options", *TRAIN_OPTIONS, "max_steps=2",
                 "save_steps=100", *options]) == 0
    return [r["loss"] for r in read_metrics(work)], [r["grad_norm"] for r in read_metrics(work)]


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path):
    plain = _first_loss(tmp_path, "plain")
    checkpointed = _first_loss(tmp_path, "ckpt", "gradient_checkpointing=True")
    assert checkpointed[0] == pytest.approx(plain[0], rel=1e-5)
    assert checkpointed[1] == pytest.approx(plain[1], rel=1e-4)


def test_bf16_autocast_on_cpu_trains(tmp_path):
    losses, norms = _first_loss(tmp_path, "bf16", "dtype='bfloat16'")
    fp32, _ = _first_loss(tmp_path, "fp32")
    assert all(torch.isfinite(torch.tensor(losses + norms)))
    assert losses[0] == pytest.approx(fp32[0], rel=2e-2)  # bf16 matmuls, same model and data


def test_chat_interactive_session(tmp_path, monkeypatch, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    from packtune.data import load_tokenizer

    folder = tmp_path / "model"
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  vocab_size=32000)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    load_tokenizer("packtune://mistral-v1").save_pretrained(folder)
    lines = iter(["hello", "clear", "again", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(folder), "--prompt-template", "mistral", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2
    assert main(["chat", str(folder), "--prompt-template", "nope"]) == 2
    assert "unknown prompt_template 'nope'" in capsys.readouterr().err
