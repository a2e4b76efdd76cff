"""Prompt templates: a conversation rendered to text segments, each trained or not.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``.
``Template.render`` turns it into **segments** ``(text, trainable)``; the tokenizer later
marks a token trained when its last character lies in a trainable segment. Only assistant
replies are trainable, each with its end-of-turn token; the system prompt, the user turns,
tool results, the role headers and the separators between turns are context (label -100).

Two kinds of template:

* **Built-in** (``TEMPLATES``), selectable by name: ``default``, ``chatml`` (= ``qwen_chat``),
  ``llama2_chat``, ``llama3_chat``, ``mistral``, ``zephyr``, ``internlm2_chat``, ``gemma``,
  ``deepseek``, ``yi``, ``vicuna``, ``chatglm3``, ``baichuan2_chat``. ``{bos}`` and ``{eos}`` in them stand for the tokenizer's own
  BOS and EOS tokens (empty when it has none). Every conversation starts with ``{bos}``.
* **The tokenizer's chat template** (``ChatTemplate``), used by ``"auto"`` when the tokenizer
  has one. Each reply trains what the model must generate after the generation prompt, up to
  and including the token that ends its turn, as it appears in the rendering of the whole
  conversation; the turns are located by structure (``packtune.data.turns``).

Reasoning (``<think>...</think>`` at the start of a reply, or a ``reasoning_content`` field) is
trained as the template renders it; ``render(..., train_on_reasoning=False)`` makes it context.

Worked example, ``chatml`` with BOS ``<s>`` (spaces added here for reading only)::

    >>> t = get_template("chatml", bos="<s>", eos="</s>")
    >>> segs = t.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    >>> [(text, trained) for text, trained in segs if text]   # doctest: +NORMALIZE_WHITESPACE
    [('<s>', False), ('<|im_start|>user\\nHi<|im_end|>\\n', False),
     ('<|im_start|>assistant\\n', False), ('Yo<|im_end|>', True)]
    >>> t.prompt([{"role": "user", "content": "Hi"}])
    '<s><|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'

``BuiltinTemplate.to_jinja()`` writes a built-in template as an equivalent Jinja chat
template, so a converted model's tokenizer renders prompts exactly as training did.

Tools: a conversation may come with a ``tools`` description (a JSON string); it is added to
the system prompt (``TOOLS_PREAMBLE``), so it is context like the rest of the system prompt
(a chat template that reads ``tools`` gets them as they are). Tool calls are part of the reply.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from packtune.config.settings import PROMPT_TEMPLATES as TEMPLATE_NAMES
from packtune.data.errors import DataError
from packtune.data.turns import (THINK_CLOSE, THINK_OPEN, ReplyNotRendered, TurnFinder, eos_tokens,
                                 load_generation_config, split_think)

Segment = tuple[str, bool]
#: ``{"role", "content"}``; an assistant message may also carry ``reasoning_content`` and
#: ``tool_calls`` (OpenAI style), a tool result ``name`` and ``tool_call_id``.
Message = dict[str, Any]

#: How a conversation's ``tools`` field is added to its system prompt.
TOOLS_PREAMBLE = "You can call these tools (JSON schema):\n"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class TemplateSpec:
    """The strings of a built-in template. ``{content}`` is the message text.

    A conversation renders as ``prefix``, then each message: ``system``, ``user`` or ``tool``
    (context), or ``assistant_prefix`` (context; also the generation prompt) followed by
    ``assistant`` (trained: the reply and its end-of-turn) and, when another message follows,
    ``sep`` (context). With ``merge_system`` set the template has no system turn: the system
    prompt goes into the first user message through that format (``{system}``, ``{content}``).
    """

    name: str
    user: str
    assistant: str
    assistant_prefix: str = ""
    system: str = ""
    tool: str = ""
    sep: str = ""
    prefix: str = "{bos}"
    merge_system: str | None = None
    default_system: str | None = None
    stop: tuple[str, ...] = ("{eos}",)
    doc: str = ""


_CHATML = dict(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    tool="<|im_start|>tool\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    sep="\n",
    stop=("<|im_end|>", "{eos}"),
)

_SPECS = [
    TemplateSpec(
        "default",
        system="<|System|>:{content}\n",
        user="<|User|>:{content}\n",
        tool="<|Tool|>:{content}\n",
        assistant_prefix="<|Bot|>:",
        assistant="{content}{eos}",
        sep="\n",
        doc="XTuner's default: <|User|>:...\\n<|Bot|>:... EOS",
    ),
    TemplateSpec("chatml", **_CHATML, doc="ChatML (<|im_start|>role ... <|im_end|>), as Qwen"),
    TemplateSpec("qwen_chat", **_CHATML, doc="same as chatml"),
    TemplateSpec("yi", **_CHATML, doc="Yi chat: ChatML"),
    TemplateSpec(
        "llama2_chat",
        user="[INST] {content} [/INST]",
        tool="[INST] {content} [/INST]",
        assistant=" {content} {eos}",
        sep="{bos}",
        merge_system="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
        doc="Llama 2 chat: <s>[INST] <<SYS>>..<</SYS>> user [/INST] reply </s>",
    ),
    TemplateSpec(
        "llama3_chat",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>",
        stop=("<|eot_id|>", "{eos}"),
        doc="Llama 3 instruct (<|start_header_id|>role<|end_header_id|> ... <|eot_id|>)",
    ),
    TemplateSpec(
        "mistral",
        user="[INST] {content} [/INST]",
        tool="[TOOL_RESULTS] {content} [/TOOL_RESULTS]",
        assistant=" {content}{eos}",
        merge_system="{system}\n\n{content}",
        doc="Mistral instruct: <s>[INST] user [/INST] reply</s>",
    ),
    TemplateSpec(
        "zephyr",
        system="<|system|>\n{content}{eos}\n",
        user="<|user|>\n{content}{eos}\n",
        tool="<|tool|>\n{content}{eos}\n",
        assistant_prefix="<|assistant|>\n",
        assistant="{content}{eos}",
        sep="\n",
        doc="Zephyr: <|user|>\\n...</s>\\n<|assistant|>\\n...</s>",
    ),
    TemplateSpec(
        "internlm2_chat",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        tool="<|im_start|>environment\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant="{content}<|im_end|>",
        sep="\n",
        stop=("<|im_end|>", "{eos}"),
        doc="InternLM2 chat: ChatML with BOS, tool results as 'environment'",
    ),
    TemplateSpec(
        "gemma",
        user="<start_of_turn>user\n{content}<end_of_turn>\n",
        tool="<start_of_turn>user\n{content}<end_of_turn>\n",
        assistant_prefix="<start_of_turn>model\n",
        assistant="{content}<end_of_turn>",
        sep="\n",
        merge_system="{system}\n\n{content}",
        stop=("<end_of_turn>", "{eos}"),
        doc="Gemma: <start_of_turn>user ... <end_of_turn> (no system turn)",
    ),
    TemplateSpec(
        "deepseek",
        system="{content}\n\n",
        user="User: {content}\n\n",
        tool="Tool: {content}\n\n",
        assistant_prefix="Assistant:",
        assistant=" {content}{eos}",
        doc="DeepSeek LLM chat: User: ...\\n\\nAssistant: ...EOS",
    ),
    TemplateSpec(
        "vicuna",
        system="{content} ",
        user="USER: {content} ",
        tool="TOOL: {content} ",
        assistant_prefix="ASSISTANT:",
        assistant=" {content}{eos}",
        default_system=VICUNA_SYSTEM,
        doc="Vicuna v1.1: SYSTEM USER: ... ASSISTANT: ...</s>",
    ),
    # ChatGLM3's format (its tokenizer's build_chat_input): [gMASK]sop, then "<|role|>\n text",
    # the space standing for the dummy prefix SentencePiece gives each message. The original
    # writes no end of turn (the model stops on <|user|>/<|observation|>); a reply here ends
    # with EOS, also a stop token of ChatGLM3's generation config, as XTuner trains it.
    TemplateSpec(
        "chatglm3",
        prefix="[gMASK]sop",
        system="<|system|>\n {content}",
        user="<|user|>\n {content}",
        tool="<|observation|>\n {content}",
        assistant_prefix="<|assistant|>\n",
        assistant=" {content}{eos}",
        stop=("<|user|>", "<|observation|>", "{eos}"),
        doc="ChatGLM3: [gMASK]sop<|user|>\\n ...<|assistant|>\\n ... EOS",
    ),
    # Baichuan2 chat (generation_utils.build_chat_input): the system text, then user turns after
    # <reserved_106> and replies after <reserved_107> (its user/assistant token ids 195, 196); no
    # BOS. A reply ends with EOS, which Baichuan2's fine-tuning script also trains after each reply.
    TemplateSpec(
        "baichuan2_chat",
        prefix="",
        system="{content}",
        user="<reserved_106>{content}",
        assistant_prefix="<reserved_107>",
        assistant="{content}{eos}",
        doc="Baichuan2 chat: system<reserved_106>user<reserved_107>reply</s> (no BOS)",
    ),
]

#: Built-in templates by name: one for every name ``prompt_template`` accepts
#: (``TEMPLATE_NAMES``, from the settings) besides ``"auto"`` and ``"tokenizer"``.
TEMPLATES: dict[str, TemplateSpec] = {spec.name: spec for spec in _SPECS}


def check_template_name(name: str) -> None:
    """Raise ``ValueError`` listing the known names when ``name`` is not one."""
    if name not in TEMPLATE_NAMES:
        raise DataError(f"unknown prompt_template {name!r}; known: {', '.join(TEMPLATE_NAMES)}")


def system_text(system: str | None, tools: str | None) -> str | None:
    """The system prompt with the tools description appended (``None`` when both are empty)."""
    parts = [p for p in (system, (TOOLS_PREAMBLE + tools) if tools else None) if p]
    return "\n\n".join(parts) if parts else None


def with_system(messages: Sequence[Message], system: str | None, tools: str | None = None) -> list[Message]:
    """``messages`` with a system message first: their own, else ``system``; tools appended.

    >>> with_system([{"role": "user", "content": "Hi"}], "Be brief.")
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
    """
    msgs = list(messages)
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    text = system_text(system, tools)
    return ([{"role": "system", "content": text}] if text else []) + msgs


def reply_parts(message: Message) -> tuple[str, str]:
    """A reply as a built-in template writes it: ``(reasoning block, answer)``.

    ``reasoning_content`` becomes ``<think>\\n...\\n</think>\\n\\n`` before the answer; reasoning
    already in the content stays as written; tool calls are appended to the answer as JSON.

    >>> reply_parts({"role": "assistant", "content": "4", "reasoning_content": "2+2"})
    ('<think>\\n2+2\\n</think>\\n\\n', '4')
    >>> reply_parts({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]})
    ('', '[{"name": "f"}]')
    """
    content = message.get("content") or ""
    calls = message.get("tool_calls")
    if calls:
        listed = [c.get("function", c) if isinstance(c, dict) else c for c in calls]
        content += ("\n" if content else "") + json.dumps(listed, ensure_ascii=False)
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning.strip():
        return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n", content
    parts = split_think(content)
    if parts is None:
        return "", content
    opening, thought, answer = parts
    rest = answer.lstrip()
    return opening + thought + THINK_CLOSE + answer[: len(answer) - len(rest)], rest


#: Jinja for ``reply_parts``: ``ns.reply`` = the reasoning block and the answer of message ``m``
#: (``reasoning_content`` as a think block, tool calls appended as JSON), so a converted model's
#: chat template writes a reply exactly as training did.
_JINJA_REPLY = (
    "{%- set ns.reply = m['content'] or '' -%}"
    "{%- if m.get('tool_calls') -%}"
    "{%- set ns.reply = ns.reply + ('\\n' if ns.reply else '') + '[' -%}"
    "{%- for c in m['tool_calls'] -%}"
    "{%- set ns.reply = ns.reply + (', ' if not loop.first else '') "
    "+ ((c['function'] if c is mapping and 'function' in c else c) | tojson) -%}"
    "{%- endfor -%}{%- set ns.reply = ns.reply + ']' -%}{%- endif -%}"
    "{%- if m.get('reasoning_content') is string and m['reasoning_content'].strip() -%}"
    f"{{%- set ns.reply = '{THINK_OPEN}\\n' + m['reasoning_content'].strip() + '\\n{THINK_CLOSE}\\n\\n' + ns.reply -%}}"
    "{%- endif -%}"
)


def tidy(segments: list[Segment]) -> list[Segment]:
    """``segments`` without empty ones, touching trained ones joined."""
    out: list[Segment] = []
    for text, trained in segments:
        if not text:
            continue
        if trained and out and out[-1][1]:
            out[-1] = (out[-1][0] + text, True)
        else:
            out.append((text, trained))
    return out


class Template:
    """Renders conversations for one tokenizer. Build with ``get_template``."""

    name: str = ""
    #: Strings that end an assistant turn (for generation).
    stop: tuple[str, ...] = ()

    def render(self, messages: Sequence[Message], system: str | None = None, tools: str | None = None, *,
               train_on_reasoning: bool = True) -> list[Segment]:
        """Segments ``(text, trainable)`` of a whole conversation (see the module docstring).
        ``train_on_reasoning=False``: the replies' reasoning (``<think>...</think>``) is context."""
        raise NotImplementedError

    def prompt(self, messages: Sequence[Message], system: str | None = None, tools: str | None = None) -> str:
        """The text up to where the next assistant reply starts (the generation prompt)."""
        raise NotImplementedError

    def text(self, messages: Sequence[Message], system: str | None = None, tools: str | None = None) -> str:
        """``render`` joined to one string."""
        return "".join(t for t, _ in self.render(messages, system, tools))


