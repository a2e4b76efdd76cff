"""The built-in config catalog: one table, every entry loads, validates and says what its name says."""

from __future__ import annotations

import re

import pytest

from packtune.config import ConfigError, config_source, find_config, list_configs, load_settings
from packtune.config import settings as S
from packtune.config import catalog
from packtune.config.catalog import ENTRIES, FAMILIES, TINY_DEMOS, TinyDemo, render_config, tiny_names

NAMES = list_configs()
PATTERN = re.compile(r"^(?P<model>[a-z0-9_]+?)_(?P<method>full|lora|qlora)_(?P<data>oasst1|alpaca)_e(?P<epochs>\d+)$")
DATASETS = {"oasst1": ("timdettmers/openassistant-guanaco", "oasst1"), "alpaca": ("tatsu-lab/alpaca", "alpaca")}
# Written out here, not read from the table: family -> (HF id, prompt template, a ported family).
EXPECTED_FAMILIES = {
    "baichuan2_13b": ("baichuan-inc/Baichuan2-13B-Base", "baichuan2_chat", True),
    "baichuan2_7b": ("baichuan-inc/Baichuan2-7B-Base", "baichuan2_chat", True),
    "baichuan_7b": ("baichuan-inc/Baichuan-7B", "default", True),
    "chatglm2_6b": ("THUDM/chatglm2-6b", "chatglm3", True),
    "chatglm3_6b": ("THUDM/chatglm3-6b", "chatglm3", True),
    "deepseek_7b": ("deepseek-ai/deepseek-llm-7b-base", "deepseek", False),
    "gemma2_9b": ("google/gemma-2-9b", "gemma", False),
    "gemma_7b": ("google/gemma-7b", "gemma", False),
    "internlm2_7b": ("internlm/internlm2-7b", "internlm2_chat", True),
    "internlm2_chat_7b": ("internlm/internlm2-chat-7b", "internlm2_chat", True),
    "internlm_7b": ("internlm/internlm-7b", "default", True),
    "llama2_7b": ("meta-llama/Llama-2-7b-hf", "llama2_chat", False),
    "llama3_8b_instruct": ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3_chat", False),
    "mistral_7b": ("mistralai/Mistral-7B-v0.1", "mistral", False),
    "qwen1_5_7b": ("Qwen/Qwen1.5-7B", "qwen_chat", False),
    "qwen2_5_7b_instruct": ("Qwen/Qwen2.5-7B-Instruct", "qwen_chat", False),
    "qwen3_8b": ("Qwen/Qwen3-8B", "qwen_chat", False),
    "qwen_7b": ("Qwen/Qwen-7B", "qwen_chat", True),
    "starcoder_15b": ("bigcode/starcoder", "default", False),
    "yi_6b": ("01-ai/Yi-6B", "yi", False),
    "zephyr_7b_beta": ("HuggingFaceH4/zephyr-7b-beta", "zephyr", False),
    # The families of 2026: hybrid linear attention, state-space and convolution layers, sinks, chunked attention.
    "falcon_h1_1_5b_deep_instruct": ("tiiuae/Falcon-H1-1.5B-Deep-Instruct", "tokenizer", False),
    "gpt_oss_20b": ("openai/gpt-oss-20b", "tokenizer", False),
    "lfm2_1_2b": ("LiquidAI/LFM2-1.2B", "tokenizer", False),
    "llama4_scout_17b_16e_instruct": ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "tokenizer", False),
    "nemotron_3_nano_30b_a3b": ("nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "tokenizer", False),
    "qwen3_5_27b": ("Qwen/Qwen3.5-27B", "qwen_chat", False),
    "qwen3_5_35b_a3b": ("Qwen/Qwen3.5-35B-A3B", "qwen_chat", False),
    "qwen3_next_80b_a3b_instruct": ("Qwen/Qwen3-Next-80B-A3B-Instruct", "qwen_chat", False),
}
PAIRS_PATTERN = re.compile(r"^(?P<model>[a-z0-9_]+?)_(?P<objective>dpo|orpo|reward)_ultrafeedback_e1$")
# Preference training (issue 17): LoRA on three chat families, UltraFeedback binarized's pairs.
PREFERENCE_FAMILIES = {"qwen2_5_7b_instruct", "llama3_8b_instruct", "internlm2_chat_7b"}
PAIRS = sorted(n for n in ENTRIES if PAIRS_PATTERN.match(n))
REAL = sorted(n for n in ENTRIES if n not in PAIRS)
TINY = [n for n in NAMES if n.startswith("tiny_")]


