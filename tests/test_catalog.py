"""The built-in config catalog: every config loads, validates and says what its name says."""

from __future__ import annotations

import re

import pytest

from packtune.config import CONFIG_DIR, find_config, list_configs, load_settings
from packtune.config import settings as S

NAMES = list_configs()
PATTERN = re.compile(r"^(?P<model>[a-z0-9_]+?)_(?P<method>full|lora|qlora)_(?P<data>oasst1|alpaca)_e(?P<epochs>\d+)$")
DATASETS = {"oasst1": ("timdettmers/openassistant-guanaco", "oasst1"), "alpaca": ("tatsu-lab/alpaca", "alpaca")}
# family prefix -> (HF id prefix, prompt template, remote code only)
FAMILIES = {
    "baichuan2": ("baichuan-inc/Baichuan2", "default", True),
    "chatglm3": ("THUDM/chatglm3", "auto", True),
    "deepseek": ("deepseek-ai/deepseek-llm", "deepseek", False),
    "gemma": ("google/gemma", "gemma", False),
    "internlm2": ("internlm/internlm2", "internlm2_chat", True),
    "llama2": ("meta-llama/Llama-2", "llama2_chat", False),
    "llama3": ("meta-llama/Meta-Llama-3", "llama3_chat", False),
    "mistral": ("mistralai/Mistral", "mistral", False),
    "qwen1_5": ("Qwen/Qwen1.5", "qwen_chat", False),
    "qwen2_5": ("Qwen/Qwen2.5", "qwen_chat", False),
    "qwen3": ("Qwen/Qwen3", "qwen_chat", False),
    "starcoder": ("bigcode/starcoder", "default", False),
    "yi": ("01-ai/Yi", "yi", False),
    "zephyr": ("HuggingFaceH4/zephyr", "zephyr", False),
}
REAL = [n for n in NAMES if not n.startswith("tiny_")]
TINY = [n for n in NAMES if n.startswith("tiny_")]


def family(name: str) -> str:
    return next(f for f in sorted(FAMILIES, key=len, reverse=True) if name.startswith(f))


def test_catalog_is_shipped_and_listed():
    assert CONFIG_DIR.is_dir() and len(NAMES) >= 80
    assert NAMES == sorted(NAMES)
    assert list_configs("TINY") == TINY and "tiny_mistral_full_demo" in TINY and "tiny_llama_lora_demo" in TINY
    assert find_config("llama2_7b_lora_alpaca_e3.py") == find_config("llama2_7b_lora_alpaca_e3")


@pytest.mark.parametrize("name", NAMES)
def test_every_config_loads_and_validates(name):
    s = load_settings(name)
    text = find_config(name).read_text()
    lines = text.splitlines()
    assert len(lines) < 100, "catalog configs stay short"
    assert "PART 1  Settings" in text and not re.search(r"\btype=|^import |^from ", text, re.M)
    assert s.use_varlen_attn == s.pack_to_max_length


def test_every_family_has_full_lora_qlora_on_both_datasets():
    for fam in FAMILIES:
        mine = [n for n in REAL if family(n) == fam]
        combos = {(PATTERN.match(n)["method"], PATTERN.match(n)["data"]) for n in mine}
        assert combos == {(m, d) for m in ("full", "lora", "qlora") for d in DATASETS}, fam


@pytest.mark.parametrize("name", REAL)
def test_real_config_says_what_its_name_says(name):
    m = PATTERN.match(name)
    assert m, f"{name} does not follow <family>_<size>_<full|lora|qlora>_<dataset>_e<epochs>"
    s = load_settings(name)
    hf_prefix, template, remote = FAMILIES[family(name)]
    assert s.pretrained_model_name_or_path.startswith(hf_prefix) and s.model_config is None
    assert s.prompt_template == template
    assert (s.dataset, s.dataset_format) == DATASETS[m["data"]]
    assert s.max_epochs == int(m["epochs"]) and s.max_length == 2048
    if m["method"] == "full":
        assert s.lora is None and s.lr == pytest.approx(2e-5)
    else:
        assert s.lora is not None and s.lr == pytest.approx(2e-4)
        assert s.lora["quantization"] == ("4bit" if m["method"] == "qlora" else None)
    assert s.trust_remote_code is remote


@pytest.mark.parametrize("name", [n for n in REAL if FAMILIES[family(n)][2]])
def test_remote_code_families_turn_varlen_and_packing_off_and_say_why(name):
    s = load_settings(name)
    assert s.trust_remote_code and not s.use_varlen_attn and not s.pack_to_max_length
    text = find_config(name).read_text()
    assert "remote code" in text and "use_varlen_attn = False" in text


@pytest.mark.parametrize("name", TINY)
def test_tiny_configs_run_offline_on_a_cpu(name):
    s = load_settings(name)
    assert s.pretrained_model_name_or_path is None and s.model_config is not None
    assert s.tokenizer_name_or_path == "packtune://mistral-v1" and s.dataset == "packtune://demo_tasks.jsonl"
    assert s.dataset_format == "alpaca" and s.dtype == "float32" and s.use_varlen_attn and s.pack_to_max_length
    assert 256 <= s.max_length <= 512 and s.max_steps is not None and s.max_steps <= 300
    mc = s.model_config
    assert mc["vocab_size"] == 32000 and mc["max_position_embeddings"] >= s.max_length
    assert 64 <= mc["hidden_size"] <= 128 and mc["num_hidden_layers"] == 2
    assert (mc["num_attention_heads"], mc["num_key_value_heads"]) == (4, 2)
    assert s.lora is None if "_full_" in name else s.lora is not None


def test_tiny_configs_build_real_architectures():
    from transformers import AutoConfig

    for name in TINY:
        mc = dict(load_settings(name).model_config)
        cfg = AutoConfig.for_model(mc.pop("model_type"), **mc)
        assert cfg.vocab_size == 32000 and cfg.num_hidden_layers == 2


def test_make_demo_config():
    s = load_settings("tiny_mistral_full_demo")
    assert s.model_config["model_type"] == "mistral" and s.lora is None
    assert s.lr == pytest.approx(1e-3) and s.batch_size == 4 and s.log_steps == 10 and s.save_steps == 100
    assert len(s.evaluation_inputs) >= 2


def test_choices_match_the_implementation():
    # The config package keeps its own copies so validation never imports torch.
    from packtune.attention.varlen import BACKENDS
    from packtune.packing.packs import MODES, OVERFLOW

    assert set(S.ATTN_BACKENDS) == set(BACKENDS)
    assert set(S.PACK_STRATEGIES) <= set(MODES)
    assert set(S.OVERFLOW_POLICIES) == set(OVERFLOW)
    from packtune.data import FORMAT_NAMES, TEMPLATE_NAMES
    from packtune.loss import REDUCTIONS

    assert set(S.PROMPT_TEMPLATES) == set(TEMPLATE_NAMES)
    assert set(S.DATASET_FORMATS) == set(FORMAT_NAMES)
    assert set(S.LOSS_REDUCTIONS) == set(REDUCTIONS)
