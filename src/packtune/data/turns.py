"""Where each assistant turn lies in a chat template's rendering (``TurnFinder``).

The rule: for every assistant message, the trained text is what the model must generate after
the generation prompt, up to and including the token that ends its turn, taken as that text
appears in the rendering of the whole conversation. Templates rewrite conversations (Qwen3
adds ``<think>\\n\\n</think>\\n\\n`` to the newest reply only, DeepSeek-R1 drops the reasoning of
past replies and opens ``<think>\\n`` in the generation prompt, Phi-3.5 appends EOS after the
last turn, GLM-4 writes no end-of-turn token at all), so neither "the prompt is a prefix of
the conversation" nor "search for the reply's text" holds. Turns are found by structure:

1. **Skeleton.** The conversation is rendered once more with every message's text replaced by
   a sentinel (``zqpkc3x``: content of message 3), keeping the text's leading and trailing
   whitespace so that ``trim`` / ``strip`` in the template act alike, and splitting
   ``<think>...</think>`` reasoning into a sentinel of its own. Sentinels are ASCII letters
   and digits, so escaping filters leave them alone.
2. **Start of turn k.** The generation prompt of the messages before k, rendered the same way,
   is lined up with the skeleton from the last sentinel they share: the turn starts where the
   two part. Text the prompt supplies that the conversation lacks (R1's ``<think>\\n``) is not
   trained; a prompt that stops partway through a token is cut back to the last newline or
   special token.
3. **End of turn k.** After the reply's last sentinel, the text that stays the same whether the
   conversation ends there, goes on with the real next message, or goes on with a user message
   is the turn's closing (its end-of-turn token, tool calls). It is cut after the first stop
   token (the tokenizer's and the generation config's ``eos_token_id`` list) and trailing
   whitespace. A template that writes no closing at all: the next stop token it writes (GLM-4's
   ``<|user|>``) is trained, else the tokenizer's EOS is inserted after the reply and trained.
4. **Back to the real text.** Replacing each sentinel by its text must give the real rendering
   exactly; then every position maps back. Skeletons depend only on the conversation's shape,
   so they are cached: a dataset of similar rows renders each shape once.

When the template changes its text with the words of a message (beyond whitespace and
reasoning), the skeleton does not reproduce the rendering: a skeleton with only the replies
replaced is tried next, and if that fails too the conversation is refused (``ReplyNotFound``)
rather than trained on a guess.

A reply the template does not write is refused too (``ReplyNotRendered``), never trained as an
empty turn: its text when the reply's sentinel is missing from the skeleton, its tool calls when
the rendering stays the same without them (GLM-4 writes a message only when its content is
non-empty; DeepSeek-R1 writes calls only when the content is null, a key transformers drops).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_THINK = re.compile(r"(\s*(?:<think>)?)(.*?)</think>(.*)\Z", re.DOTALL)
# ASCII letters only: a template's escaping (``tojson``, ``e``) leaves them as they are.
_PREFIXES = ("zqpk", "qzkp", "kpzq", "pkqz")
_CACHE_SIZE = 4096

Apply = Callable[[list, bool], str]


class ReplyNotFound(ValueError):
    """The chat template renders the conversation but its replies cannot be located in it."""


class ReplyNotRendered(ValueError):
    """The chat template leaves out a reply's text or tool calls: training it would teach the
    model to stop (or to answer without the calls) where the data says otherwise."""


def split_think(content: str) -> tuple[str, str, str] | None:
    """``(opening, reasoning, answer)`` of a reply that starts with reasoning ending in
    ``</think>`` (the ``<think>`` itself is optional, as after R1's generation prompt).

    >>> split_think("<think>\\nhmm\\n</think>\\n\\nOK")
    ('<think>', '\\nhmm\\n', '\\n\\nOK')
    >>> split_think("OK") is None
    True
    """
    m = _THINK.match(content)
    return (m.group(1), m.group(2), m.group(3)) if m else None


@dataclass(frozen=True)
class Turn:
    """One assistant turn in a rendering: ``[start, end)`` is trained (``[think_end, end)``
    without its reasoning); ``eos``: the template writes no stop, insert EOS at ``end``."""

    start: int
    end: int
    think_end: int
    eos: bool = False


@dataclass(frozen=True)
class _Occ:
    start: int
    end: int
    kind: str  # c: content, t: reasoning inside the content, r: reasoning_content, u: probe user
    msg: int

    @property
    def key(self) -> tuple[str, int]:
        return self.kind, self.msg


@dataclass
class _Skeleton:
    text: str
    occ: list[_Occ]
    turns: list[Turn]


def _lcp(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _wrap(text: str, sentinel: str, cores: dict[str, str]) -> str:
    """``text`` with its non-blank core replaced by ``sentinel`` (whitespace kept)."""
    core = text.strip()
    if not core:
        return text
    cores[sentinel] = core
    lead = len(text) - len(text.lstrip())
    return text[:lead] + sentinel + text[lead + len(core):]


def skeleton_messages(messages: Sequence[dict], prefix: str, all_roles: bool) -> tuple[list[dict], dict[str, str]]:
    """The messages with their text replaced by sentinels, and each sentinel's text."""
    cores: dict[str, str] = {}
    out = []
    for i, m in enumerate(messages):
        sm = dict(m)
        role = m.get("role")
        content = m.get("content")
        if isinstance(content, str) and (all_roles or role == "assistant"):
            parts = split_think(content) if role == "assistant" else None
            if parts and parts[1].strip():
                opening, reasoning, answer = parts
                sm["content"] = (opening + _wrap(reasoning, f"{prefix}t{i}x", cores) + THINK_CLOSE
                                 + _wrap(answer, f"{prefix}c{i}x", cores))
            else:
                sm["content"] = _wrap(content, f"{prefix}c{i}x", cores)
        reasoning = m.get("reasoning_content")
        if role == "assistant" and isinstance(reasoning, str):
            sm["reasoning_content"] = _wrap(reasoning, f"{prefix}r{i}x", cores)
        out.append(sm)
    return out, cores


class TurnFinder:
    """Finds the assistant turns of conversations rendered by one chat template.

    ``specials``: the tokenizer's special and added tokens (where a partial match may be cut);
    ``stops``: the tokens generation stops on.
    """

    def __init__(self, specials: Sequence[str], stops: Sequence[str]) -> None:
        self.specials = [s for s in specials if s]
        self.stops = [s for s in stops if s]
        self._cache: dict[tuple, _Skeleton | ReplyNotRendered | None] = {}

    def find(self, messages: Sequence[dict], text: str, apply: Apply, tag: str = "") -> list[Turn]:
        """The turns of ``messages`` in ``text`` (their rendering by ``apply(messages, False)``).

        ``apply(messages, add_generation_prompt)`` renders; ``tag`` names anything else that
        changes the rendering (the tools), for the cache.
        """
        prefix = next((p for p in _PREFIXES if p not in text), None)
        if prefix is None:
            raise ReplyNotFound("the conversation contains every sentinel packtune could use")
        rx = re.compile(prefix + r"([ctru])(\d+)x")
        not_rendered: ReplyNotRendered | None = None
        for all_roles in (True, False):
            smsgs, cores = skeleton_messages(messages, prefix, all_roles)
            key = (all_roles, prefix, tag, json.dumps(smsgs, sort_keys=True, default=str))
            if key in self._cache:
                skel = self._cache[key]
            else:
                try:
                    skel = self._analyse(smsgs, apply, prefix, rx)
                except ReplyNotRendered as exc:  # cached too: the next row of this shape is refused alike
                    skel = exc
                except Exception:  # noqa: BLE001 - the template refuses the skeleton: try the next
                    skel = None
                if len(self._cache) >= _CACHE_SIZE:
                    self._cache.clear()
                self._cache[key] = skel
            if isinstance(skel, ReplyNotRendered):
                not_rendered = skel
                continue
            if skel is None:
                continue
            mapped = _map_back(skel, cores, text)
            if mapped is not None:
                return [Turn(mapped(t.start), mapped(t.end), mapped(t.think_end), t.eos) for t in skel.turns]
        if not_rendered is not None:
            raise ReplyNotRendered(str(not_rendered))
        raise ReplyNotFound("the chat template's text around a reply changes with the reply's words, so packtune "
                            "cannot tell which tokens are the reply; use a built-in prompt_template")

    # --- analysis of one skeleton --------------------------------------------------------------

    def _occ(self, text: str, rx: re.Pattern) -> list[_Occ]:
        return [_Occ(m.start(), m.end(), m.group(1), int(m.group(2))) for m in rx.finditer(text)]

    def _analyse(self, smsgs: list[dict], apply: Apply, prefix: str, rx: re.Pattern) -> _Skeleton:
        full = apply(smsgs, False)
        occ = self._occ(full, rx)
        _check_rendered(smsgs, full, occ, apply, prefix)
        probe = {"role": "user", "content": f"{prefix}u0x"}
        turns: list[Turn] = []
        prev = 0
        for k, m in enumerate(smsgs):
            if m.get("role") != "assistant":
                continue
            gen = _try(apply, smsgs[:k], True)
            start = self._start(gen, rx, full, occ, k, prev)
            if start < prev:
                raise ReplyNotFound(f"message {k} starts before the previous reply ends")
            later = next((o.start for o in occ if o.start >= start and o.msg > k), len(full))
            own = [o for o in occ if o.msg == k and start <= o.start < later]
            alts = [_try(apply, smsgs[: k + 1], False) if own else None,
                    _try(apply, smsgs[: k + 1] + [probe], False)]
            end, eos = self._end(full, occ, own, start, [a for a in alts if a is not None], gen, rx, k)
            turns.append(Turn(start, end, self._think_end(full, own, start, end), eos))
            prev = end
        return _Skeleton(full, occ, turns)

    def _start(self, gen: str | None, rx: re.Pattern, full: str, occ: list[_Occ], k: int, lo: int) -> int:
        """Where turn ``k`` starts in ``full``: where its generation prompt ``gen`` stops matching."""
        if gen is None:  # the template refuses the partial conversation: start at the reply itself
            own = [o for o in occ if o.msg == k and o.start >= lo]
            if not own:
                raise ReplyNotFound(f"message {k}: no generation prompt and no reply text to start from")
            return own[0].start
        g_occ = self._occ(gen, rx)
        a_gen = a_full = 0
        if g_occ:
            last = g_occ[-1]
            nth = sum(o.key == last.key for o in g_occ)
            same = [o for o in occ if o.key == last.key]
            if len(same) < nth:
                raise ReplyNotFound(f"message {last.msg} is in the generation prompt but not in the conversation")
            a_gen, a_full = last.end, same[nth - 1].end
        return a_full + self._common(gen[a_gen:], [full[a_full:]], [_first_after(occ, a_full) - a_full])

    def _common(self, tail: str, others: list[str], limits: list[int]) -> int:
        """How much of ``tail`` all ``others`` share, never past a sentinel (``limits``), cut back
        to a newline or special token when it stops partway and no text simply ended there."""
        n = min([len(tail), *limits, *(_lcp(tail, o) for o in others)])
        if n in limits or any(n == len(t) for t in (tail, *others)):
            return n
        best = tail.rfind("\n", 0, n) + 1
        for s in self.specials:
            j = tail.rfind(s, 0, n)
            if j >= 0:
                best = max(best, j + len(s))
        return best

    def _end(self, full: str, occ: list[_Occ], own: list[_Occ], start: int, alts: list[str],
             gen: str | None, rx: re.Pattern, k: int) -> tuple[int, bool]:
        """Where turn ``k`` ends: after its closing's first stop token (see the module docstring)."""
        if own:  # the text after the reply's last sentinel, in every rendering
            last = own[-1]
            nth = sum(o.key == last.key for o in occ if o.start <= last.start)
            anchor = last.end
            tails, limits = [], []
            for alt in alts:
                alt_occ = self._occ(alt, rx)
                same = [o for o in alt_occ if o.key == last.key]
                if len(same) >= nth:
                    a = same[nth - 1].end
                    tails.append(alt[a:])
                    limits.append(_first_after(alt_occ, a) - a)
        else:  # no reply text (tool calls only): from the turn's start, in renderings that go on
            anchor = start
            tails, limits = [], []
            for alt in alts[-1:]:
                alt_occ = self._occ(alt, rx)
                a = self._start(gen, rx, alt, alt_occ, k, 0)
                tails.append(alt[a:])
                limits.append(_first_after(alt_occ, a) - a)
        limits.append(_first_after(occ, anchor) - anchor)
        n = self._common(full[anchor:], tails, limits)
        closing = full[anchor: anchor + n].rstrip()
        end = anchor + len(closing)
        hits = [(j, -len(s)) for s in self.stops if (j := full.find(s, anchor, end)) >= 0]
        if hits:
            j, neg = min(hits)
            return j - neg, False
        if end > anchor:
            return end, False
        rest = full[anchor:]
        gap = len(rest) - len(rest.lstrip())
        for s in sorted(self.stops, key=len, reverse=True):
            if rest.startswith(s, gap):  # GLM-4: the next role token is the stop
                return anchor + gap + len(s), False
        return anchor, True

    @staticmethod
    def _think_end(full: str, own: list[_Occ], start: int, end: int) -> int:
        """The end of the turn's reasoning (its ``</think>`` and the whitespace after), else ``start``."""
        answer = next((o.start for o in own if o.kind == "c"), end)
        thoughts = [o for o in own if o.kind in "tr" and o.end <= answer]
        lo = thoughts[-1].end if thoughts else start
        j = full.rfind(THINK_CLOSE, lo, answer)
        if j < 0:
            return lo if thoughts else start
        j += len(THINK_CLOSE)
        while j < answer and full[j].isspace():
            j += 1
        return j


def _check_rendered(smsgs: list[dict], full: str, occ: list[_Occ], apply: Apply, prefix: str) -> None:
    """Raise ``ReplyNotRendered`` when ``full`` (the skeleton's rendering) leaves out a reply's
    answer text (its sentinel is missing) or its tool calls (the rendering without them is the same)."""
    seen = {o.key for o in occ}
    replies = 0
    for k, m in enumerate(smsgs):
        if m.get("role") != "assistant":
            continue
        replies += 1
        content = m.get("content")
        if isinstance(content, str) and f"{prefix}c{k}x" in content and ("c", k) not in seen:
            raise ReplyNotRendered(f"reply {replies}: the template does not write its text"
                                   + (" beside its tool calls" if m.get("tool_calls") else ""))
        if m.get("tool_calls"):
            without = [dict(x) for x in smsgs]
            del without[k]["tool_calls"]
            if _try(apply, without, False) == full:
                raise ReplyNotRendered(f"reply {replies}: the template does not write its tool calls; shape them "
                                       "as the template reads them (README: tool calls written from the content)")


def _try(apply: Apply, messages: list[dict], generation: bool) -> str | None:
    try:
        return apply(messages, generation)
    except Exception:  # noqa: BLE001 - some templates refuse partial conversations
        return None


def _first_after(occ: list[_Occ], pos: int) -> int:
    """The start of the first sentinel at or after ``pos`` (a large number when none)."""
    return next((o.start for o in occ if o.start >= pos), 1 << 62)


def _map_back(skel: _Skeleton, cores: dict[str, str], text: str) -> Callable[[int], int] | None:
    """Position in the skeleton -> position in ``text``, or ``None`` when replacing every
    sentinel by its text does not give ``text`` exactly."""
    pieces: list[str] = []
    ends: list[int] = []
    shift: list[int] = [0]
    pos = 0
    for o in skel.occ:
        core = cores.get(skel.text[o.start:o.end])
        if core is None:
            return None
        pieces += [skel.text[pos:o.start], core]
        ends.append(o.end)
        shift.append(shift[-1] + len(core) - (o.end - o.start))
        pos = o.end
    pieces.append(skel.text[pos:])
    if "".join(pieces) != text:
        return None

    def mapped(p: int) -> int:
        return p + shift[bisect.bisect_right(ends, p)]

    return mapped


def eos_tokens(tokenizer: Any, generation_config: Any = None) -> tuple[str, ...]:
    """The tokens generation stops on: the tokenizer's EOS, then every id of the tokenizer's and
    the generation config's ``eos_token_id`` (an id or a list of ids)."""
    ids: list[int] = []
    for source in (tokenizer, generation_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids += list(value) if isinstance(value, (list, tuple)) else ([value] if value is not None else [])
    tokens = [getattr(tokenizer, "eos_token", None)]
    tokens += [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]
    return tuple(dict.fromkeys(t for t in tokens if isinstance(t, str) and t))


def load_generation_config(tokenizer: Any) -> Any:
    """The ``GenerationConfig`` saved next to the tokenizer (its folder, or the hub cache), else ``None``."""
    path = str(getattr(tokenizer, "name_or_path", "") or "")
    if not path or "://" in path:
        return None
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - no generation_config.json there
        return None
