"""packtune: fine-tune causal language models on packed rows with exact varlen attention.

After ``import packtune``, ``attn_implementation="packtune_varlen"`` is a valid attention
implementation for every transformers model that routes attention through
``AttentionInterface``::

    import packtune
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="packtune_varlen")

Importing packtune stays cheap (the command line starts in a blink): if transformers is
already imported, the registration happens now; otherwise it happens the moment
``transformers.modeling_utils`` finishes importing, before any model can be built. The same
hook makes ``AutoConfig`` and ``AutoModelForCausalLM`` know packtune's ``baichuan_alibi``
(Baichuan-13B / Baichuan2-13B saved with ``format="native"``).
"""

from __future__ import annotations

import importlib.abc
import sys

__version__ = "0.1.0"

_LAZY = {
    "ATTN_IMPLEMENTATION": "packtune.config.settings",
    "varlen_attn_func": "packtune.attention.varlen",
    "pack_plan": "packtune.packing.plan",
    "build_packs": "packtune.packing.packs",
    "collate_varlen": "packtune.packing.collate",
    "enable_varlen": "packtune.modeling",
    "check_no_leak": "packtune.modeling",
    "load_model": "packtune.ports.api",
    "save_model": "packtune.ports.api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'packtune' has no attribute {name!r}")


def _register_attention() -> None:
    hf = sys.modules.get("packtune.attention.hf")
    if hf is not None and not hasattr(hf, "register"):
        return  # packtune.attention.hf is importing transformers right now; it registers itself
    from packtune.attention.hf import register

    register()


def _register_auto() -> None:
    """``AutoConfig`` knows ``baichuan_alibi``; ``AutoModelForCausalLM`` knows its class from its
    first config on (``packtune.ports.baichuan_alibi_config`` says why not sooner)."""
    import packtune.ports.baichuan_alibi_config  # noqa: F401  (registers itself on import)


#: A transformers module -> what to register the moment it has finished importing.
_TRIGGERS = {
    "transformers.modeling_utils": _register_attention,
    "transformers.models.auto.configuration_auto": _register_auto,
}


class _RegistrationLoader(importlib.abc.Loader):
    """Runs the real loader, then registers packtune's part with the fresh module."""

    def __init__(self, inner: importlib.abc.Loader, then) -> None:
        self._inner = inner
        self._then = then

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        self._then()

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loader of each ``_TRIGGERS`` module once, then leaves."""

    def __init__(self, pending: set[str]) -> None:
        self.pending = pending

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _RegistrationLoader(spec.loader, _TRIGGERS[fullname])
                return spec
        return None


for _name, _hook in _TRIGGERS.items():
    if _name in sys.modules:
        _hook()
del _name, _hook
_pending = {n for n in _TRIGGERS if n not in sys.modules}
if _pending and not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnImport(_pending))