@dataclass
class BuiltinTemplate(Template):
    """A ``TemplateSpec`` with the tokenizer's BOS and EOS filled in."""

    spec: TemplateSpec
    bos: str = ""
    eos: str = ""
    _s: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.name = self.spec.name
        fill = lambda s: s.replace("{bos}", self.bos).replace("{eos}", self.eos)  # noqa: E731
        for key in ("user", "assistant", "assistant_prefix", "system", "tool", "sep", "prefix"):
            self._s[key] = fill(getattr(self.spec, key))
        self._s["merge_system"] = fill(self.spec.merge_system) if self.spec.merge_system else None
        self.stop = tuple(s for s in dict.fromkeys(fill(x) for x in self.spec.stop) if s)

    def _context(self, messages: Sequence[Message], system: str | None, tools: str | None,
                 train_on_reasoning: bool = True) -> list[Segment]:
        """Segments of ``messages`` (trained replies included), without a trailing separator."""
        s = self._s
        msgs = messages
        system = system if system is not None else self.spec.default_system
        if tools or (system and not (msgs and msgs[0]["role"] == "system")):
            msgs = with_system(messages, system, tools)
        out: list[Segment] = [(s["prefix"], False)]
        merged: str | None = None
        for i, m in enumerate(msgs):
            role, content = m["role"], m.get("content") or ""
            if role == "system" and (s["merge_system"] is None or i > 0):
                out.append((s["system"].replace("{content}", content) if s["system"] else content, False))
            elif role == "system":
                merged = content  # goes into the first user message
            elif role == "user":
                if merged is not None:
                    content = s["merge_system"].replace("{system}", merged).replace("{content}", content)
                    merged = None
                out.append((s["user"].replace("{content}", content), False))
            elif role == "tool":
                out.append(((s["tool"] or s["user"]).replace("{content}", content), False))
            elif role == "assistant":
                out.append((s["assistant_prefix"], False))
                thought, answer = reply_parts(m)
                before, _, after = s["assistant"].partition("{content}")
                out += [(before, True), (thought, train_on_reasoning), (answer + after, True)]
                if i + 1 < len(msgs):
                    out.append((s["sep"], False))
            else:
                raise ValueError(f"unknown role {role!r}")
        if merged is not None:  # a system prompt and no user message: keep it as plain context
            out.insert(1, (merged, False))
        return out

    def render(self, messages: Sequence[Message], system: str | None = None, tools: str | None = None, *,
               train_on_reasoning: bool = True) -> list[Segment]:
        return tidy(self._context(messages, system, tools, train_on_reasoning))

    def prompt(self, messages: Sequence[Message], system: str | None = None, tools: str | None = None) -> str:
        segs = self._context(messages, system, tools)
        if messages and messages[-1]["role"] == "assistant":
            segs.append((self._s["sep"], False))
        return "".join(t for t, _ in segs) + self._s["assistant_prefix"]

    def to_jinja(self, system_prompt: str | None = None) -> str:
        """A Jinja chat template that renders exactly like this template (``text`` and, with
        ``add_generation_prompt``, ``prompt``), to save with a converted model's tokenizer.
        ``system_prompt`` (else the template's default) is used when a conversation has none."""
        s = self._s
        lit = json.dumps

        def around(fmt: str, key: str = "{content}") -> tuple[str, str]:
            pre, _, post = fmt.partition(key) if fmt else ("", "", "")
            return lit(pre), lit(post)

        sys_pre, sys_post = around(s["system"])
        user_pre, user_post = around(s["user"])
        tool_pre, tool_post = around(s["tool"] or s["user"])
        a_pre, a_post = around(s["assistant"])
        default = system_prompt if system_prompt is not None else self.spec.default_system
        out = ["{%- set ns = namespace(merged=none, reply='') -%}", "{%- set msgs = messages -%}"]
        if default:
            out.append("{%- if messages|length == 0 or messages[0]['role'] != 'system' -%}"
                       f"{{%- set msgs = [{{'role': 'system', 'content': {lit(default)}}}] + messages -%}}"
                       "{%- endif -%}")
        out.append(f"{{{{- {lit(s['prefix'])} -}}}}")
        out.append("{%- for m in msgs -%}")
        merge = s["merge_system"]
        if merge:
            m_pre, rest = merge.split("{system}", 1)
            m_mid, m_post = rest.split("{content}", 1)
            out.append("{%- if m['role'] == 'system' and loop.first -%}{%- set ns.merged = m['content'] -%}"
                       "{%- elif m['role'] == 'system' -%}{{- m['content'] -}}")
            user = (f"{{%- if ns.merged is not none -%}}{{{{- {user_pre} + {lit(m_pre)} + ns.merged + {lit(m_mid)} + "
                    f"m['content'] + {lit(m_post)} + {user_post} -}}}}{{%- set ns.merged = none -%}}"
                    f"{{%- else -%}}{{{{- {user_pre} + m['content'] + {user_post} -}}}}{{%- endif -%}}")
        else:
            out.append(f"{{%- if m['role'] == 'system' -%}}{{{{- {sys_pre} + m['content'] + {sys_post} -}}}}")
            user = f"{{{{- {user_pre} + m['content'] + {user_post} -}}}}"
        out.append(f"{{%- elif m['role'] == 'user' -%}}{user}")
        out.append(f"{{%- elif m['role'] == 'tool' -%}}{{{{- {tool_pre} + m['content'] + {tool_post} -}}}}")
        out.append(f"{{%- elif m['role'] == 'assistant' -%}}{_JINJA_REPLY}{{{{- {lit(s['assistant_prefix'])} + {a_pre} + "
                   f"ns.reply + {a_post} -}}}}{{%- if not loop.last -%}}{{{{- {lit(s['sep'])} -}}}}{{%- endif -%}}")
        out.append("{%- endif -%}{%- endfor -%}")
        if merge:  # a system prompt and no user message: plain context
            out.append("{%- if ns.merged is not none -%}{{- ns.merged -}}{%- endif -%}")
        out.append("{%- if add_generation_prompt -%}{%- if msgs and msgs[-1]['role'] == 'assistant' -%}"
                   f"{{{{- {lit(s['sep'])} -}}}}{{%- endif -%}}{{{{- {lit(s['assistant_prefix'])} -}}}}{{%- endif -%}}")
        return "".join(out)


