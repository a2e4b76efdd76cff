"""Tokenizers of InternLM, InternLM2, Baichuan, ChatGLM2/3 and Qwen-1, without their remote code.

These checkpoints ship a tokenizer written as remote code (``tokenization_*.py``, named by
``tokenizer_class`` in ``tokenizer_config.json``). packtune never runs it: it reads the data
files the code reads (the SentencePiece ``tokenizer.model``, or Qwen-1's ``qwen.tiktoken``) and
builds a transformers fast tokenizer (``PreTrainedTokenizerFast``) that gives the same ids:

* SentencePiece families: the pieces of ``SentencePieceProcessor.encode`` (the model's own
  normaliser, dummy prefix, byte fallback and user-defined pieces, through transformers'
  ``SpmConverter.build_tokenizer_from_spm_proto``) on the text between special tokens, each
  special token as its one id, as the original (a ``PreTrainedTokenizer``) splits text on them;
* Qwen-1: tiktoken's byte-level BPE with Qwen's pre-tokenisation pattern, the text NFC
  normalised first, and its special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
  ``<|extra_0|>`` .. ``<|extra_204|>``) recognised in text, as ``QWenTokenizer`` does by default.

``add_special_tokens=True`` adds what the original adds: BOS for InternLM, InternLM2 and
Baichuan 1/2 (unless ``tokenizer_config.json`` says ``add_bos_token: false``, as Baichuan2's does),
``[gMASK]`` ``sop`` for ChatGLM, nothing for Qwen-1. The tokenizer's ``chat_template`` is the
checkpoint's own when its ``tokenizer_config.json`` has one, else packtune's template of the
family (``FAMILIES[...].template``) as Jinja.

>>> family_of({"tokenizer_class": "InternLM2Tokenizer"})
'internlm2'
>>> family_of({"auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}})
'qwen'
>>> family_of({"tokenizer_class": "LlamaTokenizer"}) is None
True
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from packtune.data.errors import DataError


@dataclass(frozen=True)
class FamilySpec:
    """How one family's original tokenizer behaves.

    ``specials`` are matched in text as one token each. With ``appended`` they get the ids
    after the base vocabulary, in this order (ChatGLM's ``SPTokenizer``, Qwen-1's
    ``SPECIAL_TOKENS``); otherwise they are pieces of the SentencePiece model (``required``
    ones must be, the others are used when present). ``whole_word`` specials only match as
    whole words (ChatGLM's ``sop``/``eop``, which are also common letters inside words).
    ``prefix`` is what ``add_special_tokens=True`` puts first, when it is not BOS. ``template``
    is packtune's prompt template of the family, the chat template when the checkpoint has
    none, if the vocabulary has the tokens of ``template_needs``.
    """

    name: str
    vocab_file: str
    specials: tuple[str, ...] = ()
    appended: bool = False
    required: tuple[str, ...] = ()
    whole_word: tuple[str, ...] = ()
    bos: str | None = "<s>"
    eos: str | None = "</s>"
    unk: str | None = "<unk>"
    pad: str | None = None
    add_bos: bool = True
    prefix: tuple[str, ...] = ()
    template: str | None = None
    template_needs: tuple[str, ...] = ()


_INTERNLM2_SPECIALS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>")
_CHATGLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
#: Qwen-1's pre-tokenisation pattern (``PAT_STR`` of ``tokenization_qwen.py``): digits one by one.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

#: The families, by packtune's name.
FAMILIES: dict[str, FamilySpec] = {
    "internlm": FamilySpec("internlm", "tokenizer.model", specials=("<eoh>", "<eoa>")),
    "internlm2": FamilySpec("internlm2", "tokenizer.model", specials=_INTERNLM2_SPECIALS,
                            required=("<|im_start|>", "<|im_end|>"), pad="</s>", template="internlm2_chat"),
    # Baichuan-7B (v1, BaiChuanTokenizer): a base model, no chat roles.
    "baichuan": FamilySpec("baichuan", "tokenizer.model"),
    # Baichuan2 (BaichuanTokenizer): the chat roles are the pieces <reserved_106> (user) and
    # <reserved_107> (assistant), ids 195 and 196 (generation_config's user/assistant_token_id).
    "baichuan2": FamilySpec("baichuan2", "tokenizer.model", specials=("<reserved_106>", "<reserved_107>"),
                            template="baichuan2_chat", template_needs=("<reserved_106>", "<reserved_107>")),
    # ChatGLM2 defines the first five; ChatGLM3 adds the four roles, at the same places.
    "chatglm": FamilySpec("chatglm", "tokenizer.model", specials=_CHATGLM_SPECIALS, appended=True,
                          whole_word=("sop", "eop"), bos=None, pad="<unk>", add_bos=False,
                          prefix=("[gMASK]", "sop"), template="chatglm3"),
    "qwen": FamilySpec("qwen", "qwen.tiktoken", specials=_QWEN_SPECIALS, appended=True, bos=None,
                       eos="<|endoftext|>", unk=None, pad="<|endoftext|>", add_bos=False, template="qwen_chat"),
}

#: The remote-code tokenizer classes, and the family each belongs to.
TOKENIZER_CLASSES: dict[str, str] = {
    "InternLMTokenizer": "internlm",
    "InternLM2Tokenizer": "internlm2",
    "BaichuanTokenizer": "baichuan2",  # Baichuan2 7B/13B (and Baichuan-13B v1)
    "BaiChuanTokenizer": "baichuan",
    "ChatGLMTokenizer": "chatglm",
    "QWenTokenizer": "qwen",
}


def family_of(tokenizer_config: dict) -> str | None:
    """The family whose remote-code tokenizer ``tokenizer_config`` names, else ``None``.

    Looks at ``tokenizer_class`` and at the classes of ``auto_map["AutoTokenizer"]``.
    """
    names = [tokenizer_config.get("tokenizer_class")]
    auto = (tokenizer_config.get("auto_map") or {}).get("AutoTokenizer")
    names += auto if isinstance(auto, list) else [auto]
    for name in names:
        if isinstance(name, str):
            cls = name.rsplit(".", 1)[-1]
            # Some configs name the fast class of the same code (InternLM2TokenizerFast).
            cls = cls[:-4] if cls.endswith("Fast") else cls
            if cls in TOKENIZER_CLASSES:
                return TOKENIZER_CLASSES[cls]
    return None


def _fetch(name_or_path: str, filename: str) -> Path | None:
    """``filename`` of a local folder or a hub repo (downloaded), or ``None`` when it has none."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        path = folder / filename
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):  # not a repo id, or no such repo
        return None
    return Path(found) if found else None