def test_catalog_is_one_table_plus_the_tiny_files():
    assert {f.key for f in FAMILIES} == set(EXPECTED_FAMILIES)
    assert len(REAL) == 6 * len(EXPECTED_FAMILIES) == 174 and len(TINY) == 6 and len(PAIRS) == 9
    assert NAMES == sorted(NAMES) == sorted([*REAL, *PAIRS, *TINY])
    assert TINY == tiny_names() == sorted(TINY_DEMOS)
    assert list_configs("TINY") == TINY and "tiny_mistral_full_demo" in TINY and "tiny_llama_lora_demo" in TINY
    assert find_config("llama2_7b_lora_alpaca_e3.py") == find_config("llama2_7b_lora_alpaca_e3") == "llama2_7b_lora_alpaca_e3"
    assert "internlm_7b_full_oasst1_e3" in list_configs("internlm")
    with pytest.raises(ConfigError, match="did you mean internlm_7b_full_oasst1_e3"):
        find_config("internlm_7b_ful_oasst1_e3")
    with pytest.raises(KeyError):
        render_config("nope")


@pytest.mark.parametrize("name", NAMES)
def test_every_config_renders_loads_and_validates(name):
    s = load_settings(name)
    text = config_source(name)
    assert len(text.splitlines()) < 100, "catalog configs stay short"
    parts = [f"PART {i}  {p}" for i, p in enumerate(S.PARTS, start=1)]
    assert [line.strip("# ") for line in text.splitlines() if line.startswith("#") and "PART " in line] == parts
    assert not re.search(r"\btype=|^import |^from ", text, re.M)
    assert s.use_varlen_attn and s.pack_to_max_length  # every entry packs with varlen attention


def test_every_family_has_full_lora_qlora_on_both_datasets():
    for fam in EXPECTED_FAMILIES:
        combos = {(m["method"], m["data"]) for m in map(PATTERN.match, REAL) if m["model"] == fam}
        assert combos == {(m, d) for m in ("full", "lora", "qlora") for d in DATASETS}, fam


@pytest.mark.parametrize("name", REAL)
def test_real_config_says_what_its_name_says(name):
    m = PATTERN.match(name)
    assert m, f"{name} does not follow <family>_<size>_<full|lora|qlora>_<dataset>_e<epochs>"
    s = load_settings(name)
    base, template, ported = EXPECTED_FAMILIES[m["model"]]
    assert (s.pretrained_model_name_or_path, s.model_config, s.prompt_template) == (base, None, template)
    assert (s.dataset, s.dataset_format) == DATASETS[m["data"]]
    assert s.max_epochs == int(m["epochs"]) and s.max_length == 2048
    assert s.system_prompt is None if m["data"] == "oasst1" else s.system_prompt.startswith("Below is an instruction")
    if m["method"] == "full":
        assert s.lora is None and s.lr == pytest.approx(2e-5)
    else:
        assert s.lora is not None and s.lr == pytest.approx(2e-4)
        assert s.lora["quantization"] == ("4bit" if m["method"] == "qlora" else None)
    # No family runs remote code: the ported ones load through packtune's native classes.
    assert s.trust_remote_code is False
    assert ("Loaded through packtune's native port" in config_source(name)) is ported


@pytest.mark.parametrize("name", PAIRS)
def test_preference_config_says_what_its_name_says(name):
    m = PAIRS_PATTERN.match(name)
    assert m["model"] in PREFERENCE_FAMILIES
    s = load_settings(name)
    base, template, _ = EXPECTED_FAMILIES[m["model"]]
    assert (s.pretrained_model_name_or_path, s.model_config, s.prompt_template) == (base, None, template)
    assert (s.dataset, s.dataset_split, s.dataset_format) == ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs",
                                                              "preference")
    assert s.method == m["objective"] and s.max_epochs == 1 and s.lora is not None and s.lora["quantization"] is None
    assert s.ref_model is None and not s.precompute_ref_log_probs  # DPO's reference: the base, adapter off
    assert s.beta == pytest.approx(0.1) and s.use_varlen_attn and s.pack_to_max_length and s.pack_strategy != "concat"
    assert s.evaluation_inputs == [] if s.method == "reward" else len(s.evaluation_inputs) == 2
    assert {f"{m['model']}_{o}_ultrafeedback_e1" for o in ("dpo", "orpo", "reward")} <= set(PAIRS)


