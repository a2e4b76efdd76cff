"""Tool-call replies under the PUBLISHED chat templates of GLM-4 and DeepSeek-R1 (issue 16).

A reply whose text or tool calls the template does not write is never trained as an empty turn:
the conversation is refused under ``reply_not_rendered``, with the template's source and the first
such row in the report. GLM-4 (``THUDM/glm-4-9b-chat``) writes a message only when its content is
non-empty and never reads ``tool_calls``; DeepSeek-R1 (``deepseek-ai/DeepSeek-R1``) writes calls
only when ``content`` is null, a key transformers drops before rendering. Data shaped the way
GLM-4 reads calls (the call in ``content``, the function name in ``metadata``) is kept and trained.

The two Jinja strings are the ``chat_template`` values of those repositories'
``tokenizer_config.json``, as JSON text (parsed here), unchanged. Token ids come from the real
Mistral v1 tokenizer with each family's special tokens added.
"""

from __future__ import annotations

import copy
import json
import re

import pytest

from packtune.data import DataOptions, build_dataset, format_report, get_template, load_tokenizer
from packtune.data.formats import to_sample
from packtune.data.tokenize import encode_segments
from packtune.data.turns import ReplyNotRendered
from packtune.packing.packs import IGNORE_INDEX

# THUDM/glm-4-9b-chat, tokenizer_config.json "chat_template".
GLM4 = json.loads('"' + (
    r"""[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n你是一个名为 ChatGLM 的人"""
    r"""工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{% set tools = item['tools'] %"""
    r"""}{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n## {{ tool['function']['name'] }}\n\n"""
    r"""{{ tool['function'] | tojson(indent=4) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。{% elif tool['type'] == 'pyth"""
    r"""on' %}\n\n## python\n\n当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n`python"""
    r"""` 返回代码执行的输出，或在执行 60 秒后返回超时。\n`/mnt/data` 将会持久化存储你的文件。在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求或者"""
    r"""在线 API 调用，这些在线内容的访问将不会成功。{% elif tool['type'] == 'simple_browser' %}\n\n## simple_browser\n\n你可以使用 `"""
    r"""simple_browser` 工具。该工具支持以下函数：\n`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency"""
    r"""_days` 参数控制搜索内容的时效性。\n`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。选择多个角度的页面，同时尽可能选择可信"""
    r"""任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心内容过多。\n`open_url(url: str)`：打开指定的 URL。\n\n使用 `【{引用 id}†{引用"""
    r"""文本}】` 来引用内容。\n\n操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; 3. 根据获得的内容进行回复。在回复中应当引用信"""
    r"""息来源。\n 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。{% elif tool['ty"""
    r"""pe'] == 'cogview' %}\n\n## cogview\n\n如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。你需要向 `cogview` 发"""
    r"""送图像描述，规则：\n- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n- 保持用户原"""
    r"""始描述的意图。不要虚构内容或者没见过的人物。\n- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。{% endif %}{% endfor %}{% endif %}{% if i"""
    r"""tem['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}{% en"""
    r"""dfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"""
) + '"')

# deepseek-ai/DeepSeek-R1, tokenizer_config.json "chat_template".
DEEPSEEK_R1 = json.loads('"' + (
    r"""{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% se"""
    r"""t ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for me"""
    r"""ssage in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'"""
    r"""] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if m"""
    r"""essage['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endi"""
    r"""f %}{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = fals"""
    r"""e -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁be"""
    r"""gin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```j"""
    r"""son' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_fi"""
    r"""rst = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['fun"""
    r"""ction']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜too"""
    r"""l▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}{%- i"""
    r"""f message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{{'<｜tool▁"""
    r"""outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else """
    r"""%}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split"""
    r"""('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- e"""
    r"""ndif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{"""
    r"""{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set"""
    r""" ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool"""
    r"""▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{"""
    r"""% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"""
) + '"')

GLM4_SPECIALS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
R1_SPECIALS = ["<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
               "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁output▁begin｜>",
               "<｜tool▁output▁end｜>", "<｜tool▁outputs▁end｜>", "<think>", "</think>"]

QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
CALLS = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
RESULT = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
ANSWER = {"role": "assistant", "content": "Sunny."}
# OpenAI-style rows: a call-only reply (null content), and a reply with both text and calls.
CALL_ONLY = [QUESTION, {"role": "assistant", "content": None, "tool_calls": CALLS}, RESULT, ANSWER]
TEXT_AND_CALLS = [QUESTION, {"role": "assistant", "content": "Let me look.", "tool_calls": CALLS}, RESULT, ANSWER]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """``{"glm4": folder, "r1": folder}``: the Mistral v1 tokenizer with each family's special tokens,
    BOS/EOS and published chat template, saved (GLM-4 with its generation config's stop list)."""
    from transformers import GenerationConfig

    root = tmp_path_factory.mktemp("tool_tok")
    base = load_tokenizer("packtune://mistral-v1", cache_dir=tmp_path_factory.getbasetemp() / "tokcache")
    out = {}
    for name, specials, extra, template in (
            ("glm4", GLM4_SPECIALS, {"eos_token": "<|endoftext|>"}, GLM4),
            ("r1", R1_SPECIALS, {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
             DEEPSEEK_R1)):
        tok = copy.deepcopy(base)
        tok.add_special_tokens({"additional_special_tokens": specials, **extra})
        tok.chat_template = template
        tok.save_pretrained(root / name)
        if name == "glm4":  # GLM-4's generation_config.json: <|endoftext|>, <|user|>, <|observation|>
            stops = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
            GenerationConfig(eos_token_id=stops).save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def write_rows(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return str(path)


@pytest.mark.parametrize("family", ["glm4", "r1"])
@pytest.mark.parametrize("conv", [CALL_ONLY, TEXT_AND_CALLS], ids=["call_only", "text_and_calls"])
def test_a_reply_whose_calls_the_template_does_not_write_is_refused(toks, family, conv):
    tok = load_tokenizer(toks[family])
    messages = to_sample({"messages": conv}, "messages").messages  # the null content becomes ""
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert "get_weather" not in rendered  # the premise: the published template leaves the call out
    with pytest.raises(ReplyNotRendered, match=rf"chat template of {re.escape(toks[family])}: reply 1: "
                                               "the template does not write its tool calls"):
        get_template("auto", tok).render(messages)


@pytest.mark.parametrize("family", ["glm4", "r1"])
def test_refused_rows_are_counted_with_the_template_and_first_row(toks, family, tmp_path, capsys):
    """Through ``build_dataset`` and ``packtune log-dataset``: the plain conversation is kept, both
    tool-call rows are refused under ``reply_not_rendered``; the first one is shown with the template."""
    from packtune.cli.main import main

    path = write_rows(tmp_path / "rows.jsonl", [[QUESTION, ANSWER], CALL_ONLY, TEXT_AND_CALLS])
    tok = load_tokenizer(toks[family])
    ds = build_dataset(DataOptions(dataset=path, data_cache_dir=str(tmp_path / "c")), tok)
    assert ds.report.kept == 1 and ds.report.skipped == {"reply_not_rendered": 2}
    example = ds.report.skip_examples["reply_not_rendered"]
    assert example.startswith(f"{path}, line 2: chat template of {toks[family]}: reply 1: ")
    # The kept conversation trains its one reply, nothing of a tool call.
    trained = [int(t) for t in ds[0]["labels"] if t != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(trained) == (["▁", "<0x0A>", "Sun", "ny", ".", "<|endoftext|>"] if family == "glm4"
                                                  else ["▁Sun", "ny", ".", "<｜end▁of▁sentence｜>"])

    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"dataset = {path!r}\ntokenizer_name_or_path = {toks[family]!r}\nmax_length = 128\n"
                   f"data_cache_dir = {str(tmp_path / 'c2')!r}\nmodel_config = dict(model_type='llama')\n")
    assert main(["log-dataset", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n +reply_not_rendered +2 .*\n +first: " + re.escape(example) + "\n", out)


def test_glm4_call_shaped_in_content_and_metadata_is_trained(toks, tmp_path):
    """The README's shape for GLM-4: the call's arguments in ``content``, its function name in
    ``metadata``. The reply trains ``get_weather\\n{...}`` and the stop the model must emit; the
    token ids and labels are spelled out (+: trained)."""
    conv = [QUESTION, {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'}]
    path = write_rows(tmp_path / "rows.jsonl", [conv])
    tok = load_tokenizer(toks["glm4"])
    assert tok.apply_chat_template(conv, tokenize=False) == (
        '[gMASK]<sop><|user|>\nWhat is the weather in Paris?<|assistant|>get_weather\n{"city": "Paris"}')
    ds = build_dataset(DataOptions(dataset=path, data_cache_dir=str(tmp_path / "c")), tok)
    assert ds.report.kept == 1 and ds.report.skipped == {}
    ids = ds[0]["input_ids"].tolist()
    labels = ds[0]["labels"].tolist()
    pieces = tok.convert_ids_to_tokens(ids)
    marked = " ".join(("+" if lab != IGNORE_INDEX else "") + p for p, lab in zip(pieces, labels))
    assert marked == ("[gMASK] <sop> <|user|> ▁ <0x0A> What ▁is ▁the ▁weather ▁in ▁Paris ? <|assistant|> "
                      "+▁get +_ +we +ather +<0x0A> +{\" +city +\": +▁\" +Par +is +\"} +<|endoftext|>")
    # The same ids and labels as the template's segments give, tokenized alone.
    segs = get_template("auto", tok).render(conv)
    seg_ids, seg_labels, _ = encode_segments(tok, [segs])
    assert seg_ids.tolist() == ids and seg_labels.tolist()[1:] == labels[1:]


def test_a_template_that_drops_a_replys_text_beside_its_calls_is_refused(toks):
    """A template written for this test that, like Llama 3.1's, writes only the call when a reply
    has calls: the reply's text would be lost, so the conversation is refused."""
    tok = load_tokenizer(toks["glm4"])
    tok.chat_template = (
        "{%- for m in messages -%}{%- if m.tool_calls is defined -%}"
        "{{- '<|assistant|>' + m.tool_calls[0].function.name + '<|endoftext|>' -}}"
        "{%- else -%}{{- '<|' + m.role + '|>' + m.content + '<|endoftext|>' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}")
    template = get_template("auto", tok)
    with pytest.raises(ReplyNotRendered, match="reply 1: the template does not write its text beside its tool calls"):
        template.render(TEXT_AND_CALLS)
    call_only = [QUESTION, {"role": "assistant", "content": "", "tool_calls": CALLS}, RESULT, ANSWER]
    segs = template.render(call_only)  # nothing of the reply is lost: kept
    assert [t for t, trained in segs if trained] == ["get_weather<|endoftext|>", "Sunny.<|endoftext|>"]