def read_tokenizer_config(name_or_path: str) -> dict:
    """``tokenizer_config.json`` of a folder or hub repo (``{}`` when there is none)."""
    path = _fetch(name_or_path, "tokenizer_config.json")
    if path is None:
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def _token_text(value: Any) -> str | None:
    """A token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one ``base64(token) rank`` pair a line.

    Read here rather than with ``tiktoken.load``, which caches files by path, not content.
    """
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not a 'base64-token rank' line") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{path}: the ranks are not 0 .. {len(ranks) - 1}, each once")
    return ranks


def _spm_backend(model_file: Path) -> tuple[Any, dict[str, int]]:
    """The tokenizers backend of a SentencePiece model, and its pieces' ids."""
    try:
        from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

        proto = SentencePieceExtractor(str(model_file)).proto
    except ImportError as exc:
        raise DataError(f"reading {model_file} needs sentencepiece and protobuf: "
                        "pip install sentencepiece protobuf") from exc
    except Exception as exc:  # a file that is no SentencePiece model
        raise DataError(f"{model_file} is not a SentencePiece model: {exc}") from exc
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    # legacy=True: every run of text between special tokens gets its own dummy prefix, as
    # SentencePieceProcessor.encode gives it when the original calls it on each such run.
    return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True), vocab