def test_the_copy_is_the_file_the_entry_stands_for(tmp_path):
    # A rendered entry, written out, loads back to the same settings (the copy-cfg round trip).
    for name in ("internlm_7b_full_oasst1_e3", "qwen1_5_7b_qlora_oasst1_e3", "tiny_mistral_full_demo",
                 "llama3_8b_instruct_dpo_ultrafeedback_e1"):
        path = tmp_path / f"{name}_copy.py"
        path.write_text(config_source(name))
        assert load_settings(str(path)) == load_settings(name)
    # A tiny demo's copy is a whole file: the base with the demo's differences written in.
    text = config_source("tiny_llama_lora_demo")
    assert text.startswith('"""Tiny Llama (random init), LoRA on the demo tasks.') and "{" not in text
    assert "prompt_template = 'llama2_chat'\nmax_length = 256\n" in text and "\nlr = 2e-3\n" in text
    assert "model_type='llama'" in text and "lora = dict(r=8" in text and "lora = None" not in text


def test_a_tiny_demo_adds_a_setting_the_base_lacks_to_its_part(monkeypatch):
    monkeypatch.setitem(TINY_DEMOS, "tiny_extra_demo", TinyDemo(
        "Tiny Extra", {"model_type": "mistral"},
        {"gradient_checkpointing": "gradient_checkpointing = True", "dataset_split": "dataset_split = 'train'",
         "max_epochs": "max_epochs = 2", "seed": "seed = 7"}))
    text = catalog.render_tiny("tiny_extra_demo")
    parts = re.split(r"#+\n#\s+PART \d  .*\n#+\n", text)
    assert "max_epochs = 2" in parts[1] and "gradient_checkpointing = True" in parts[2]
    assert "dataset_split = 'train'" in parts[3] and parts[5].endswith("seed = 7\n") and "seed = 0" not in text
    s = load_settings("tiny_extra_demo")
    assert (s.gradient_checkpointing, s.dataset_split, s.max_epochs, s.seed) == (True, "train", 2, 7)


def test_a_builtin_config_that_raises_names_its_line(monkeypatch):
    import packtune.config.loader as loader

    monkeypatch.setattr(loader, "render_config", lambda name: "lr = 1e-4\nmax_length = 1 / 0\n")
    with pytest.raises(ConfigError, match=r"<built-in config llama2_7b_full_alpaca_e3>:2: running the config raised "
                                          r"ZeroDivisionError"):
        load_settings("llama2_7b_full_alpaca_e3")


@pytest.mark.parametrize("name", TINY)
def test_tiny_configs_run_offline_on_a_cpu(name):
    s = load_settings(name)
    assert s.pretrained_model_name_or_path is None and s.model_config is not None
    pairs = "_dpo_" in name  # preference pairs made from the demo tasks (packtune.demo_data.build_demo_pairs)
    assert s.tokenizer_name_or_path == "packtune://mistral-v1"
    assert s.dataset == ("packtune://demo_pairs.jsonl" if pairs else "packtune://demo_tasks.jsonl")
    assert s.dataset_format == ("preference" if pairs else "alpaca") and s.method == ("dpo" if pairs else "sft")
    assert s.dtype == "float32" and s.use_varlen_attn and s.pack_to_max_length
    assert 256 <= s.max_length <= 512 and s.max_steps is not None and s.max_steps <= 300
    mc = s.model_config
    assert mc["vocab_size"] == 32000 and mc["max_position_embeddings"] >= s.max_length
    assert 64 <= mc["hidden_size"] <= 128 and mc["num_hidden_layers"] == 2
    assert (mc["num_attention_heads"], mc["num_key_value_heads"]) == (4, 2)
    assert s.lora is None if "_full_" in name or pairs else s.lora is not None


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
