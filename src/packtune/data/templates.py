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
  has one. Its trained spans are found by rendering the conversation up to each assistant
  turn with ``add_generation_prompt=True``: what the next message adds is the reply.

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
the system prompt (``TOOLS_PREAMBLE``), so it is context like the rest of the system prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from packtune.data.errors import DataError

Segment = tuple[str, bool]
Message = dict[str, str]

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

#: Built-in templates by name.
TEMPLATES: dict[str, TemplateSpec] = {spec.name: spec for spec in _SPECS}
#: Every name ``prompt_template`` accepts.
TEMPLATE_NAMES: tuple[str, ...] = ("auto", "tokenizer", *TEMPLATES)


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


class Template:
    """Renders conversations for one tokenizer. Build with ``get_template``."""

    name: str = ""
    #: Strings that end an assistant turn (for generation).
    stop: tuple[str, ...] = ()

    def render(self, messages: Sequence[Message], system: str | None = None, tools: str | None = None) -> list[Segment]:
        """Segments ``(text, trainable)`` of a whole conversation (see the module docstring)."""
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

    def _context(self, messages: Sequence[Message], system: str | None, tools: str | None) -> list[Segment]:
        """Segments of ``messages`` (trained replies included), without a trailing separator."""
        s = self._s
        msgs = messages
        system = system if system is not None else self.spec.default_system
        if tools or (system and not (msgs and msgs[0]["role"] == "system")):
            msgs = with_system(messages, system, tools)
        out: list[Segment] = [(s["prefix"], False)]
        merged: str | None = None
        for i, m in enumerate(msgs):
            role, content = m["role"], m["content"]
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
                out.append((s["assistant"].replace("{content}", content), True))
                if i + 1 < len(msgs):
                    out.append((s["sep"], False))
            else:
                raise ValueError(f"unknown role {role!r}")
        if merged is not None:  # a system prompt and no user message: keep it as plain context
            out.insert(1, (merged, False))
        return out

    def render(self, messages: Sequence[Message], system: str | None = None, tools: str | None = None) -> list[Segment]:
        return self._context(messages, system, tools)

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
        out = ["{%- set ns = namespace(merged=none) -%}", "{%- set msgs = messages -%}"]
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
        out.append(f"{{%- elif m['role'] == 'assistant' -%}}{{{{- {lit(s['assistant_prefix'])} + {a_pre} + "
                   f"m['content'] + {a_post} -}}}}{{%- if not loop.last -%}}{{{{- {lit(s['sep'])} -}}}}{{%- endif -%}}")
        out.append("{%- endif -%}{%- endfor -%}")
        if merge:  # a system prompt and no user message: plain context
            out.append("{%- if ns.merged is not none -%}{{- ns.merged -}}{%- endif -%}")
        out.append("{%- if add_generation_prompt -%}{%- if msgs and msgs[-1]['role'] == 'assistant' -%}"
                   f"{{{{- {lit(s['sep'])} -}}}}{{%- endif -%}}{{{{- {lit(s['assistant_prefix'])} -}}}}{{%- endif -%}}")
        return "".join(out)


class ChatTemplate(Template):
    """The tokenizer's own Jinja chat template (``tokenizer.chat_template``)."""

    name = "tokenizer"

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; choose a built-in prompt_template")
        self.tokenizer = tokenizer
        eos = getattr(tokenizer, "eos_token", None)
        self.stop = (eos,) if eos else ()
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        specials.update(str(t) for t in added.values())
        self._specials = sorted((t for t in specials if t), key=len, reverse=True)

    def _apply(self, messages: Sequence[Message], generation: bool) -> str:
        out = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation)
        if not isinstance(out, str):  # some versions return a list for a single conversation
            out = out[0]
        return out

    def render(self, messages: Sequence[Message], system: str | None = None, tools: str | None = None) -> list[Segment]:
        msgs = with_system(messages, system, tools)
        full = self._apply(msgs, False)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            span = self._by_prefix(msgs, k, full)
            if span is None or span[0] < cursor:
                span = self._by_search(m["content"], full, cursor)
            spans.append(span)
            cursor = span[1]
        segs: list[Segment] = []
        pos = 0
        for a, b in spans:
            segs += [(full[pos:a], False), (full[a:b], True)]
            pos = b
        segs.append((full[pos:], False))
        return segs

    def _by_prefix(self, msgs: list[Message], k: int, full: str) -> tuple[int, int] | None:
        """The reply of message ``k``: what it adds to the generation prompt before it."""
        try:
            before = self._apply(msgs[:k], True)
            upto = self._apply(msgs[: k + 1], False)
        except Exception:  # templates may refuse partial conversations
            return None
        if not (upto.startswith(before) and full.startswith(upto)):
            return None
        end = len(upto.rstrip())
        return (len(before), end) if end > len(before) else None

    def _by_search(self, content: str, full: str, cursor: int) -> tuple[int, int]:
        """Fallback: find the reply's text, and take the special token right after it."""
        for needle in (content, content.strip()):
            a = full.find(needle, cursor) if needle else -1
            if a >= 0:
                b = a + len(needle)
                rest = full[b:]
                gap = len(rest) - len(rest.lstrip(" "))
                for tok in self._specials:
                    if rest[gap:].startswith(tok):
                        b += gap + len(tok)
                        break
                return a, b
        raise ValueError("the chat template does not reproduce an assistant reply verbatim")

    def prompt(self, messages: Sequence[Message], system: str | None = None, tools: str | None = None) -> str:
        return self._apply(with_system(messages, system, tools), True)


def get_template(name: str, tokenizer: Any = None, *, bos: str | None = None, eos: str | None = None) -> Template:
    """The template ``name`` for ``tokenizer`` (``bos``/``eos`` override the tokenizer's).

    ``"auto"``: the tokenizer's chat template when it has one, else ``"default"``.
    ``"tokenizer"``: the tokenizer's chat template (an error when it has none).

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
