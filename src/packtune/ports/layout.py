"""Pure tensor maps between a checkpoint's original layout and its native transformers class.

A ``Layout`` is a list of name templates (``{L}`` is a layer index, ``{P}`` is ``weight`` or
``bias``): plain renames, fused tensors that split into several native ones (InternLM2's
``wqkv``, Baichuan's ``W_pack``, ChatGLM's ``query_key_value``), and derived buffers that the
original checkpoint carries but the native class computes (``rotary_emb.inv_freq``).

Both directions are functions of tensors only (slices, views, concatenations), so the same
map that converts weights also converts gradients: ``to_original({n: p.grad ...})`` gives the
gradient of every original parameter. A tensor the layout does not know is an error, never
silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

_FIELDS = {"L": r"(?P<L>\d+)", "P": r"(?P<P>weight|bias)"}


class PortError(ValueError):
    """A checkpoint packtune cannot port, or whose tensors do not fit its family's layout."""


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for key, rx in _FIELDS.items():
        pattern = pattern.replace(re.escape("{" + key + "}"), rx)
    return re.compile(pattern + r"\Z")


def _fill(template: str, fields: Mapping[str, str]) -> str:
    return template.format(**{k: fields[k] for k in _FIELDS if "{" + k + "}" in template})


@dataclass(frozen=True)
class Fused:
    """One original tensor that is several native ones (split along dim 0)."""

    original: str
    parts: tuple[str, ...]
    split: Callable[[torch.Tensor], Sequence[torch.Tensor]]
    join: Callable[[Sequence[torch.Tensor]], torch.Tensor]


def split_rows(sizes: Sequence[int]) -> tuple[Callable, Callable]:
    """``(split, join)`` for tensors concatenated along dim 0 in blocks of ``sizes`` rows."""

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        if t.shape[0] != sum(sizes):
            raise PortError(f"a fused tensor has {t.shape[0]} rows, expected {' + '.join(map(str, sizes))}")
        return list(torch.split(t, list(sizes), dim=0))

    def join(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(parts), dim=0)

    return split, join


class Layout:
    """The name and shape map of one family: ``to_native`` and ``to_original``."""

    def __init__(
        self,
        family: str,
        renames: Sequence[tuple[str, str]],
        fused: Sequence[Fused] = (),
        dropped: Sequence[str] = (),
    ) -> None:
        self.family = family
        self._renames = [(_compile(o), o, _compile(n), n) for o, n in renames]
        self._fused = [(_compile(f.original), [_compile(p) for p in f.parts], f) for f in fused]
        self._dropped = [_compile(d) for d in dropped]

    def to_native(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Original names and fused shapes -> the native class's state dict."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            if any(d.match(name) for d in self._dropped):
                continue
            out.update(self._native_one(name, tensor))
        return out

    def _native_one(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        for rx, _, fused in self._fused:
            m = rx.match(name)
            if m:
                pieces = fused.split(tensor)
                return {_fill(p, m.groupdict()): piece for p, piece in zip(fused.parts, pieces)}
        for orig_rx, _, _, native in self._renames:
            m = orig_rx.match(name)
            if m:
                return {_fill(native, m.groupdict()): tensor}
        raise PortError(f"{self.family} checkpoint has a tensor packtune does not know: {name!r}")

    def native_rows(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[str, torch.Tensor | None]]:
        """Where each native tensor lies in the original checkpoint, from the original tensors'
        shapes alone: ``native name -> (original name, rows)``, ``rows`` the original's dim-0
        index of each native row, or ``None`` for a whole (renamed) tensor.

        The fused maps run on row indices (each ``split`` applied to ``arange(rows)``), so a
        reader fetches only the rows it keeps of a fused tensor, with no second description of
        any family's fused layout.
        """
        out: dict[str, tuple[str, torch.Tensor | None]] = {}
        for name, shape in shapes.items():
            if any(d.match(name) for d in self._dropped):
                continue
            index = torch.arange(shape[0]) if len(shape) else torch.zeros(())
            for native, rows in self._native_one(name, index).items():
                out[native] = (name, None if rows is index else rows)
        return out

    def _fused_part(self, name: str) -> tuple[int, int, dict[str, str]] | None:
        """``(fused tensor, part, fields)`` of a native name that is one part of a fused tensor, else None."""
        for i, (_, part_rxs, _) in enumerate(self._fused):
            for j, rx in enumerate(part_rxs):
                m = rx.match(name)
                if m:
                    return i, j, m.groupdict()
        return None

    def to_original(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The native state dict (or gradients) -> original names and fused shapes."""
        out: dict[str, torch.Tensor] = {}
        pending: dict[tuple[int, tuple], list] = {}
        for name, tensor in state.items():
            part = self._fused_part(name)
            if part is not None:
                i, j, fields = part
                pending.setdefault((i, tuple(sorted(fields.items()))), [None] * len(self._fused[i][1]))[j] = tensor
                continue
            for _, original, native_rx, _ in self._renames:
                m = native_rx.match(name)
                if m:
                    out[_fill(original, m.groupdict())] = tensor
                    break
            else:
                raise PortError(f"{name!r} has no place in the original {self.family} layout")
        for (i, fields), parts in pending.items():
            fused = self._fused[i][2]
            target = _fill(fused.original, dict(fields))
            if any(p is None for p in parts):
                lacking = [_fill(fused.parts[j], dict(fields)) for j, p in enumerate(parts) if p is None]
                raise PortError(f"cannot rebuild {target!r}: {', '.join(lacking)} missing")
            out[target] = fused.join(parts)
        return out


# The native names of a llama-style decoder (llama, qwen2 and packtune's Baichuan ALiBi class).
LLAMA_EMBED = "model.embed_tokens.weight"
LLAMA_NORM = "model.norm.weight"
LLAMA_HEAD = "lm_head.weight"
LLAMA_LAYER = "model.layers.{L}."
LLAMA_QKV = tuple(LLAMA_LAYER + f"self_attn.{x}_proj.{{P}}" for x in "qkv")
LLAMA_O = LLAMA_LAYER + "self_attn.o_proj.{P}"
LLAMA_MLP = {x: LLAMA_LAYER + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
LLAMA_NORMS = (LLAMA_LAYER + "input_layernorm.weight", LLAMA_LAYER + "post_attention_layernorm.weight")


def llama_identity() -> list[tuple[str, str]]:
    """Renames for a checkpoint that already uses llama's names (apart from fused q/k/v)."""
    names = [LLAMA_EMBED, LLAMA_NORM, LLAMA_HEAD, LLAMA_O, *LLAMA_MLP.values(), *LLAMA_NORMS]
    return [(n, n) for n in names]