def _tiktoken_backend(vocab_file: Path) -> tuple[Any, dict[str, int]]:
    """The tokenizers backend of a tiktoken file, with Qwen-1's pattern and NFC normalisation."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = read_tiktoken_ranks(vocab_file)

    class _Converter(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(lambda _path: ranks)

    backend = _Converter(vocab_file=str(vocab_file), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()  # QWenTokenizer.tokenize normalises to NFC first
    return backend, {}


def _add_specials(backend: Any, spec: FamilySpec, vocab: dict[str, int], extra: dict[int, str], where: Path) -> None:
    """Add the family's special tokens (and ``extra``: id -> token from the config) at their ids."""
    from tokenizers import AddedToken

    wanted: dict[str, int | None] = {}
    if spec.appended:
        base = backend.get_vocab_size(with_added_tokens=False)
        wanted.update({tok: base + i for i, tok in enumerate(spec.specials)})
    else:
        missing = [t for t in spec.required if t not in vocab]
        if missing:
            raise DataError(f"{where} lacks the {spec.name} special tokens {missing}: "
                            "is it the tokenizer of this checkpoint?")
        wanted.update({t: vocab[t] for t in spec.specials if t in vocab})
    for token in (spec.bos, spec.eos, spec.unk, spec.pad):
        if token and token not in wanted:
            wanted[token] = vocab.get(token)
    for token_id, token in extra.items():
        if wanted.get(token, token_id) != token_id:
            raise DataError(f"{where}: tokenizer_config.json puts {token!r} at id {token_id}, "
                            f"the {spec.name} tokenizer at {wanted[token]}")
        wanted[token] = token_id
    # The backend gives a new token the next free id: add them in id order, each where it belongs.
    for token, token_id in sorted(wanted.items(), key=lambda kv: (kv[1] is None, kv[1] or 0)):
        new_id = backend.get_vocab_size(with_added_tokens=True)
        if token_id is not None and token_id != backend.token_to_id(token) and token_id != new_id:
            raise DataError(f"{where}: cannot give the special token {token!r} id {token_id} "
                            f"(the vocabulary has {new_id} tokens)")
        if token_id is None and backend.token_to_id(token) is None:
            continue  # e.g. an unk token the model does not have
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False,
                                               single_word=token in spec.whole_word)])


def load_family_tokenizer(name_or_path: str, family: str, tokenizer_config: dict | None = None) -> Any:
    """The fast tokenizer of ``name_or_path`` (a folder or hub id) of ``family`` (``FAMILIES``)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    config = read_tokenizer_config(name_or_path) if tokenizer_config is None else tokenizer_config
    vocab_path = _fetch(name_or_path, spec.vocab_file)
    if vocab_path is None:
        raise DataError(f"{name_or_path!r} has a {family} tokenizer but no {spec.vocab_file}")
    backend, vocab = (_tiktoken_backend if spec.vocab_file.endswith(".tiktoken") else _spm_backend)(vocab_path)

    names = {kind: _token_text(config[f"{kind}_token"]) if f"{kind}_token" in config else getattr(spec, kind)
             for kind in ("bos", "eos", "unk", "pad")}
    extra = {int(i): _token_text(t) for i, t in (config.get("added_tokens_decoder") or {}).items() if _token_text(t)}
    _add_specials(backend, replace(spec, **names), vocab, extra, vocab_path)
    # A named token the vocabulary does not have (an InternLM without <unk>) is left unset.
    names = {kind: t for kind, t in names.items() if t is not None and backend.token_to_id(t) is not None}

    add_bos = bool(config.get("add_bos_token", spec.add_bos)) and "bos" in names
    lead = [names["bos"]] if add_bos else list(spec.prefix)
    if lead:
        single = " ".join([*lead, "$A"])
        # Pairs as the originals' build_inputs_with_special_tokens: BOS before each sequence;
        # ChatGLM's prefix once, then both, then EOS.
        tail = [f"{names['eos']}:1"] if spec.prefix and not add_bos and "eos" in names else []
        pair = " ".join([single, *([f"{names['bos']}:1"] if add_bos else []), "$B:1", *tail])
        used = [*lead, *([names["eos"]] if tail else [])]
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(used)])
    else:
        backend.post_processor = None
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, name_or_path=str(name_or_path), clean_up_tokenization_spaces=False,
        **{f"{kind}_token": token for kind, token in names.items()})
    template = spec.template if all(t in tok.get_vocab() for t in spec.template_needs) else None
    tok.chat_template = config.get("chat_template") or _template_jinja(template, tok)
    return tok


def _template_jinja(name: str | None, tokenizer: Any) -> str | None:
    """packtune's template ``name`` as a Jinja chat template for ``tokenizer``."""
    if name is None:
        return None
    from packtune.data.templates import get_template

    return get_template(name, tokenizer).to_jinja()