class ChatTemplate(Template):
    """The tokenizer's own Jinja chat template (``tokenizer.chat_template``).

    Replies are located by structure (``packtune.data.turns``): each assistant turn trains what
    the model must generate after the generation prompt, through the token that ends the turn,
    as it appears in the rendering of the whole conversation. ``stop``: the tokenizer's EOS and
    every ``eos_token_id`` of the tokenizer and of ``generation_config`` (by default the one
    saved next to the tokenizer). Tools go to the template as ``tools`` when it reads them, else
    into the system prompt as for the built-in templates.
    """

    name = "tokenizer"

    def __init__(self, tokenizer: Any, generation_config: Any = "auto") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; choose a built-in prompt_template")
        self.tokenizer = tokenizer
        #: Where the template comes from (the tokenizer's name or folder), for messages.
        self.source = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        if generation_config == "auto":
            generation_config = load_generation_config(tokenizer)
        self.stop = eos_tokens(tokenizer, generation_config)
        self.eos = getattr(tokenizer, "eos_token", None) or (self.stop[0] if self.stop else "")
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        specials.update(str(t) for t in added.values())
        self._native_tools = re.search(r"\btools\b", str(tokenizer.chat_template)) is not None
        self._finder = TurnFinder(sorted((t for t in specials if t), key=len, reverse=True), self.stop)

    def _prepare(self, messages: Sequence[Message], system: str | None,
                 tools: str | None) -> tuple[list[Message], list | None]:
        """The messages with the system prompt first, and the tools the template reads (if any)."""
        if tools and self._native_tools:
            try:
                parsed = json.loads(tools)
            except ValueError:
                parsed = None
            if isinstance(parsed, (list, dict)):
                return with_system(messages, system), parsed if isinstance(parsed, list) else [parsed]
        return with_system(messages, system, tools), None

    def _apply(self, messages: Sequence[Message], generation: bool, tools: list | None = None) -> str:
        out = self.tokenizer.apply_chat_template(list(messages), tools=tools, tokenize=False,
                                                 add_generation_prompt=generation)
        if not isinstance(out, str):  # some versions return a list for a single conversation
            out = out[0]
        return out

    def render(self, messages: Sequence[Message], system: str | None = None, tools: str | None = None, *,
               train_on_reasoning: bool = True) -> list[Segment]:
        msgs, native = self._prepare(messages, system, tools)
        full = self._apply(msgs, False, native)
        try:
            turns = self._finder.find(msgs, full, lambda m, g: self._apply(m, g, native),
                                      json.dumps(native, sort_keys=True) if native else "")
        except ReplyNotRendered as exc:  # name the template: the report shows this message
            raise ReplyNotRendered(f"chat template of {self.source}: {exc}") from None
        segs: list[Segment] = []
        pos = 0
        for t in turns:
            trained_from = t.start if train_on_reasoning else t.think_end
            segs += [(full[pos:trained_from], False), (full[trained_from:t.end], True)]
            if t.eos:
                if not self.eos:
                    raise DataError("the chat template writes no end-of-turn token after a reply and the tokenizer "
                                    "has no EOS to train in its place; set the tokenizer's eos_token")
                segs.append((self.eos, True))
            pos = t.end
        segs.append((full[pos:], False))
        return tidy(segs)

    def prompt(self, messages: Sequence[Message], system: str | None = None, tools: str | None = None) -> str:
        msgs, native = self._prepare(messages, system, tools)
        return self._apply(msgs, True, native)


