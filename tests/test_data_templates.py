"""Prompt templates: every built-in renders a two-turn conversation to the exact string, only
the replies (with their end-of-turn) are trainable, and the tokenizer's own chat template is
used (and its replies found) when it has one."""

from __future__ import annotations

import pytest

from packtune.data import DataError, DataOptions, build_dataset, get_template, load_tokenizer, render_prompt
from packtune.data.templates import TEMPLATE_NAMES, TEMPLATES, VICUNA_SYSTEM, ChatTemplate

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]

# Each built-in template's rendering of CONV with BOS "<s>" and EOS "</s>", and the
# trained part of each reply.
EXPECTED = {
    "default": (
        "<s><|System|>:Be brief.\n<|User|>:Hi\n<|Bot|>:Hello!</s>\n<|User|>:Bye\n<|Bot|>:Goodbye.</s>",
        ["Hello!</s>", "Goodbye.</s>"],
    ),
    "chatml": (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\nGoodbye.<|im_end|>",
        ["Hello!<|im_end|>", "Goodbye.<|im_end|>"],
    ),
    "llama2_chat": (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST] Goodbye. </s>",
        [" Hello! </s>", " Goodbye. </s>"],
    ),
    "llama3_chat": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nGoodbye.<|eot_id|>",
        ["Hello!<|eot_id|>", "Goodbye.<|eot_id|>"],
    ),
    "mistral": (
        "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] Bye [/INST] Goodbye.</s>",
        [" Hello!</s>", " Goodbye.</s>"],
    ),
    "zephyr": (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
        "<|user|>\nBye</s>\n<|assistant|>\nGoodbye.</s>",
        ["Hello!</s>", "Goodbye.</s>"],
    ),
    "internlm2_chat": (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\nGoodbye.<|im_end|>",
        ["Hello!<|im_end|>", "Goodbye.<|im_end|>"],
    ),
    "gemma": (
        "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nGoodbye.<end_of_turn>",
        ["Hello!<end_of_turn>", "Goodbye.<end_of_turn>"],
    ),
    "deepseek": (
        "<s>Be brief.\n\nUser: Hi\n\nAssistant: Hello!</s>User: Bye\n\nAssistant: Goodbye.</s>",
        [" Hello!</s>", " Goodbye.</s>"],
    ),
    "vicuna": (
        "<s>Be brief. USER: Hi ASSISTANT: Hello!</s>USER: Bye ASSISTANT: Goodbye.</s>",
        [" Hello!</s>", " Goodbye.</s>"],
    ),
}
EXPECTED["qwen_chat"] = EXPECTED["chatml"]
EXPECTED["yi"] = EXPECTED["chatml"]
# ChatGLM3 ([gMASK]sop, no BOS of its own) and Baichuan2 (no BOS): the prefix is the template's.
EXPECTED["chatglm3"] = (
    "[gMASK]sop<|system|>\n Be brief.<|user|>\n Hi<|assistant|>\n Hello!</s><|user|>\n Bye<|assistant|>\n Goodbye.</s>",
    [" Hello!</s>", " Goodbye.</s>"],
)
EXPECTED["baichuan2_chat"] = (
    "Be brief.<reserved_106>Hi<reserved_107>Hello!</s><reserved_106>Bye<reserved_107>Goodbye.</s>",
    ["Hello!</s>", "Goodbye.</s>"],
)

# The generation prompt after the first user turn: the text right before the first reply.
PROMPTS = {
    "default": "<s><|System|>:Be brief.\n<|User|>:Hi\n<|Bot|>:",
    "chatml": "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "llama2_chat": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]",
    "llama3_chat": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST]",
    "zephyr": "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n",
    "internlm2_chat": "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\n",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n",
    "deepseek": "<s>Be brief.\n\nUser: Hi\n\nAssistant:",
    "vicuna": "<s>Be brief. USER: Hi ASSISTANT:",
}
PROMPTS["qwen_chat"] = PROMPTS["yi"] = PROMPTS["chatml"]
PROMPTS["chatglm3"] = "[gMASK]sop<|system|>\n Be brief.<|user|>\n Hi<|assistant|>\n"
PROMPTS["baichuan2_chat"] = "Be brief.<reserved_106>Hi<reserved_107>"

CHATML_JINJA = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("packtune://mistral-v1", cache_dir=tmp_path_factory.getbasetemp() / "tokcache")


@pytest.fixture
def chat_tok(tok):
    """The Mistral tokenizer with a ChatML chat template set on it (on a copy)."""
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = CHATML_JINJA
    return t


def test_every_builtin_template_is_tested():
    assert set(EXPECTED) == set(TEMPLATES) == set(PROMPTS)
    # Every name prompt_template accepts has a built-in template, or is one of the two that pick one.
    assert sorted(TEMPLATE_NAMES) == sorted(("auto", "tokenizer", *TEMPLATES))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_turn_rendering_is_exact(name):
    text, trained = EXPECTED[name]
    template = get_template(name, bos="<s>", eos="</s>")
    segments = template.render(CONV)
    assert "".join(t for t, _ in segments) == text
    assert [t for t, trainable in segments if trainable] == trained


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_generation_prompt_is_the_text_before_the_reply(name):
    template = get_template(name, bos="<s>", eos="</s>")
    prompt = template.prompt(CONV[:2])
    assert prompt == PROMPTS[name]
    # Training sees exactly this text before the first reply.
    assert EXPECTED[name][0].startswith(prompt + EXPECTED[name][1][0])


