"""Label masks on chat templates that rewrite conversations: each reply trains exactly what the
model must generate after the generation prompt, through the token that ends its turn, as it
appears in the rendering of the whole conversation; nothing else is trained.

Every template here is written for this test (none is a copy of a published one); each
reproduces one behaviour of real templates: rewriting earlier turns (an empty think block on
the newest reply only), reasoning stripped from past turns, a generation prompt that opens
``<think>``, EOS after the last turn, no end-of-turn token, a reply that repeats the user's
words, tool calls and tool results, a system prompt the template refuses. Token ids come from
the real Mistral v1 tokenizer with the templates' special tokens added.

Expected renderings are written by hand with the trained text between ``«`` and ``»``; a token
is expected trained when its last character is inside (the rule ``label_tokens`` documents).
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packtune.data import (DataError, DataOptions, build_dataset, format_report, get_template, load_tokenizer,
                           show_packs)
from packtune.data.templates import ChatTemplate
from packtune.data.tokenize import encode_segments
from packtune.packing.packs import IGNORE_INDEX, TokenizedSamples, build_packs

SPECIALS = ["<|user|>", "<|bot|>", "<|eot|>", "<|sys|>", "<|system|>", "<|tool|>", "<|assistant|>", "<|end|>",
            "<think>", "</think>"]

# Rewrites earlier turns: replies after the last user message get a think block (empty when the
# reply has no reasoning), earlier replies lose their reasoning.
REWRITE = (
    "{%- set ns = namespace(last=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set answer = m.content -%}{%- set thought = m.reasoning_content or '' -%}"
    "{%- if '</think>' in answer -%}"
    "{%- set thought = answer.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set answer = answer.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{- '<|bot|>\\n' -}}"
    "{%- if loop.index0 > ns.last -%}{{- '<think>\\n' + thought.strip() + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- answer.strip() + '<|eot|>\\n' -}}"
    "{%- else -%}{{- '<|' + m.role + '|>\\n' + m.content + '<|eot|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|bot|>\\n' -}}{%- endif -%}"
)

# The generation prompt opens a think block; past replies are written without their reasoning,
# the last one with it.
THINK_PROMPT = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- '<|user|>' + m.content -}}"
    "{%- else -%}"
    "{%- set answer = m.content -%}{%- set thought = '' -%}"
    "{%- if '</think>' in answer -%}"
    "{%- set thought = answer.split('</think>')[0].split('<think>')[-1].strip() -%}"
    "{%- set answer = answer.split('</think>')[-1].strip() -%}"
    "{%- endif -%}"
    "{{- '<|bot|>' -}}"
    "{%- if loop.last and thought -%}{{- '<think>\\n' + thought + '\\n</think>\\n\\n' -}}{%- endif -%}"
    "{{- answer + '<|eot|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|bot|><think>\\n' -}}{%- endif -%}"
)

# Every turn ends with <|end|> and a newline; the conversation ends with EOS.
EOS_AFTER_LAST = (
    "{%- for m in messages -%}{{- '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
)

# No end-of-turn token: the next role token follows the reply directly.
NO_END_OF_TURN = (
    "{{- bos_token -}}{%- for m in messages -%}{{- '<|' + m.role + '|>\\n' + m.content -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# Tools as the template writes them, tool calls from the message's tool_calls, tool results.
TOOLS = (
    "{{- bos_token -}}{%- if tools -%}{{- '<|sys|>\\n' + (tools | tojson) + '<|eot|>\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}{{- '<|bot|>\\n' + m.content -}}"
    "{%- for c in m.tool_calls or [] -%}"
    "{{- '<call>' + c.function.name + ' ' + (c.function.arguments | tojson) + '</call>' -}}"
    "{%- endfor -%}"
    "{{- '<|eot|>\\n' -}}"
    "{%- else -%}{{- '<|' + m.role + '|>\\n' + m.content + '<|eot|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|bot|>\\n' -}}{%- endif -%}"
)

# Refuses a system prompt.
NO_SYSTEM = (
    "{%- if messages[0].role == 'system' -%}{{- raise_exception('System role not supported') -}}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- '<|user|>' + m.content + '<|eot|>' -}}"
    "{%- else -%}{{- '<|bot|>' + m.content + '<|eot|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|bot|>' -}}{%- endif -%}"
)


def user(text):
    return {"role": "user", "content": text}


def bot(text, **extra):
    return {"role": "assistant", "content": text, **extra}


THINKING = [user("Say OK"), bot("<think>\nEasy.\n</think>\n\nOK"), user("Again"),
            bot("<think>\nStill easy.\n</think>\nOK")]
CALL = [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}}]

# id -> (template, conversation, render keywords, expected rendering with «trained» text)
CASES = {
    "rewrites_earlier_turns": (
        REWRITE,
        [user("Say OK"), bot("<think>\nTo be sure.\n</think>\n\nOK"), user("Once more"), bot("OK")],
        {},
        "<s><|user|>\nSay OK<|eot|>\n<|bot|>\n«OK<|eot|>»\n<|user|>\nOnce more<|eot|>\n"
        "<|bot|>\n«<think>\n\n</think>\n\nOK<|eot|>»\n",
    ),
    "reasoning_stripped_from_past_turns": (
        REWRITE,
        [{"role": "system", "content": "Be brief."}, user("2+2?"), bot("4", reasoning_content="Two and two."),
         user("And 3+3?"), bot("<think>\nThree and three.\n</think>\n\n6")],
        {},
        "<s><|system|>\nBe brief.<|eot|>\n<|user|>\n2+2?<|eot|>\n<|bot|>\n«4<|eot|>»\n<|user|>\nAnd 3+3?<|eot|>\n"
        "<|bot|>\n«<think>\nThree and three.\n</think>\n\n6<|eot|>»\n",
    ),
    "reasoning_masked": (
        REWRITE,
        [user("2+2?"), bot("4", reasoning_content="Two and two.")],
        {"train_on_reasoning": False},
        "<s><|user|>\n2+2?<|eot|>\n<|bot|>\n<think>\nTwo and two.\n</think>\n\n«4<|eot|>»\n",
    ),
    "generation_prompt_opens_think": (
        THINK_PROMPT,
        THINKING,
        {},
        "<s><|user|>Say OK<|bot|>«OK<|eot|>»<|user|>Again<|bot|><think>\n«Still easy.\n</think>\n\nOK<|eot|>»",
    ),
    "generation_prompt_opens_think_masked": (
        THINK_PROMPT,
        THINKING,
        {"train_on_reasoning": False},
        "<s><|user|>Say OK<|bot|>«OK<|eot|>»<|user|>Again<|bot|><think>\nStill easy.\n</think>\n\n«OK<|eot|>»",
    ),
    "eos_after_last_turn": (
        EOS_AFTER_LAST,
        [user("Hi"), bot("Hello!"), user("Bye"), bot("Goodbye.")],
        {},
        "<|user|>\nHi<|end|>\n<|assistant|>\n«Hello!<|end|>»\n<|user|>\nBye<|end|>\n<|assistant|>\n«Goodbye.<|end|>»\n</s>",
    ),
    "no_end_of_turn_token": (  # no generation config: the tokenizer's EOS is the stop, inserted
        NO_END_OF_TURN,
        [user("Hi"), bot("Hello!"), user("Bye"), bot("Goodbye.")],
        {},
        "<s><|user|>\nHi<|assistant|>\n«Hello!</s>»<|user|>\nBye<|assistant|>\n«Goodbye.</s>»",
    ),
    "reply_repeats_user_text": (
        REWRITE,
        [user("Reply OK or no"), bot("OK"), user("Say no"), bot("no")],
        {},
        "<s><|user|>\nReply OK or no<|eot|>\n<|bot|>\n«OK<|eot|>»\n<|user|>\nSay no<|eot|>\n"
        "<|bot|>\n«<think>\n\n</think>\n\nno<|eot|>»\n",
    ),
    "tool_calls_and_results": (
        TOOLS,
        [user("Weather in Rome?"), bot("", tool_calls=CALL), {"role": "tool", "content": "sunny"}, bot("Sunny.")],
        {"tools": json.dumps([{"name": "weather"}])},
        '<s><|sys|>\n[{"name": "weather"}]<|eot|>\n<|user|>\nWeather in Rome?<|eot|>\n'
        '<|bot|>\n«<call>weather {"city": "Rome"}</call><|eot|>»\n<|tool|>\nsunny<|eot|>\n<|bot|>\n«Sunny.<|eot|>»\n',
    ),
    "system_prompt_refused": (  # renders without one; with one, see test_refused_system_prompt_*
        NO_SYSTEM,
        [user("Hi"), bot("Hello!")],
        {},
        "<s><|user|>Hi<|eot|><|bot|>«Hello!<|eot|>»",
    ),
}


@pytest.fixture(scope="module")
def base_tok(tmp_path_factory):
    tok = load_tokenizer("packtune://mistral-v1", cache_dir=tmp_path_factory.getbasetemp() / "tokcache")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    return tok


def with_template(tok, template):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def parse_marked(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """``"a«b»c"`` -> ``("abc", [(1, 2)])``: the text and its trained character spans."""
    text, spans, pos = "", [], 0
    for i, piece in enumerate(marked.replace("»", "«").split("«")):
        if i % 2:
            spans.append((pos, pos + len(piece)))
        text += piece
        pos += len(piece)
    return text, spans


def expected_tokens(tok, marked: str) -> tuple[list[int], list[int]]:
    """Ids of the whole text, and labels: a token is trained when its last character is in a span."""
    text, spans = parse_marked(marked)
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    labels = [i if any(a <= max(e - 1, s) < b for a, b in spans) else IGNORE_INDEX
              for i, (s, e) in zip(enc.ids, enc.offsets)]
    return list(enc.ids), labels


def render(tok, template, conv, **kw):
    return get_template("auto", with_template(tok, template)).render(conv, **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_ids_and_labels_through_a_pack(base_tok, case):
    template, conv, kw, marked = CASES[case]
    t = with_template(base_tok, template)
    segs = get_template("auto", t).render(conv, **kw)
    text, spans = parse_marked(marked)
    # The expected text is the template's own rendering (plus the EOS inserted where it writes no stop).
    rendered = t.apply_chat_template(conv, tools=json.loads(kw["tools"]) if "tools" in kw else None, tokenize=False)
    assert rendered == (text.replace("</s>", "") if case == "no_end_of_turn_token" else text)
    assert [x for x, trained in segs if trained] == [text[a:b] for a, b in spans]
    ids, labels = expected_tokens(t, marked)
    got_ids, got_labels, _ = encode_segments(t, [segs, segs])
    assert got_ids.tolist() == ids + ids and got_labels.tolist() == labels + labels
    # Two documents in one pack: the first label of each is masked, the rest as expected.
    packs, _ = build_packs(TokenizedSamples(got_ids, got_labels, np.array([0, len(ids), 2 * len(ids)])),
                           max_length=2 * len(ids), strategy="sequential")
    (pack,) = packs
    assert pack["cu_seqlens"].tolist() == [0, len(ids), 2 * len(ids)]
    first_masked = [IGNORE_INDEX] + labels[1:]
    assert pack["input_ids"].tolist() == ids + ids and pack["labels"].tolist() == first_masked + first_masked


def test_reply_repeating_the_user_trains_the_reply_not_the_user(base_tok):
    """The tokens spelled out (+: trained): the user's 'OK' and 'no' stay context, the replies are trained."""
    template, conv, kw, _ = CASES["reply_repeats_user_text"]
    t = with_template(base_tok, template)
    ids, labels, _ = encode_segments(t, [get_template("auto", t).render(conv, **kw)])
    expected = ("<s> <|user|> ▁ <0x0A> Reply ▁OK ▁or ▁no <|eot|> ▁ <0x0A> <|bot|> ▁ <0x0A> +OK +<|eot|> ▁ <0x0A> "
                "<|user|> ▁ <0x0A> S ay ▁no <|eot|> ▁ <0x0A> <|bot|> ▁ <0x0A> +<think> +▁ +<0x0A> +<0x0A> +</think> "
                "+▁ +<0x0A> +<0x0A> +no +<|eot|> ▁ <0x0A>").split()
    expected_ids = t.convert_tokens_to_ids([x.removeprefix("+") for x in expected])
    assert ids.tolist() == expected_ids
    assert labels.tolist() == [i if x.startswith("+") else IGNORE_INDEX for i, x in zip(expected_ids, expected)]