def stop_token_ids(tokenizer: Any, stops: Sequence[str]) -> list[int]:
    """Token ids generation stops on for a template's ``stop`` strings: the EOS id and the id of
    every stop string that is one token, sorted."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in stops:
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            ids.append(enc[0])
    return sorted(set(ids))


def get_template(name: str, tokenizer: Any = None, *, bos: str | None = None, eos: str | None = None) -> Template:
    """The template ``name`` for ``tokenizer`` (``bos``/``eos`` override the tokenizer's).

    ``"auto"``: the tokenizer's chat template when it has one, else ``"default"``.
    ``"tokenizer"``: the tokenizer's chat template (an error when it has none), stopping on the
    ``eos_token_id`` list of the generation config saved next to the tokenizer, if any.

    >>> get_template("mistral", bos="<s>", eos="</s>").prompt([{"role": "user", "content": "Hi"}], system="Be brief.")
    '<s>[INST] Be brief.\\n\\nHi [/INST]'
    """
    check_template_name(name)
    if name == "auto":
        name = "tokenizer" if getattr(tokenizer, "chat_template", None) else "default"
    if name == "tokenizer":
        return ChatTemplate(tokenizer)
    if bos is None:
        bos = getattr(tokenizer, "bos_token", None) or ""
    if eos is None:
        eos = getattr(tokenizer, "eos_token", None) or ""
    return BuiltinTemplate(TEMPLATES[name], bos=bos, eos=eos)