def test_bos_and_eos_come_from_the_tokenizer(tok):
    t = get_template("zephyr", tok)
    assert t.text(CONV[1:3]) == "<s><|user|>\nHi</s>\n<|assistant|>\nHello!</s>"
    assert t.stop == ("</s>",)
    assert get_template("llama3_chat", tok).stop == ("<|eot_id|>", "</s>")


def test_system_prompt_option_and_default_system():
    chatml = get_template("chatml", bos="", eos="")
    no_sys = CONV[1:3]
    assert chatml.text(no_sys, system="Sys").startswith("<|im_start|>system\nSys<|im_end|>\n")
    # A sample's own system message wins over the option.
    assert chatml.text(CONV, system="Other").count("Be brief.") == 1
    assert "Other" not in chatml.text(CONV, system="Other")
    # Vicuna has a default system prompt, used when neither the sample nor the option has one.
    assert get_template("vicuna", bos="", eos="").text(no_sys).startswith(VICUNA_SYSTEM + " USER: Hi")


def test_tools_go_into_the_system_prompt_and_are_not_trained():
    t = get_template("chatml", bos="", eos="")
    segs = t.render(CONV[1:3], tools='[{"name": "f"}]')
    assert segs[0] == ('<|im_start|>system\nYou can call these tools (JSON schema):\n[{"name": "f"}]<|im_end|>\n', False)


def test_tool_results_are_context():
    conv = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": '{"name": "w"}'},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    for name in TEMPLATES:
        segs = get_template(name, bos="<s>", eos="</s>").render(conv)
        trained = "".join(t for t, tr in segs if tr)
        assert "sunny" not in trained and '{"name": "w"}' in trained and "Sunny." in trained, name
        assert any("sunny" in t for t, tr in segs if not tr), name


def test_unknown_template_lists_the_known_ones(tok, tmp_path):
    with pytest.raises(ValueError, match="unknown prompt_template 'chatgpt'; known: auto, tokenizer, default, chatml"):
        get_template("chatgpt", tok)
    with pytest.raises(DataError, match="known: auto, tokenizer, default, chatml, qwen_chat"):
        build_dataset(DataOptions(dataset="x.jsonl", prompt_template="chatgpt", data_cache_dir=str(tmp_path)), tok)


def test_auto_uses_the_tokenizers_chat_template_else_default(tok, chat_tok):
    assert get_template("auto", tok).name == "default"
    assert isinstance(get_template("auto", chat_tok), ChatTemplate)


def test_chat_template_replies_found_by_prefix(chat_tok):
    segs = get_template("auto", chat_tok).render(CONV)
    assert "".join(t for t, _ in segs) == chat_tok.apply_chat_template(CONV, tokenize=False)
    assert [t for t, tr in segs if tr] == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]


def test_chat_template_without_stable_prefixes(tok):
    import copy

    t = copy.deepcopy(tok)
    # Starts with the number of messages: a shorter conversation is not a prefix of a longer one.
    t.chat_template = (
        "[{{ messages|length }}] {% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ 'A: ' + m['content'] + eos_token + ' ' }}{% else %}{{ 'U: ' + m['content'] + ' ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
    )
    segs = get_template("auto", t).render(CONV[1:])
    # What the model writes after the generation prompt 'A:', through EOS; not the space after it.
    assert [x for x, tr in segs if tr] == [" Hello!</s>", " Goodbye.</s>"]


def test_render_prompt_tokens(tok, chat_tok):
    ids = render_prompt("Hi", tok, "mistral")
    assert tok.decode(ids) == tok.decode(tok("<s>[INST] Hi [/INST]", add_special_tokens=False)["input_ids"])
    assert ids[0] == tok.bos_token_id
    ids = render_prompt([{"role": "user", "content": "Hi"}], chat_tok)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    with_sys = render_prompt("Hi", tok, "chatml", system_prompt="Be brief.")
    assert "Be brief." in tok.decode(with_sys)


TOOL_CONV = [
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": '{"name": "w"}'},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": 'Sunny, "warm" and été.'},
]


# Reasoning as a field and in the content, tool calls (OpenAI style, and a bare call).
REASONING_TOOLS_CONV = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "  Use the tool.\n",
     "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {"city": "Paris"}}}, {"name": "v"}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "<think>\nsunny means été\n</think>\n\nSunny.", "tool_calls": []},
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_to_jinja_renders_exactly_like_the_builtin(tok, name):
    """A converted model's tokenizer gets the training template as a Jinja chat template."""
    import copy

    template = get_template(name, tok)
    t = copy.deepcopy(tok)
    t.chat_template = template.to_jinja()
    for conv in (CONV, CONV[1:], TOOL_CONV, REASONING_TOOLS_CONV):
        assert t.apply_chat_template(conv, tokenize=False) == template.text(conv)
        for k in range(1, len(conv) + 1):
            assert t.apply_chat_template(conv[:k], tokenize=False, add_generation_prompt=True) == template.prompt(conv[:k])
    t.chat_template = template.to_jinja("Sys!")
    assert t.apply_chat_template(CONV[1:], tokenize=False) == template.text(CONV[1:], system="Sys!")
    # Used as "the tokenizer's chat template", it trains exactly the same text.
    t.chat_template = template.to_jinja()
    assert [x for x, tr in get_template("auto", t).render(CONV) if tr] == EXPECTED[name][1]
