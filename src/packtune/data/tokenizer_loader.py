"""Loading a tokenizer (``load_tokenizer``), and what identifies it (``tokenizer_fingerprint``).

``load_tokenizer("packtune://mistral-v1")`` is the Mistral v1 SentencePiece tokenizer (32,000
tokens) shipped in the ``mistral-common`` package: it works offline, so tests and demos need
no hub. It is converted once into the cache directory (``$PACKTUNE_CACHE/tokenizers``) and
loaded from there afterwards.

>>> tok = load_tokenizer("packtune://mistral-v1")  # doctest: +SKIP
>>> tok.bos_token, tok.eos_token, tok.pad_token, len(tok)  # doctest: +SKIP
('<s>', '</s>', '</s>', 32000)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from packtune.data.errors import DataError

BUNDLED_SCHEME = "packtune://"
#: Tokenizers available as ``packtune://NAME``: the file inside the ``mistral_common`` package.
BUNDLED_TOKENIZERS = {"mistral-v1": "tokenizer.model.v1"}


def default_cache_dir() -> Path:
    """``$PACKTUNE_CACHE``, else ``~/.cache/packtune``."""
    return Path(os.environ.get("PACKTUNE_CACHE") or Path.home() / ".cache" / "packtune").expanduser()


def _bundled_folder(name: str, cache_dir: str | Path | None) -> Path:
    if name not in BUNDLED_TOKENIZERS:
        raise DataError(f"no bundled tokenizer {name!r}; known: "
                        + ", ".join(BUNDLED_SCHEME + k for k in BUNDLED_TOKENIZERS))
    folder = Path(cache_dir or default_cache_dir()) / "tokenizers" / name
    if (folder / "tokenizer.model").is_file():
        return folder
    try:
        import mistral_common
    except ImportError as exc:
        raise DataError(f"{BUNDLED_SCHEME}{name} comes from the mistral-common package: "
                        "pip install 'packtune[tiny]' (mistral-common, sentencepiece, protobuf)") from exc
    source = Path(mistral_common.__file__).parent / "data" / BUNDLED_TOKENIZERS[name]
    if not source.is_file():
        raise DataError(f"{source} is missing from the installed mistral-common")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    shutil.copyfile(source, tmp / "tokenizer.model")
    try:
        os.replace(tmp, folder)  # atomic; another process may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _save_converted(tok: Any, folder: Path) -> None:
    """Save the converted fast tokenizer beside its SentencePiece model: later loads skip the
    conversion (and need neither sentencepiece nor protobuf)."""
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=folder))
    try:
        tok.save_pretrained(str(tmp))
        for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):  # tokenizer.json last
            if (tmp / name).is_file():
                os.replace(tmp / name, folder / name)
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, cache_dir: str | Path | None = None) -> Any:
    """``AutoTokenizer.from_pretrained(name_or_path)``, with a pad token always set.

    ``packtune://mistral-v1`` names the Mistral v1 tokenizer of ``mistral-common`` (copied
    once into ``cache_dir``, default ``$PACKTUNE_CACHE`` or ``~/.cache/packtune``). A folder or
    hub id whose ``tokenizer_config.json`` names the remote-code tokenizer of InternLM,
    InternLM2, Baichuan, ChatGLM2/3 or Qwen-1 is loaded from its data files without that code
    (``packtune.ports.family_tokenizers``). The pad token falls back to EOS, then UNK.
    """
    from transformers import AutoTokenizer

    from packtune.ports.family_tokenizers import family_of, load_family_tokenizer, read_tokenizer_config

    path: str | Path = name_or_path
    family = None
    if name_or_path.startswith(BUNDLED_SCHEME):
        path = _bundled_folder(name_or_path[len(BUNDLED_SCHEME):].strip("/"), cache_dir)
    else:
        config = read_tokenizer_config(name_or_path)
        family = family_of(config)
    try:
        if family is not None:  # never the checkpoint's own tokenizer code, whatever trust_remote_code says
            tok = load_family_tokenizer(name_or_path, family, config)
        else:
            tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot load the tokenizer {name_or_path!r}: {exc}") from exc
    if name_or_path.startswith(BUNDLED_SCHEME):
        if not (Path(path) / "tokenizer.json").is_file():
            _save_converted(tok, Path(path))
        tok.name_or_path = name_or_path
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is not None:
            tok.pad_token = fallback
    return tok


def _backend(tokenizer: Any) -> Any:
    """The Rust ``tokenizers.Tokenizer`` of a fast tokenizer, else ``None``."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    return getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about ``tokenizer`` that changes token ids or templates."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = _backend(tokenizer)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items())}
    h.update(repr(specials).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()[:32]


def tokenizer_info(tokenizer: Any) -> dict:
    """Name, class, size and special tokens of ``tokenizer`` (for reports and checkpoints)."""
    info = {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "fast": bool(getattr(tokenizer, "is_fast", False)),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "fingerprint": tokenizer_fingerprint(tokenizer),
    }
    for kind in ("bos", "eos", "pad", "unk"):
        info[f"{kind}_token"] = getattr(tokenizer, f"{kind}_token", None)
        info[f"{kind}_token_id"] = getattr(tokenizer, f"{kind}_token_id", None)
    return info
