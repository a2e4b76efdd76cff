"""Dataset formats: a row in, a conversation (or raw text) out, or the reason it is bad.

Formats (``FORMATS``), detected from a file's first rows by ``detect_format`` or chosen by name:

``alpaca``
    ``{"instruction", "input", "output"}`` (plus optional ``system`` and ``history`` of
    ``[prompt, reply]`` pairs). The prompt is the instruction, plus a newline and the input
    when the input is not empty.
``sharegpt``
    ``{"conversations": [{"from", "value"}, ...]}`` with roles ``system``, ``human``, ``gpt``,
    ``function_call`` (an assistant turn: the call is trained) and ``observation`` (a tool
    result: context); optional ``system`` and ``tools`` fields.
``messages``
    OpenAI style ``{"messages": [{"role", "content"}, ...]}`` with ``system``, ``user``,
    ``assistant``, ``tool``; optional ``tools``. An assistant message keeps its ``tool_calls``
    (its content may then be empty or null) and its reasoning (``reasoning_content``, or
    ``<think>...</think>`` at the start of the content); a tool result keeps ``name`` and
    ``tool_call_id``. The template decides how they are written (built-in templates: reasoning
    as ``<think>`` block, calls as JSON after the content).
``oasst1``
    openassistant-guanaco's text form: ``{"text": "### Human: ... ### Assistant: ..."}``.
``text``
    ``{"text": ...}`` rows or the lines of a ``.txt`` file: raw text for continued pre-training.

``to_sample(row, fmt)`` returns a ``Conversation``, a ``str`` (format ``text``) or a
``BadRow`` with one of ``BAD_ROW_REASONS``.

>>> to_sample({"instruction": "Add", "input": "2+2", "output": "4"}, "alpaca").messages
[{'role': 'user', 'content': 'Add\\n2+2'}, {'role': 'assistant', 'content': '4'}]
>>> to_sample({"conversations": [{"from": "human", "value": "Hi"}]}, "sharegpt")
BadRow(reason='ends_with_user', detail='the last message is from the user')
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from packtune.config.settings import DATASET_FORMATS as FORMAT_NAMES
from packtune.data.errors import DataError

#: The formats a row can be in (``"auto"`` detects one of them); ``preference`` rows
#: (prompt/chosen/rejected) are read by ``packtune.preference.data``, not ``to_sample``.
FORMATS: tuple[str, ...] = tuple(f for f in FORMAT_NAMES if f not in ("auto", "preference"))

#: Why a row is skipped, with what it means.
BAD_ROW_REASONS: dict[str, str] = {
    "not_an_object": "the row is not a JSON object",
    "missing_field": "a field its format needs is missing",
    "non_string_content": "a text field is not a string",
    "empty_reply": "an assistant reply is empty (no text, reasoning or tool call)",
    "ends_with_user": "the conversation ends with the user (no reply to train on)",
    "ends_with_tool": "the conversation ends with a tool result (no reply to train on)",
    "no_reply": "the conversation is only a system prompt (no reply to train on)",
    "no_turns": "the conversation has no messages",
    "unknown_role": "a message has a role the format does not know",
    "empty_text": "the text is empty",
    "template_error": "the chat template cannot render the conversation",
    "reply_not_found": "the chat template's text around a reply changes with its words: no reply located",
    "reply_not_rendered": "the chat template does not write a reply's text or tool calls (not trained as empty)",
    # Preference pairs (packtune.preference.data).
    "identical_completions": "the chosen and rejected completions are the same",
    "no_prompt": "the pair has no prompt (the conversations share no messages before their replies)",
    "empty_completion": "a completion has no text to train",
}

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_OASST_TURN = re.compile(r"###\s*(Human|Assistant)\s*:")


@dataclass
class Conversation:
    """Messages ``{"role", "content"}`` and an optional tools description (JSON text)."""

    messages: list[dict[str, Any]]
    tools: str | None = None


@dataclass
class BadRow:
    """A row that cannot become a sample: ``reason`` is a key of ``BAD_ROW_REASONS``."""

    reason: str
    detail: str = ""


def check_format_name(name: str) -> None:
    """Raise ``ValueError`` listing the known names when ``name`` is not one."""
    if name not in FORMAT_NAMES:
        raise DataError(f"unknown dataset_format {name!r}; known: {', '.join(FORMAT_NAMES)}")


def detect_format(rows: Iterable[Any], where: str = "the data") -> str:
    """The format of ``rows`` (a file's first rows), from their fields.

    >>> detect_format([{"text": "### Human: Hi### Assistant: Hello"}])
    'oasst1'
    >>> detect_format([{"messages": [{"role": "user", "content": "Hi"}]}])
    'messages'
    """
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        raise DataError(f"cannot detect the format of {where}: no JSON object among its first rows; "
                         f"set dataset_format to one of {', '.join(FORMATS)}")
    keys: set[str] = set().union(*(r.keys() for r in rows))
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if "conversations" in keys or "messages" in keys:
        field_ = "conversations" if "conversations" in keys else "messages"
        for r in rows:
            turns = r.get(field_)
            if isinstance(turns, list) and turns and isinstance(turns[0], dict):
                return "sharegpt" if "from" in turns[0] or "value" in turns[0] else "messages"
        return "sharegpt" if field_ == "conversations" else "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        texts = (r.get("text") for r in rows)
        if any(isinstance(t, str) and _OASST_TURN.search(t) for t in texts):
            return "oasst1"
        return "text"
    raise DataError(
        f"cannot detect the format of {where} from its fields ({', '.join(sorted(keys)) or 'none'}); "
        f"set dataset_format to one of {', '.join(FORMATS)}"
    )


def _finish(messages: list[dict[str, Any]], tools: Any = None) -> Conversation | BadRow:
    """Common checks on a conversation: non-empty, ends with a non-empty assistant reply."""
    if not messages:
        return BadRow("no_turns", "no messages")
    for i, m in enumerate(messages):
        content = m["content"]
        if not isinstance(content, str):
            return BadRow("non_string_content", f"message {i} ({m['role']}) has {type(content).__name__} content")
        if m["role"] == "assistant" and not (content.strip() or m.get("tool_calls") or m.get("reasoning_content")):
            return BadRow("empty_reply", f"message {i} is an empty reply")
    last = messages[-1]["role"]
    if last == "user":
        return BadRow("ends_with_user", "the last message is from the user")
    if last == "tool":
        return BadRow("ends_with_tool", "the last message is a tool result")
    if last == "system":
        return BadRow("no_reply", "the conversation has no reply after its system prompt")
    if tools is not None and not isinstance(tools, str):
        tools = json.dumps(tools, ensure_ascii=False)
    if tools is not None and tools.strip() in ("", "[]", "{}", "null"):
        tools = None  # no tools: nothing to add to the system prompt
    return Conversation(messages, tools)


def _alpaca(row: dict) -> Conversation | BadRow:
    for key in ("instruction", "output"):
        if key not in row or row[key] is None:
            return BadRow("missing_field", f"no {key!r}")
    inp = row.get("input")
    for key, value in (("instruction", row["instruction"]), ("output", row["output"]), ("input", inp or "")):
        if not isinstance(value, str):
            return BadRow("non_string_content", f"{key!r} is {type(value).__name__}")
    prompt = row["instruction"] + ("\n" + inp if inp else "")
    system, history = row.get("system"), row.get("history")
    if not system and not history:  # the common case, kept fast
        return _finish([{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}])
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    history = history or []
    if not isinstance(history, list):
        return BadRow("non_string_content", "'history' is not a list of [prompt, reply] pairs")
    for pair in history:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            return BadRow("non_string_content", "'history' is not a list of [prompt, reply] pairs")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return _finish(messages)


def _turns(row: dict, field_: str, role_key: str, text_key: str, roles: dict[str, str]) -> Conversation | BadRow:
    turns = row.get(field_)
    if turns is None:
        return BadRow("missing_field", f"no {field_!r}")
    if not isinstance(turns, list):
        return BadRow("non_string_content", f"{field_!r} is {type(turns).__name__}, not a list")
    messages: list[dict[str, Any]] = []
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            return BadRow("non_string_content", f"'system' is {type(system).__name__}")
        if system:
            messages.append({"role": "system", "content": system})
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or role_key not in t:
            return BadRow("missing_field", f"message {i} has no {role_key!r}")
        role = roles.get(t[role_key]) if isinstance(t[role_key], str) else None
        if role is None:
            return BadRow("unknown_role", f"message {i} has role {t[role_key]!r}")
        message = _extras(t, role)
        if isinstance(message, BadRow):
            return BadRow(message.reason, f"message {i}: {message.detail}")
        content = t.get(text_key)
        if content is None and message.get("tool_calls"):
            content = ""
        if content is None:
            return BadRow("missing_field", f"message {i} has no {text_key!r}")
        messages.append({"role": role, "content": content, **message})
    return _finish(messages, row.get("tools"))


def _extras(turn: dict, role: str) -> dict[str, Any] | BadRow:
    """What a message carries besides its text: a reply's ``tool_calls``, reasoning and
    ``metadata``, a tool result's ``name`` and ``tool_call_id``."""
    out: dict[str, Any] = {}
    if role == "assistant":
        calls = turn.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            return BadRow("non_string_content", f"'tool_calls' is {type(calls).__name__}, not a list")
        if calls:
            out["tool_calls"] = calls
        reasoning = next((turn[k] for k in ("reasoning_content", "reasoning") if turn.get(k) is not None), None)
        if reasoning is not None and not isinstance(reasoning, str):
            return BadRow("non_string_content", f"'reasoning_content' is {type(reasoning).__name__}")
        if reasoning and reasoning.strip():
            out["reasoning_content"] = reasoning
        if isinstance(turn.get("metadata"), str):  # GLM-4 writes a call's function name from it
            out["metadata"] = turn["metadata"]
    elif role == "tool":
        out.update({k: turn[k] for k in ("name", "tool_call_id") if isinstance(turn.get(k), str)})
    return out


def _oasst1(row: dict) -> Conversation | BadRow:
    text = row.get("text")
    if text is None:
        return BadRow("missing_field", "no 'text'")
    if not isinstance(text, str):
        return BadRow("non_string_content", f"'text' is {type(text).__name__}")
    parts = _OASST_TURN.split(text)
    # parts: [before, role, content, role, content, ...]
    if len(parts) < 3:
        return BadRow("no_turns", "no '### Human:' / '### Assistant:' turns")
    messages = [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]
    if parts[0].strip():
        messages.insert(0, {"role": "system", "content": parts[0].strip()})
    return _finish(messages)


def _text(row: Any) -> str | BadRow:
    text = row.get("text") if isinstance(row, dict) else row
    if text is None:
        return BadRow("missing_field", "no 'text'")
    if not isinstance(text, str):
        return BadRow("non_string_content", f"'text' is {type(text).__name__}")
    if not text.strip():
        return BadRow("empty_text", "the text is empty")
    return text


def to_sample(row: Any, fmt: str) -> Conversation | str | BadRow:
    """Row -> ``Conversation`` (chat formats), ``str`` (``text``) or ``BadRow``."""
    if fmt == "text" and isinstance(row, str):
        return _text(row)
    if not isinstance(row, dict):
        return BadRow("not_an_object", f"a {type(row).__name__}, not an object")
    if fmt == "alpaca":
        return _alpaca(row)
    if fmt == "sharegpt":
        field_ = "conversations" if "conversations" in row or "messages" not in row else "messages"
        return _turns(row, field_, "from", "value", SHAREGPT_ROLES)
    if fmt == "messages":
        return _turns(row, "messages", "role", "content", MESSAGE_ROLES)
    if fmt == "oasst1":
        return _oasst1(row)
    if fmt == "text":
        return _text(row)
    check_format_name(fmt)
    raise ValueError(f"format {fmt!r} must be resolved before use")
