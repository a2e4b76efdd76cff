"""Settings validation, config-file loading and --cfg-options parsing (packtune.config)."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest

from packtune.config import (
    LORA_DEFAULTS,
    ConfigError,
    Settings,
    apply_overrides,
    load_settings,
    parse_value,
    read_config_file,
    settings_to_dict,
    settings_to_source,
)

BASE = dict(pretrained_model_name_or_path="org/model", dataset="tatsu-lab/alpaca")


def problems(**changes) -> list[str]:
    """Every problem line for BASE + changes ([] when valid)."""
    try:
        Settings(**{**BASE, **changes})
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


def one(**changes) -> str:
    found = problems(**changes)
    assert len(found) == 1, found
    return found[0]


def write(tmp_path, text: str, name: str = "cfg.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --- a valid config and normalisation ---------------------------------------------------

def test_minimal_settings_take_the_documented_defaults():
    s = Settings(**BASE)
    assert (s.dtype, s.use_varlen_attn, s.attn_backend, s.pack_to_max_length, s.pack_strategy) == (
        "auto", True, "auto", True, "bfd")
    assert (s.batch_size, s.accumulative_counts, s.max_epochs, s.max_steps, s.lr) == (1, 1, 1, None, 2e-5)
    assert (s.betas, s.weight_decay, s.max_norm, s.warmup_ratio) == ((0.9, 0.999), 0.0, 1.0, 0.03)
    assert (s.save_steps, s.save_total_limit, s.log_steps, s.evaluation_freq) == (500, 2, 10, 500)
    assert (s.evaluation_inputs, s.max_new_tokens, s.seed, s.max_length) == ([], 64, 0, 2048)
    assert (s.loss_reduction, s.on_nonfinite_loss, s.overflow, s.on_bad_row) == ("token", "error", "truncate", "skip")


def test_settings_are_frozen_and_replace_revalidates():
    s = Settings(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lr = 1e-4  # type: ignore[misc]
    assert dataclasses.replace(s, lr=1e-4).lr == 1e-4
    with pytest.raises(ConfigError):
        dataclasses.replace(s, batch_size=0)


def test_normalisation_lora_betas_floats_lists():
    s = Settings(**BASE, lora=dict(r=4), betas=[0.5, 0.9], lr=1 - 0.5, weight_decay=0,
                 evaluation_inputs=("a", "b"), dataset_format="alpaca")
    assert s.lora == {**LORA_DEFAULTS, "r": 4}
    assert s.betas == (0.5, 0.9) and isinstance(s.betas, tuple)
    assert isinstance(s.weight_decay, float) and s.evaluation_inputs == ["a", "b"]


def test_dataset_is_required():
    with pytest.raises(ConfigError) as err:
        load_settings_from_dict({"pretrained_model_name_or_path": "a/b"})
    assert "`dataset` is not set" in str(err.value) and "fix: set `dataset = " in str(err.value)


def load_settings_from_dict(raw):
    from packtune.config import check_settings

    values, found = check_settings(raw)
    if found:
        raise ConfigError(found)
    return Settings(**values)


# --- one rule at a time: message and fix --------------------------------------------------

@pytest.mark.parametrize("changes, message, fix", [
    (dict(batch_size="4"), "`batch_size` must be an int >= 1, got '4' (str)", "write `batch_size = 4` (without quotes)"),
    (dict(batch_size=4.0), "`batch_size` must be an int >= 1, got 4.0 (float)", "write `batch_size = 4` (an int, not a float)"),
    (dict(batch_size=0), "`batch_size` must be an int >= 1, got 0 (int)", "set `batch_size` to an int >= 1, e.g. `batch_size = 1`"),
    (dict(batch_size=True), "`batch_size` must be an int >= 1, got True (bool)", "e.g. `batch_size = 1`"),
    (dict(accumulative_counts=0), "`accumulative_counts` must be an int >= 1", "`accumulative_counts = 1`"),
    (dict(max_epochs=1.5), "`max_epochs` must be an int >= 1, got 1.5 (float)", "e.g. `max_epochs = 1`"),
    (dict(max_steps=0), "`max_steps` must be None or an int >= 1, got 0 (int)", "set `max_steps` to None or an int >= 1"),
    (dict(max_length=1), "`max_length` must be an int >= 2, got 1", "e.g. `max_length = 2048`"),
    (dict(max_samples=-1), "`max_samples` must be None or an int >= 1", "set `max_samples`"),
    (dict(num_proc=0), "`num_proc` must be None or an int >= 1", "set `num_proc`"),
    (dict(save_total_limit=0), "`save_total_limit` must be an int >= 1, got 0", "e.g. `save_total_limit = 2`"),
    (dict(save_total_limit=-1), "`save_total_limit` must be an int >= 1, got -1", "e.g. `save_total_limit = 2`"),
    (dict(save_steps=0), "`save_steps` must be an int >= 1", "e.g. `save_steps = 500`"),
    (dict(log_steps=0), "`log_steps` must be an int >= 1", "e.g. `log_steps = 10`"),
    (dict(evaluation_freq=0), "`evaluation_freq` must be an int >= 1", "e.g. `evaluation_freq = 500`"),
    (dict(max_new_tokens=0), "`max_new_tokens` must be an int >= 1", "e.g. `max_new_tokens = 64`"),
    (dict(seed=-1), "`seed` must be an int >= 0, got -1", "e.g. `seed = 0`"),
    (dict(lr=0), "`lr` must be a number in (0, 1), got 0 (int)", "e.g. `lr = 2e-05`"),
    (dict(lr=2e5), "`lr` must be a number in (0, 1), got 200000.0", "e.g. `lr = 2e-05`"),
    (dict(lr="2e-5"), "`lr` must be a number in (0, 1), got '2e-5' (str)", "write `lr = 2e-05` (without quotes)"),
    (dict(lr=float("nan")), "`lr` must be a number in (0, 1), got nan", "e.g. `lr = 2e-05`"),
    (dict(warmup_ratio=1.0), "`warmup_ratio` must be a number in [0, 1), got 1.0", "e.g. `warmup_ratio = 0.03`"),
    (dict(warmup_ratio=-0.1), "`warmup_ratio` must be a number in [0, 1)", "`warmup_ratio = 0.03`"),
    (dict(weight_decay=-1), "`weight_decay` must be a number >= 0", "e.g. `weight_decay = 0.0`"),
    (dict(max_norm=0), "`max_norm` must be a number > 0, got 0", "e.g. `max_norm = 1.0`"),
    (dict(betas=(0.9,)), "`betas` must be a pair of numbers in [0, 1), got (0.9,) (tuple)", "e.g. `betas = (0.9, 0.999)`"),
    (dict(betas=(0.9, 1.0)), "`betas` must be a pair of numbers in [0, 1), got (0.9, 1.0) (tuple); item 1 is 1.0 (float)",
     "e.g. `betas = (0.9, 0.999)`"),
    (dict(betas="0.9,0.99"), "`betas` must be a pair of numbers in [0, 1), got '0.9,0.99' (str)",
     "write `betas = (0.9, 0.99)` (without quotes)"),
    (dict(use_varlen_attn="True", pack_to_max_length=True), "`use_varlen_attn` must be True or False, got 'True' (str)",
     "write `use_varlen_attn = True` (without quotes)"),
    (dict(trust_remote_code=1), "`trust_remote_code` must be True or False, got 1 (int)",
     "write `trust_remote_code = True` (a bool, not an int)"),
    (dict(gradient_checkpointing="yes"), "`gradient_checkpointing` must be True or False, got 'yes'",
     "e.g. `gradient_checkpointing = False`"),
    (dict(shuffle_before_pack="false"), "`shuffle_before_pack` must be True or False", "write `shuffle_before_pack = False`"),
    (dict(dtype="bf16"), "`dtype` must be one of 'auto', 'float32', 'bfloat16', 'float16', got 'bf16' (str)",
     "did you mean 'bfloat16'? write `dtype = 'bfloat16'`"),
    (dict(dtype="int8"), "`dtype` must be one of 'auto', 'float32', 'bfloat16', 'float16', got 'int8'",
     "set `dtype` to one of 'auto', 'float32', 'bfloat16', 'float16', e.g. `dtype = 'auto'`"),
    (dict(attn_backend="flash_attention_2"), "`attn_backend` must be one of 'auto', 'sdpa', 'eager', 'flash_attn', 'torch'",
     "did you mean 'flash_attn'?"),
    (dict(dataset_format="ShareGPT"), "`dataset_format` must be one of 'auto', 'alpaca', 'sharegpt', 'messages', 'oasst1', 'text'",
     "did you mean 'sharegpt'?"),
    (dict(prompt_template="llama3"), "`prompt_template` must be one of 'auto', 'tokenizer', 'default', 'chatml'", "did you mean 'llama3_chat'?"),
    (dict(pack_strategy="bdf"), "`pack_strategy` must be one of 'bfd', 'sequential', 'concat'", "did you mean 'bfd'?"),
    (dict(overflow="cut"), "`overflow` must be one of 'truncate', 'drop', 'error'", "e.g. `overflow = 'truncate'`"),
    (dict(on_bad_row="warn"), "`on_bad_row` must be one of 'skip', 'error'", "e.g. `on_bad_row = 'skip'`"),
    (dict(loss_reduction="mean"), "`loss_reduction` must be one of 'token', 'sample', 'square'", "did you mean 'token'?"),
    (dict(on_nonfinite_loss="ignore"), "`on_nonfinite_loss` must be one of 'error', 'skip'", "e.g. `on_nonfinite_loss = 'error'`"),
    (dict(evaluation_inputs="Hello"), "`evaluation_inputs` must be a list of non-empty strings, got 'Hello' (str)",
     "wrap it in a list: `evaluation_inputs = ['Hello']`"),
    (dict(evaluation_inputs=["ok", 3]), "`evaluation_inputs` must be a list of non-empty strings, got ['ok', 3] (list); item 1 is 3 (int)",
     "e.g. `evaluation_inputs = []`"),
    (dict(evaluation_inputs=[""]), "item 0 is '' (str)", "evaluation_inputs"),
    (dict(dataset=""), "`dataset` must be a non-empty string", "e.g. `dataset = 'tatsu-lab/alpaca'`"),
    (dict(dataset=[]), "`dataset` must be a non-empty string (HF id, local path or packtune://NAME) or a non-empty list",
     "e.g. `dataset = 'tatsu-lab/alpaca'`"),
    (dict(dataset=["a", None]), "item 1 is None (NoneType)", "dataset"),
    (dict(dataset_split=""), "`dataset_split` must be a non-empty string", "e.g. `dataset_split = 'train'`"),
    (dict(system_prompt=3), "`system_prompt` must be None or a string, got 3 (int)", "`system_prompt = None`"),
    (dict(tokenizer_name_or_path="packtune://"), "`tokenizer_name_or_path` must be None or a non-empty string",
     "write `tokenizer_name_or_path = 'packtune://NAME'`"),
    (dict(pretrained_model_name_or_path=""), "`pretrained_model_name_or_path` must be None or a non-empty string",
     "pretrained_model_name_or_path"),
    (dict(data_cache_dir=5), "`data_cache_dir` must be None or a non-empty string", "data_cache_dir"),
])
def test_each_rule_has_its_message_and_fix(changes, message, fix):
    line = one(**changes)
    text, _, fixed = line.partition("fix: ")
    assert message in text, line
    assert fix in fixed, line


@pytest.mark.parametrize("lora, message, fix", [
    ("yes", "`lora` must be None (full fine-tuning) or a dict, got 'yes' (str)", "`lora = dict(r=8, alpha=16)`"),
    (dict(rank=4), "unknown lora key `rank`; did you mean `r`?", "rename it `r`"),
    (dict(bias="none"), "unknown lora key `bias`", "remove it; known keys: r, alpha, dropout, target_modules, quantization"),
    (dict(r=0), "`lora['r']` must be an int >= 1, got 0", "e.g. `lora['r'] = 8`"),
    (dict(r=8.0), "`lora['r']` must be an int >= 1, got 8.0 (float)", "write `lora['r'] = 8` (an int, not a float)"),
    (dict(alpha="16"), "`lora['alpha']` must be an int >= 1, got '16' (str)", "write `lora['alpha'] = 16` (without quotes)"),
    (dict(dropout=1.0), "`lora['dropout']` must be a number in [0, 1), got 1.0", "e.g. `lora['dropout'] = 0.05`"),
    (dict(target_modules=[]), "`lora['target_modules']` must be 'all-linear' or a non-empty list of module names",
     "e.g. `lora['target_modules'] = 'all-linear'`"),
    (dict(target_modules="q_proj"), "`lora['target_modules']` must be 'all-linear' or a non-empty list",
     "wrap it in a list: `lora['target_modules'] = ['q_proj']`"),
    (dict(quantization="nf4"), "`lora['quantization']` must be one of None, '4bit', '8bit', got 'nf4'",
     "did you mean '4bit'? write `lora['quantization'] = '4bit'`"),
    (dict(quantization=4), "`lora['quantization']` must be one of None, '4bit', '8bit', got 4 (int)",
     "e.g. `lora['quantization'] = None`"),
])
def test_lora_rules(lora, message, fix):
    line = one(lora=lora)
    assert message in line and fix in line.partition("fix: ")[2], line


@pytest.mark.parametrize("changes, message, fix", [
    (dict(use_varlen_attn=True, pack_to_max_length=False),
     "`use_varlen_attn = True` needs packed rows, but `pack_to_max_length = False`",
     "set `pack_to_max_length = True`, or `use_varlen_attn = False`"),
    (dict(use_varlen_attn=False, pack_to_max_length=True),
     "`pack_to_max_length = True` with `use_varlen_attn = False` lets packed samples attend to each other (a silent cross-sample leak)",
     "set `use_varlen_attn = True`, or `pack_to_max_length = False` for models without varlen support"),
    (dict(pretrained_model_name_or_path=None),
     "no model: `pretrained_model_name_or_path` and `model_config` are both None",
     "set `pretrained_model_name_or_path = 'org/model'` (HF id or local path), or `model_config = dict(model_type=..., ...)`"),
    (dict(model_config=dict(model_type="llama")),
     "both `pretrained_model_name_or_path` and `model_config` are set: which model?",
     "keep `pretrained_model_name_or_path` to fine-tune a model, or `model_config`"),
    (dict(pretrained_model_name_or_path=None, model_config=dict(model_type="llama")),
     "`model_config` builds a randomly initialised model, which has no tokenizer",
     "set `tokenizer_name_or_path`, e.g. 'packtune://mistral-v1'"),
    (dict(pack_strategy="concat", pack_to_max_length=False, use_varlen_attn=False),
     "`pack_strategy = 'concat'` cuts the token stream into packed rows, but `pack_to_max_length = False`",
     "set `pack_to_max_length = True` (with `use_varlen_attn = True`), or `pack_strategy = 'bfd'`"),
    (dict(pretrained_model_name_or_path=None, tokenizer_name_or_path="packtune://mistral-v1",
          model_config=dict(model_type="llama"), lora=dict(quantization="4bit")),
     "`lora['quantization']` (QLoRA) quantizes pretrained weights at load time; a random-init `model_config` has none",
     "set `lora['quantization'] = None`, or fine-tune a pretrained model"),
    (dict(pretrained_model_name_or_path=None, tokenizer_name_or_path="packtune://mistral-v1",
          model_config=dict(model_type="llama", max_position_embeddings=512)),
     "`model_config['max_position_embeddings']` is 512, shorter than `max_length = 2048`",
     "set `max_position_embeddings` to at least 2048, or lower `max_length`"),
    (dict(pretrained_model_name_or_path=None, tokenizer_name_or_path="t", model_config=dict(hidden_size=8)),
     "`model_config` has no `model_type`", "add it, e.g. `model_config = dict(model_type='llama'"),
    (dict(pretrained_model_name_or_path=None, tokenizer_name_or_path="t", model_config=dict(model_type="lama")),
     "`model_config['model_type']` 'lama' is not a transformers architecture", "did you mean 'llama'?"),
    (dict(pretrained_model_name_or_path=None, tokenizer_name_or_path="t", model_config="llama"),
     "`model_config` must be None or a dict with string keys, got 'llama' (str)", "write `model_config = dict(model_type="),
])
def test_impossible_combinations(changes, message, fix):
    line = one(**changes)
    assert message in line and fix in line.partition("fix: ")[2], line


def test_valid_combinations_pass():
    assert problems(use_varlen_attn=False, pack_to_max_length=False) == []
    assert problems(pack_strategy="concat", dataset_format="text") == []
    assert problems(lora=dict(quantization="8bit"), dtype="bfloat16") == []
    assert problems(pretrained_model_name_or_path=None, tokenizer_name_or_path="packtune://mistral-v1",
                    model_config=dict(model_type="mistral", max_position_embeddings=4096), lora={}) == []
    assert problems(dataset=["a.jsonl", "b.jsonl"], max_steps=10, system_prompt="") == []


def test_every_error_is_reported_together():
    found = problems(batch_size="4", lr=5, dtype="bf16", lora=dict(rank=8), pretrained_model_name_or_path=None)
    assert len(found) == 5, found
    text = str(ConfigError([]))  # the header of an empty error does not crash
    assert "0 problems" in text


def test_combination_rules_do_not_cascade_from_invalid_values():
    # A non-bool use_varlen_attn is one problem, not also a packing-combination problem.
    assert len(problems(use_varlen_attn="no")) == 1


def test_config_error_is_a_value_error_and_lists_one_line_per_problem():
    with pytest.raises(ValueError) as err:
        Settings(**BASE, batch_size=0, seed=-1)
    lines = str(err.value).splitlines()
    assert lines[0] == "config has 2 problems:"
    assert all(line.startswith("  - ") and "fix: " in line for line in lines[1:]) and len(lines) == 3


# --- config files ---------------------------------------------------------------------------

def test_load_file_ignores_private_names_modules_functions_classes(tmp_path):
    path = write(tmp_path, """\
        import os
        from pathlib import Path
        # PART 1 Settings
        _base = "org"
        pretrained_model_name_or_path = _base + "/model"
        dataset = "tatsu-lab/alpaca"
        def _helper():
            return 3
        def helper():
            return 4
        class Thing:
            pass
        batch_size = _helper()
    """)
    raw = read_config_file(path)
    assert list(raw) == ["pretrained_model_name_or_path", "dataset", "batch_size"]
    s = load_settings(str(path))
    assert s.pretrained_model_name_or_path == "org/model" and s.batch_size == 3


def test_unknown_names_get_did_you_mean(tmp_path):
    path = write(tmp_path, """\
        pretrained_model_name_or_path = "org/model"
        dataset = "d"
        use_varlen_atn = True
        learning_rate = 1e-4
        SYSTEM = "hi"
        model = dict(type="AutoModelForCausalLM")
        frobnicate = 1
    """)
    with pytest.raises(ConfigError) as err:
        load_settings(str(path))
    lines = [str(p) for p in err.value.problems]
    assert "unknown setting `use_varlen_atn`; did you mean `use_varlen_attn`? fix: rename it `use_varlen_attn`" in lines
    assert "unknown setting `learning_rate`; did you mean `lr`? fix: rename it `lr`" in lines
    assert "unknown setting `SYSTEM` (an XTuner name); fix: rename it `system_prompt`" in lines
    assert any(line.startswith("unknown setting `model`: packtune configs hold settings, not wiring") for line in lines)
    assert any(line.startswith("unknown setting `frobnicate`; fix: remove it, or start its name with `_`") for line in lines)
    assert err.value.source == str(path) and str(err.value).startswith(f"config {str(path)!r} has 5 problems:")


def test_file_errors_are_config_errors_with_the_line(tmp_path):
    bad = write(tmp_path, "dataset = 'd'\nlr = (\n", "syntax.py")
    with pytest.raises(ConfigError, match=r"syntax\.py:2: SyntaxError"):
        load_settings(str(bad))
    raising = write(tmp_path, "dataset = 'd'\nlr = undefined_name\n", "raising.py")
    with pytest.raises(ConfigError, match=r"raising\.py:2: running the config raised NameError"):
        load_settings(str(raising))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="no built-in config named 'not_a_config'"):
        load_settings("not_a_config")


# --- --cfg-options -------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("16", 16), ("1e-4", 1e-4), ("True", True), ("None", None), ("[1, 2]", [1, 2]),
    ("(0.9, 0.95)", (0.9, 0.95)), ("{'r': 4}", {"r": 4}), ("'quoted'", "quoted"),
    ("tatsu-lab/alpaca", "tatsu-lab/alpaca"), ("chatml", "chatml"), ("", ""), ("true", "true"),
    ("a=b", "a=b"),
])
def test_parse_value_literal_or_raw_string(text, value):
    assert parse_value(text) == value


def test_overrides_literal_string_fallback_and_dotted(tmp_path):
    path = write(tmp_path, """\
        pretrained_model_name_or_path = "org/model"
        dataset = "d"
        lora = dict(r=8, alpha=16)
    """)
    s = load_settings(str(path), ["lr=1e-4", "dataset=tatsu-lab/alpaca", "lora.r=16", "lora.target_modules=['q_proj']",
                                  "prompt_template=chatml", "system_prompt=You are terse.", "betas=[0.9,0.95]"])
    assert s.lr == 1e-4 and s.dataset == "tatsu-lab/alpaca" and s.prompt_template == "chatml"
    assert s.lora["r"] == 16 and s.lora["alpha"] == 16 and s.lora["target_modules"] == ["q_proj"]
    assert s.system_prompt == "You are terse." and s.betas == (0.9, 0.95)


def test_overrides_do_not_mutate_shared_objects():
    shared = {"r": 8}
    raw = {"lora": shared}
    assert apply_overrides(raw, ["lora.r=4"]) == []
    assert raw["lora"] == {"r": 4} and shared == {"r": 8}


def test_override_problems_are_reported_with_validation_problems(tmp_path):
    path = write(tmp_path, "pretrained_model_name_or_path = 'a/b'\ndataset = 'd'\n")
    with pytest.raises(ConfigError) as err:
        load_settings(str(path), ["novalue", "lora.r=16", "batch_size=4.0", "use_varlen_atn=False", "lr.x=1", ".=1",
                                       "lroa.r=4", "dataset.x=1"])
    lines = [str(p) for p in err.value.problems]
    assert "option 'novalue' is not KEY=VALUE; fix: write it as KEY=VALUE, e.g. `--cfg-options lr=1e-4 lora.r=16`" in lines
    assert any("`lora.r` needs LoRA, but this config has `lora = None` (full fine-tuning)" in line
               and "--cfg-options \"lora={'r': 16}\"" in line for line in lines)
    assert any("`lr` is 2e-05, not a dict, so `lr.x` cannot be set" in line for line in lines)
    assert any("option key '.' has an empty part" in line for line in lines)
    assert any("unknown setting `lroa`; did you mean `lora`?" in line for line in lines)
    assert any("`dataset` is 'd', not a dict, so `dataset.x` cannot be set" in line for line in lines)
    assert any("did you mean `use_varlen_attn`?" in line for line in lines)
    assert any("write `batch_size = 4` (an int, not a float)" in line for line in lines)
    assert len(lines) == 8


def test_dotted_override_into_model_config(tmp_path):
    s = load_settings("tiny_llama_full_demo", ["model_config.hidden_size=64", "max_length=128"])
    assert s.model_config["hidden_size"] == 64 and s.model_config["model_type"] == "llama"


# --- round trips ---------------------------------------------------------------------------

def test_settings_to_dict_is_json_and_round_trips():
    s = Settings(**BASE, lora=dict(r=4))
    d = settings_to_dict(s)
    assert json.loads(json.dumps(d)) == d
    assert Settings(**d) == s


def test_settings_to_source_loads_back_equal(tmp_path):
    s = load_settings("tiny_llama_lora_demo")
    text = settings_to_source(s, title="tiny llama, as run")
    for part in ("PART 1  Settings", "PART 2  Model", "PART 3  Dataset", "PART 4  Scheduler & Optimizer", "PART 5  Runtime"):
        assert part in text
    path = write(tmp_path, text, "resolved.py")
    assert load_settings(str(path)) == s