def test_no_end_of_turn_token_trains_the_generation_configs_stop(base_tok, tmp_path):
    """A generation config saved next to the tokenizer lists <|user|> as a stop: the next role
    token is what ends a reply; the last reply, followed by nothing, gets the EOS."""
    from transformers import GenerationConfig

    t = with_template(base_tok, NO_END_OF_TURN)
    t.save_pretrained(tmp_path / "tok")
    GenerationConfig(eos_token_id=[t.eos_token_id, t.convert_tokens_to_ids("<|user|>")]).save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    template = get_template("auto", loaded)
    assert template.stop == ("</s>", "<|user|>")
    conv = [user("Hi"), bot("Hello!"), user("Bye"), bot("Goodbye.")]
    marked = "<s><|user|>\nHi<|assistant|>\n«Hello!<|user|>»\nBye<|assistant|>\n«Goodbye.</s>»"
    segs = template.render(conv)
    ids, labels, _ = encode_segments(loaded, [segs])
    assert (ids.tolist(), labels.tolist()) == expected_tokens(loaded, marked)
    # Without the generation config, <|user|> is no stop: the EOS is inserted after each reply.
    assert ChatTemplate(loaded, generation_config=None).stop == ("</s>",)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_refused_system_prompt_is_counted_with_the_templates_message(base_tok, tmp_path):
    t = with_template(base_tok, NO_SYSTEM)
    rows = [{"messages": [user("Hi"), bot("Hello!")]},
            {"messages": [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello!")]}]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    ds = build_dataset(DataOptions(dataset=path, data_cache_dir=str(tmp_path / "c")), t)
    assert ds.report.kept == 1 and ds.report.skipped == {"template_error": 1}
    assert "rows.jsonl, line 2" in ds.report.skip_examples["template_error"]
    assert "System role not supported" in ds.report.skip_examples["template_error"]
    assert re.search(r"template_error +1 .*\n +first: .*rows.jsonl, line 2: TemplateError: System role not supported",
                     format_report(ds.report))
    with pytest.raises(DataError, match="line 2: bad row .template_error: TemplateError: System role not supported"):
        build_dataset(DataOptions(dataset=path, on_bad_row="error", data_cache_dir=str(tmp_path / "c2")), t)
    # A system prompt set for every sample: every conversation refused, each one counted.
    ds = build_dataset(DataOptions(dataset=path, system_prompt="Be kind.", data_cache_dir=str(tmp_path / "c3")), t)
    assert ds.report.kept == 0 and ds.report.skipped == {"template_error": 2}


def test_reply_not_found_is_counted_not_guessed(base_tok, tmp_path):
    """A template whose text around a reply depends on the reply's words (here, its length)."""
    t = with_template(base_tok, (
        "{%- for m in messages -%}{%- if m.role == 'assistant' and m.content | length > 3 -%}{{- '<|bot|>long:' -}}"
        "{%- elif m.role == 'assistant' -%}{{- '<|bot|>' -}}{%- else -%}{{- '<|user|>' -}}{%- endif -%}"
        "{{- m.content + '<|eot|>' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|bot|>' -}}{%- endif -%}"))
    path = write_rows(tmp_path / "rows.jsonl", [{"messages": [user("Hi"), bot("OK")]}])
    ds = build_dataset(DataOptions(dataset=path, data_cache_dir=str(tmp_path / "c")), t)
    assert ds.report.skipped == {"reply_not_found": 1} and ds.report.kept == 0
    assert "changes with the reply's words" in ds.report.skip_examples["reply_not_found"]


def test_template_that_reads_the_users_words_still_locates_replies(base_tok):
    """Text that depends on a user message's words: the replies are found with the users' text kept."""
    t = with_template(base_tok, (
        "{%- for m in messages -%}{%- if m.role == 'user' and m.content.startswith('!') -%}"
        "{{- '<|user|>command: ' + m.content[1:] + '<|eot|>' -}}"
        "{%- elif m.role == 'user' -%}{{- '<|user|>' + m.content + '<|eot|>' -}}"
        "{%- else -%}{{- '<|bot|>' + m.content + '<|eot|>' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|bot|>' -}}{%- endif -%}"))
    segs = get_template("auto", t).render([user("!go"), bot("Going."), user("Hi"), bot("Hello!")])
    assert segs == [("<|user|>command: go<|eot|><|bot|>", False), ("Going.<|eot|>", True),
                    ("<|user|>Hi<|eot|><|bot|>", False), ("Hello!<|eot|>", True)]


def test_reasoning_setting_reaches_the_labels_through_build_dataset(base_tok, tmp_path):
    t = with_template(base_tok, REWRITE)
    path = write_rows(tmp_path / "rows.jsonl", [{"messages": [user("2+2?"), bot("4", reasoning_content="Add.")]}])
    trained = {}
    for flag in (True, False):
        ds = build_dataset(DataOptions(dataset=path, train_on_reasoning=flag, data_cache_dir=str(tmp_path / "c")), t)
        assert ds.report.kept == 1 and not ds.report.tokenize_cache_hit  # the setting is in the cache key
        labels = np.asarray(ds.samples.labels)
        trained[flag] = t.decode(np.asarray(ds.samples.input_ids)[labels != IGNORE_INDEX].tolist())
    assert "Add." in trained[True] and trained[True].endswith("4<|eot|>")
    assert "Add." not in trained[False] and "think" not in trained[False] and trained[False].endswith("4<|eot|>")


def test_show_marks_the_trained_text_under_a_legend(base_tok, tmp_path):
    t = with_template(base_tok, REWRITE)
    path = write_rows(tmp_path / "rows.jsonl", [{"messages": CASES["reply_repeats_user_text"][1]}])
    out = show_packs(build_dataset(DataOptions(dataset=path, data_cache_dir=str(tmp_path / "c")), t), 1, t)
    legend, *rest = out.splitlines()
    assert legend.startswith("legend: «trained text» is learned") and "the rest is context (label -100)" in legend
    body = "\n".join(rest)
    # The user's words unmarked; each reply marked through its end-of-turn token (decode writes a
    # space after an added token).
    assert "Reply OK or no<|eot|>" in body and "Say no<|eot|>" in body
    assert body.count("«") == body.count("»") == 2
    assert "«OK<|eot|>»" in body and "«<think> \n\n</think> \n\nno<|eot|>»" in body


def test_tools_go_into_the_system_prompt_of_a_template_that_does_not_read_them(base_tok):
    segs = render(base_tok, REWRITE, [user("Weather?"), bot("Sunny.")], tools='[{"name": "weather"}]')
    assert segs[0] == ('<s><|system|>\nYou can call these tools (JSON schema):\n[{"name": "weather"}]<|eot|>\n'
                       "<|user|>\nWeather?<|eot|>\n<|bot|>\n", False)
    assert [x for x, tr in segs if tr] == ["<think>\n\n</think>\n\nSunny.<|eot|>"]


def test_builtin_templates_write_reasoning_and_mask_it_on_request():
    t = get_template("chatml", bos="", eos="")
    conv = [user("2+2?"), bot("4", reasoning_content="Add.")]
    assert [x for x, tr in t.render(conv) if tr] == ["<think>\nAdd.\n</think>\n\n4<|im_end|>"]
    assert [x for x, tr in t.render(conv, train_on_reasoning=False) if tr] == ["4<|im_end|>"]
    inline = [user("2+2?"), bot("<think>Add.</think>\n4")]
    assert [x for x, tr in t.render(inline, train_on_reasoning=False) if tr] == ["4<|im_end|>"]


# --- properties ---------------------------------------------------------------------------------

WORDS = ["OK", "no", "Say", "yes", "2+2", "sure", "Hi", "again"]
text_st = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(" ".join)


@st.composite
def conversations(draw, tool_rounds: bool):
    """1-3 user/assistant rounds over a small shared vocabulary (replies often repeat the user's
    words), each reply with no reasoning, reasoning in ``reasoning_content``, or in the content;
    with ``tool_rounds``, a round may first call a tool (a reply, then a tool result)."""
    msgs = []
    for _ in range(draw(st.integers(1, 3))):
        msgs.append(user(draw(text_st)))
        if tool_rounds and draw(st.booleans()):
            msgs += [bot(draw(text_st)), {"role": "tool", "content": draw(text_st)}]
        answer, kind = draw(text_st), draw(st.sampled_from(["none", "field", "inline"]))
        thought = draw(text_st)
        if kind == "field":
            msgs.append(bot(answer, reasoning_content=thought))
        elif kind == "inline":
            msgs.append(bot(f"<think>\n{thought}\n</think>\n\n{answer}"))
        else:
            msgs.append(bot(answer))
    return msgs


def parts(m):
    """(thought, answer) of a reply, as the test templates read them."""
    c = m["content"]
    if "</think>" in c:
        return c.split("</think>")[0].split("<think>")[-1].strip(), c.split("</think>")[-1].strip()
    return (m.get("reasoning_content") or "").strip(), c.strip()


def marked_rewrite(conv, reasoning):
    last = max(i for i, m in enumerate(conv) if m["role"] == "user")
    out = "<s>"
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            out += f"<|{m['role']}|>\n{m['content']}<|eot|>\n"
            continue
        thought, answer = parts(m)
        block = f"<think>\n{thought}\n</think>\n\n" if i > last else ""
        out += "<|bot|>\n" + (f"«{block}" if reasoning else f"{block}«") + f"{answer}<|eot|>»\n"
    return out


def marked_think_prompt(conv, reasoning):
    out = "<s>"
    for i, m in enumerate(conv):
        if m["role"] == "user":
            out += f"<|user|>{m['content']}"
            continue
        thought, answer = parts(m)
        if not m["content"].count("</think>"):
            thought = ""  # this template reads reasoning from the content only
        if i == len(conv) - 1 and thought:
            out += "<|bot|><think>\n" + (f"«{thought}\n</think>\n\n" if reasoning else f"{thought}\n</think>\n\n«")
            out += f"{answer}<|eot|>»"
        else:
            out += f"<|bot|>«{answer}<|eot|>»"
    return out


def marked_eos_after_last(conv, reasoning):
    turns = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" if m["role"] != "assistant"
                    else f"<|assistant|>\n«{m['content']}<|end|>»\n" for m in conv)
    return turns + "</s>"


def marked_no_end_of_turn(conv, reasoning):
    return "<s>" + "".join(f"<|{m['role']}|>\n{m['content']}" if m["role"] != "assistant"
                           else f"<|assistant|>\n«{m['content']}</s>»" for m in conv)


PROPERTY_TEMPLATES = {
    "rewrite": (REWRITE, marked_rewrite),
    "think_prompt": (THINK_PROMPT, marked_think_prompt),
    "eos_after_last": (EOS_AFTER_LAST, marked_eos_after_last),
    "no_end_of_turn": (NO_END_OF_TURN, marked_no_end_of_turn),
}


@pytest.fixture(scope="module")
def property_templates(base_tok):
    return {name: (get_template("auto", with_template(base_tok, jinja)), model)
            for name, (jinja, model) in PROPERTY_TEMPLATES.items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), name=st.sampled_from(sorted(PROPERTY_TEMPLATES)), reasoning=st.booleans())
def test_trained_tokens_are_exactly_the_replies(base_tok, property_templates, data, name, reasoning):
    """Decoded through their character offsets (exact, unlike ``decode`` which adds a space after
    added tokens), the trained tokens are the replies as rendered plus their stops, in order, and
    no trained token lies outside a reply: no user text."""
    template, model = property_templates[name]
    conv = data.draw(conversations(tool_rounds=name != "think_prompt"))  # it writes every non-user turn as a reply
    if name in ("eos_after_last", "no_end_of_turn"):
        conv = [bot(m["content"]) if m["role"] == "assistant" else m for m in conv]  # they write content as is
        reasoning = True
    marked = model(conv, reasoning)
    text, spans = parse_marked(marked)
    segs = template.render(conv, train_on_reasoning=reasoning)
    assert "".join(x for x, _ in segs) == text
    ids, labels, _ = encode_segments(template.tokenizer, [segs])
    assert (ids.tolist(), labels.tolist()) == expected_tokens(template.tokenizer, marked)
    enc = template.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    covered = np.zeros(len(text), bool)
    for (s, e), lab in zip(enc.offsets, labels.tolist()):
        if lab != IGNORE_INDEX:
            covered[s:e] = True
    edges = np.flatnonzero(np.diff(np.concatenate([[0], covered.astype(np.int8), [0]])))
    runs = [text[a:b] for a, b in zip(edges[::2], edges[1::2])]
    assert runs == [text[a:b] for a, b in spans]
    for a, b in zip(edges[::2], edges[1::2]):  # every trained character inside a reply's span
        assert any(s <= a and b <= e for s, e in spans)
