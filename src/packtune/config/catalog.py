"""The built-in config catalog: one table (family x method x dataset), rendered on demand.

Every SFT entry is ``<family>_<full|lora|qlora>_<alpaca|oasst1>_e3``: a family of ``FAMILIES``
(its base model, prompt template and, for the families packtune ports, which class it trains
as), a method of ``METHODS`` and a dataset of ``DATASETS``. Every preference entry is
``<family>_<dpo|orpo|reward>_ultrafeedback_e1``: LoRA on a family of ``PREFERENCE_FAMILIES``, an
objective of ``OBJECTIVES``, a dataset of ``PAIR_DATASETS``. ``render_config(name)`` writes the
entry as the readable settings file it stands for, in XTuner's five parts; that text is what
``packtune copy-cfg`` writes and what ``packtune train NAME`` runs. The ``tiny_*`` demos, which
train offline on a CPU, are one base file (``TINY_BASE``) plus each demo's differences
(``TINY_DEMOS``), rendered the same way.

>>> "internlm_7b_full_oasst1_e3" in catalog_names()
True
>>> print(render_config("internlm_7b_full_oasst1_e3").splitlines()[0])
\"\"\"InternLM 7B (base): full fine-tuning on OpenAssistant Guanaco (oasst1, ~9.8k conversations), 3 epochs.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field, fields

from packtune.config.facts import PARTS

EPOCHS = 3


@dataclass(frozen=True)
class Family:
    """One row of the catalog: a base model and how to train it.

    ``ported`` names the class a family without a transformers class of its own trains as
    (packtune's native port, ``packtune.load_model``); ``None`` for transformers' own families.
    """

    key: str
    title: str
    base: str
    template: str
    ported: str | None = None


#: The families, in name order. Every entry of every family packs with varlen attention.
FAMILIES: tuple[Family, ...] = (
    Family("baichuan2_13b", "Baichuan2 13B (base)", "baichuan-inc/Baichuan2-13B-Base", "baichuan2_chat",
           ported="packtune's own ALiBi model class (Baichuan 13B has no transformers class)"),
    Family("baichuan2_7b", "Baichuan2 7B (base)", "baichuan-inc/Baichuan2-7B-Base", "baichuan2_chat",
           ported="transformers' Llama, with Baichuan2's NormHead"),
    Family("baichuan_7b", "Baichuan 7B", "baichuan-inc/Baichuan-7B", "default", ported="transformers' Llama"),
    Family("chatglm2_6b", "ChatGLM2 6B", "THUDM/chatglm2-6b", "chatglm3", ported="transformers' GLM (GlmForCausalLM)"),
    Family("chatglm3_6b", "ChatGLM3 6B", "THUDM/chatglm3-6b", "chatglm3", ported="transformers' GLM (GlmForCausalLM)"),
    Family("deepseek_7b", "DeepSeek LLM 7B (base)", "deepseek-ai/deepseek-llm-7b-base", "deepseek"),
    Family("falcon_h1_1_5b_deep_instruct", "Falcon-H1 1.5B Deep Instruct", "tiiuae/Falcon-H1-1.5B-Deep-Instruct",
           "tokenizer"),
    Family("gemma2_9b", "Gemma 2 9B", "google/gemma-2-9b", "gemma"),
    Family("gemma_7b", "Gemma 7B", "google/gemma-7b", "gemma"),
    Family("gpt_oss_20b", "gpt-oss 20B", "openai/gpt-oss-20b", "tokenizer"),
    Family("internlm2_7b", "InternLM2 7B", "internlm/internlm2-7b", "internlm2_chat", ported="transformers' Llama"),
    Family("internlm2_chat_7b", "InternLM2 Chat 7B", "internlm/internlm2-chat-7b", "internlm2_chat",
           ported="transformers' Llama"),
    Family("internlm_7b", "InternLM 7B (base)", "internlm/internlm-7b", "default",
           ported="transformers' Llama, with attention biases"),
    Family("lfm2_1_2b", "LFM2 1.2B", "LiquidAI/LFM2-1.2B", "tokenizer"),
    Family("llama2_7b", "Llama 2 7B", "meta-llama/Llama-2-7b-hf", "llama2_chat"),
    Family("llama3_8b_instruct", "Llama 3 8B Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "llama3_chat"),
    Family("llama4_scout_17b_16e_instruct", "Llama 4 Scout 17B-16E Instruct",
           "meta-llama/Llama-4-Scout-17B-16E-Instruct", "tokenizer"),
    Family("mistral_7b", "Mistral 7B v0.1", "mistralai/Mistral-7B-v0.1", "mistral"),
    Family("nemotron_3_nano_30b_a3b", "NVIDIA Nemotron 3 Nano 30B-A3B (Nemotron-H)",
           "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "tokenizer"),
    Family("qwen1_5_7b", "Qwen1.5 7B", "Qwen/Qwen1.5-7B", "qwen_chat"),
    Family("qwen2_5_7b_instruct", "Qwen2.5 7B Instruct", "Qwen/Qwen2.5-7B-Instruct", "qwen_chat"),
    Family("qwen3_5_27b", "Qwen3.5 27B", "Qwen/Qwen3.5-27B", "qwen_chat"),
    Family("qwen3_5_35b_a3b", "Qwen3.5 35B-A3B (MoE)", "Qwen/Qwen3.5-35B-A3B", "qwen_chat"),
    Family("qwen3_8b", "Qwen3 8B", "Qwen/Qwen3-8B", "qwen_chat"),
    Family("qwen3_next_80b_a3b_instruct", "Qwen3-Next 80B-A3B Instruct", "Qwen/Qwen3-Next-80B-A3B-Instruct",
           "qwen_chat"),
    Family("qwen_7b", "Qwen 7B (Qwen-1)", "Qwen/Qwen-7B", "qwen_chat", ported="transformers' Qwen2"),
    Family("starcoder_15b", "StarCoder 15B", "bigcode/starcoder", "default"),
    Family("yi_6b", "Yi 6B", "01-ai/Yi-6B", "yi"),
    Family("zephyr_7b_beta", "Zephyr 7B beta", "HuggingFaceH4/zephyr-7b-beta", "zephyr"),
)

_LORA = "dict(r=64, alpha=16, dropout=0.1, target_modules='all-linear', quantization={q})"
#: method -> (what the docstring calls it, learning rate, the ``lora`` line(s) of PART 2)
METHODS: dict[str, tuple[str, str, str]] = {
    "full": ("full fine-tuning", "2e-5", "lora = None  # full fine-tuning"),
    "lora": ("LoRA", "2e-4", "lora = " + _LORA.format(q="None")),
    "qlora": ("QLoRA (4-bit)", "2e-4", "# QLoRA loads the base weights in 4 bit: needs a CUDA GPU and bitsandbytes.\n"
              "lora = " + _LORA.format(q="'4bit'")),
}
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
#: dataset -> (what the docstring calls it, HF id, dataset_format, system_prompt)
DATASETS: dict[str, tuple[str, str, str, str | None]] = {
    "alpaca": ("Stanford Alpaca (52k instructions)", "tatsu-lab/alpaca", "alpaca", ALPACA_SYSTEM),
    "oasst1": ("OpenAssistant Guanaco (oasst1, ~9.8k conversations)", "timdettmers/openassistant-guanaco",
               "oasst1", None),
}


#: Preference training (``packtune.preference``): ``<family>_<objective>_<pair dataset>_e1``, LoRA
#: on the chat models below. objective -> (what the docstring calls it, learning rate, settings).
PREFERENCE_FAMILIES = ("internlm2_chat_7b", "llama3_8b_instruct", "qwen2_5_7b_instruct")
PREFERENCE_EPOCHS = 1
OBJECTIVES: dict[str, tuple[str, str, str]] = {
    "dpo": ("DPO (sigmoid loss; the reference is the base with the LoRA adapter disabled)", "5e-6",
            "method = 'dpo'\ndpo_loss = 'sigmoid'\nbeta = 0.1  # the reward scale"),
    "orpo": ("ORPO (reference-free; NLL over the chosen completion)", "5e-6",
             "method = 'orpo'\nbeta = 0.1  # the odds-ratio weight"),
    "reward": ("reward model training (AutoModelForSequenceClassification, num_labels=1)", "1e-4",
               "method = 'reward'  # the score at each completion's end-of-turn"),
}
#: pair dataset -> (what the docstring calls it, HF id, split)
PAIR_DATASETS: dict[str, tuple[str, str, str]] = {
    "ultrafeedback": ("UltraFeedback binarized (~61k preference pairs)", "HuggingFaceH4/ultrafeedback_binarized",
                      "train_prefs"),
}


EVALUATION_INPUTS = """[
    'Please tell me five scenic spots in Shanghai.',
    'Write a Python function that reverses a string.',
]"""


def _entries() -> dict[str, tuple[Family, str, str]]:
    sft = {f"{fam.key}_{method}_{data}_e{EPOCHS}": (fam, method, data)
           for fam in FAMILIES for method in METHODS for data in DATASETS}
    pairs = {f"{fam.key}_{objective}_{data}_e{PREFERENCE_EPOCHS}": (fam, objective, data)
             for fam in FAMILIES if fam.key in PREFERENCE_FAMILIES for objective in OBJECTIVES for data in PAIR_DATASETS}
    return {**sft, **pairs}


#: Every table entry: name -> (family, method, dataset).
ENTRIES: dict[str, tuple[Family, str, str]] = _entries()


# --- the tiny demos ---------------------------------------------------------------------------

#: The architecture every tiny demo shares (``TinyDemo.model`` adds ``model_type`` and changes).
TINY_MODEL: dict[str, object] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=32000,
    max_position_embeddings=512,
)

#: The tiny demos' file: full training of a random-init Mistral-style model on the demo tasks.
#: ``{title}``, ``{what}``, ``{note}``, ``{name}`` and ``{model_config}`` are filled per demo;
#: then each setting a demo names replaces its line(s) here (``TinyDemo.settings``).
TINY_BASE = '''"""{title}, {what} on the demo tasks{note}.

Runs offline on a 2-core CPU in minutes: a randomly initialised tiny model, the bundled
Mistral v1 tokenizer (vocab 32000) and the bundled demo dataset.

    packtune train {name}
"""

{part1}
# Model
pretrained_model_name_or_path = None  # random init from model_config (PART 2)
use_varlen_attn = True

# Data
dataset = 'packtune://demo_tasks.jsonl'
dataset_format = 'alpaca'
prompt_template = 'mistral'
max_length = 512
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 4
accumulative_counts = 1
max_steps = 200  # overrides max_epochs
lr = 1e-3
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0
warmup_ratio = 0.05

# Save
save_steps = 100
save_total_limit = 2

# Evaluate the generation performance during the training
evaluation_freq = 100
system_prompt = None
evaluation_inputs = [
    'Repeat after me: red river stone',
    'What sound does a cow make?',
    'What is the opposite of hot?',
]

{part2}
model_config = {model_config}
tokenizer_name_or_path = 'packtune://mistral-v1'
dtype = 'float32'  # CPU
lora = None  # full training of the tiny model

{part3}
pack_strategy = 'bfd'
shuffle_before_pack = True
overflow = 'truncate'

{part4}
loss_reduction = 'token'

{part5}
log_steps = 10
max_new_tokens = 32
seed = 0
'''

#: What a LoRA demo changes: shorter rows, fewer steps, a higher rate, the adapters.
TINY_LORA: dict[str, str] = {
    "max_length": "max_length = 256",
    "max_steps": "max_steps = 100  # overrides max_epochs",
    "lr": "lr = 2e-3",
    "save_steps": "save_steps = 50",
    "evaluation_freq": "evaluation_freq = 50",
    "lora": "# LoRA on a random-init model trains only the adapters: this exercises the LoRA path end to end.\n"
            "lora = dict(r=8, alpha=16, dropout=0.0, target_modules='all-linear', quantization=None)",
}


@dataclass(frozen=True)
class TinyDemo:
    """One tiny demo: ``TINY_BASE`` with its differences.

    ``model``: ``model_type`` and any change to ``TINY_MODEL``; ``settings``: setting name -> the
    line(s) that replace its line(s) in the base (a setting the base lacks is added at the end of
    its part); ``what`` and ``note`` complete the docstring's first line.
    """

    title: str
    model: dict[str, object]
    settings: dict[str, str] = field(default_factory=dict)
    what: str = "full training"
    note: str = ""


#: Every tiny demo by name. Adding one: a row here.
TINY_DEMOS: dict[str, TinyDemo] = {
    "tiny_llama_full_demo": TinyDemo("Tiny Llama (random init)", {"model_type": "llama"},
                                     {"prompt_template": "prompt_template = 'llama2_chat'"}),
    "tiny_llama_lora_demo": TinyDemo("Tiny Llama (random init)", {"model_type": "llama"},
                                     {"prompt_template": "prompt_template = 'llama2_chat'", **TINY_LORA}, what="LoRA"),
    "tiny_mistral_full_demo": TinyDemo("Tiny Mistral (random init)", {"model_type": "mistral"},
                                       note=": the `make demo` run"),
    "tiny_mistral_lora_demo": TinyDemo("Tiny Mistral (random init)", {"model_type": "mistral"}, TINY_LORA, what="LoRA"),
    "tiny_mistral_dpo_demo": TinyDemo(
        "Tiny Mistral (random init)", {"model_type": "mistral"},
        {
            "dataset": "dataset = 'packtune://demo_pairs.jsonl'  # packtune.demo_data.build_demo_pairs",
            "dataset_format": "dataset_format = 'preference'\nmethod = 'dpo'\ndpo_loss = 'sigmoid'\nbeta = 0.5",
            "max_length": "max_length = 256",
            "max_steps": "max_steps = 150  # overrides max_epochs",
            "lr": "lr = 3e-3",
            "save_steps": "save_steps = 150",
            "evaluation_freq": "evaluation_freq = 150",
        },
        what="DPO",
        note=" as pairs (the right answer chosen, a wrong one rejected)",
    ),
    "tiny_qwen3_full_demo": TinyDemo("Tiny Qwen3 (random init, q/k norms)", {"model_type": "qwen3", "head_dim": 32},
                                     {"prompt_template": "prompt_template = 'default'"}),
}


def tiny_names() -> list[str]:
    """The ``tiny_*`` demos' names."""
    return sorted(TINY_DEMOS)


def _part_of(setting: str) -> int:
    """The config-file part (1-5) setting ``setting`` is written in."""
    from packtune.config.settings import Settings

    for f in fields(Settings):
        if f.name == setting:
            return f.metadata["part"]
    raise KeyError(f"{setting!r} is not a setting")


def render_tiny(name: str) -> str:
    """The settings file of tiny demo ``name``: ``TINY_BASE`` with the demo's differences."""
    demo = TINY_DEMOS[name]
    model = {"model_type": demo.model["model_type"], **TINY_MODEL, **demo.model}
    model_config = "dict(\n" + "".join(f"    {k}={v!r},\n" for k, v in model.items()) + ")"
    bars = {f"part{i}": _bar(f"PART {i}  {title}") for i, title in enumerate(PARTS, start=1)}
    lines = TINY_BASE.format(title=demo.title, what=demo.what, note=demo.note, name=name, model_config=model_config,
                             **bars).splitlines()
    where = {node.targets[0].id: (node.lineno - 1, node.end_lineno)
             for node in ast.parse("\n".join(lines)).body if isinstance(node, ast.Assign)}
    added: dict[int, list[str]] = {}
    for setting, text in demo.settings.items():
        if setting not in where:
            added.setdefault(_part_of(setting), []).extend(text.splitlines())
    # Replace from the bottom up, so the line numbers above stay valid.
    for start, end, setting in sorted(((*where[k], k) for k in demo.settings if k in where), reverse=True):
        lines[start:end] = demo.settings[setting].splitlines()
    for part in sorted(added, reverse=True):
        if part == len(PARTS):
            lines += added[part]
        else:  # before the blank line that precedes the next part's bar (its title: the bar's middle line)
            bar = lines.index(bars[f"part{part + 1}"].splitlines()[1]) - 1
            lines[bar - 1 : bar - 1] = added[part]
    return "\n".join(lines) + "\n"


def catalog_names() -> list[str]:
    """Every built-in config name, table entries and tiny demos, sorted."""
    return sorted([*ENTRIES, *tiny_names()])


def _bar(title: str) -> str:
    bar = "#" * 72
    return f"{bar}\n#{title:^70}#\n{bar}"


def render_config(name: str) -> str:
    """The settings file of built-in config ``name`` (a table entry or a tiny demo).

    Raises ``KeyError`` for a name that is neither.
    """
    if name not in ENTRIES:
        if name in TINY_DEMOS:
            return render_tiny(name)
        raise KeyError(name)
    fam, method, data = ENTRIES[name]
    epochs, split, objective, prompts = EPOCHS, "train", "", EVALUATION_INPUTS
    if method in OBJECTIVES:
        what, lr, objective = OBJECTIVES[method]
        lora = METHODS["lora"][2]
        data_doc, dataset, split = PAIR_DATASETS[data]
        fmt, system, epochs = "preference", None, PREFERENCE_EPOCHS
        objective += "\n"
        what = f"LoRA {what}"
        prompts = "[]  # a reward model generates no text" if method == "reward" else prompts
    else:
        what, lr, lora = METHODS[method]
        data_doc, dataset, fmt, system = DATASETS[data]
    model_note = ""
    if fam.ported:
        model_note = (f"# Loaded through packtune's native port: trains as {fam.ported}, with no remote code\n"
                      "# and exact varlen attention, like every family.\n")
    return f'''"""{fam.title}: {what} on {data_doc}, {epochs} epoch{"s" if epochs > 1 else ""}.

    packtune copy-cfg {name} .
    packtune train {name}_copy.py
"""

{_bar("PART 1  Settings")}
# Model
pretrained_model_name_or_path = {fam.base!r}
{model_note}use_varlen_attn = True  # exact per-sample attention inside packed rows

# Data
dataset = {dataset!r}
dataset_format = {fmt!r}
{objective}prompt_template = {fam.template!r}
max_length = 2048
pack_to_max_length = True  # needs use_varlen_attn = True

# Scheduler & Optimizer
batch_size = 1  # packed rows per device
accumulative_counts = 16
max_epochs = {epochs}
lr = {lr}
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1.0  # gradient clipping
warmup_ratio = 0.03

# Save
save_steps = 500
save_total_limit = 2  # checkpoints kept

# Evaluate the generation performance during the training
evaluation_freq = 500
system_prompt = {system!r}
evaluation_inputs = {prompts}

{_bar("PART 2  Model")}
trust_remote_code = False
dtype = 'bfloat16'
gradient_checkpointing = True
{lora}

{_bar("PART 3  Dataset")}
dataset_split = {split!r}
pack_strategy = 'bfd'  # best-fit decreasing: fewest rows, order-free
shuffle_before_pack = True
overflow = 'truncate'  # samples longer than max_length

{_bar("PART 4  Scheduler & Optimizer")}
loss_reduction = 'token'  # every trained token weighs the same

{_bar("PART 5  Runtime")}
log_steps = 10
max_new_tokens = 64
seed = 0
'''
