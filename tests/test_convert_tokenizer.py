"""A converted folder's tokenizer carries the template used in training, and its generation
config stops where a trained reply ends."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from packtune.config import Settings
from packtune.convert import _save_tokenizer
from packtune.data.templates import get_template
from packtune.data.tokenizer_loader import load_tokenizer

MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Bye"}]


@pytest.fixture()
def tokenizer_dir(tmp_path):
    """The bundled Mistral tokenizer with ChatML's end-of-turn token and a chat template of its own."""
    tok = load_tokenizer("packtune://mistral-v1")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    folder = tmp_path / "tok"
    tok.save_pretrained(folder)
    return folder


def _settings(tokenizer_dir, template: str) -> Settings:
    return Settings(
        model_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 4, "vocab_size": 32002},
        tokenizer_name_or_path=str(tokenizer_dir), dataset="unused.json", prompt_template=template,
    )


def test_a_builtin_template_replaces_the_tokenizers_own_and_its_stops_end_generation(tokenizer_dir, tmp_path):
    settings = _settings(tokenizer_dir, "chatml")
    out = tmp_path / "out"
    _save_tokenizer(settings, str(out))
    saved = AutoTokenizer.from_pretrained(out)
    trained = get_template("chatml", load_tokenizer(str(tokenizer_dir)))
    assert saved.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == trained.prompt(MESSAGES)
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    im_end = saved.convert_tokens_to_ids("<|im_end|>")
    assert sorted(eos) == sorted({saved.eos_token_id, im_end})


def test_the_tokenizers_template_is_kept_when_it_trained_the_model(tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    _save_tokenizer(_settings(tokenizer_dir, "tokenizer"), str(out))
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.apply_chat_template(MESSAGES[:1], tokenize=False) == "[user] Hi\n"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == saved.eos_token_id
