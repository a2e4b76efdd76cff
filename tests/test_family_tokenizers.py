"""Tokenizers of InternLM, InternLM2, Baichuan, ChatGLM3 and Qwen-1, loaded without remote code.

Each test folder is what such a checkpoint ships: a ``tokenizer_config.json`` naming the
remote-code class, and a tiny SentencePiece model trained here (or a tiny ``qwen.tiktoken``
made here). The ids ``load_tokenizer`` gives must equal a reference written from the original
tokenizers' rules: ``SentencePieceProcessor.encode`` on the text between special tokens, each
special token its own id (ChatGLM's appended after the SentencePiece vocabulary, ``sop``/``eop``
only as whole words), BOS / ``[gMASK] sop`` / nothing first; for Qwen-1 the ``tiktoken``
library with Qwen's pattern and special tokens on the NFC-normalised text.
"""

from __future__ import annotations

import base64
import io
import json
import re
import unicodedata
from collections import Counter

import pytest
import sentencepiece as spm
import tiktoken

from packtune.data import DataError, get_template, load_tokenizer
from packtune.ports.family_tokenizers import FAMILIES, QWEN_PATTERN
from packtune.data.tokenize import encode_segments

CORPUS = """The quick brown fox jumps over the lazy dog, twice.
Hello world, hello packtune! Two  spaces, a tab\tand more.
def twice(x): return x * 2  # code
汉字也可以分词，测试一下中文。 ünïcödé café
Numbers 12345 and 3.14159; symbols #@$%^&*()
""".splitlines() * 30

# Texts to encode: whitespace runs, newlines, byte fallback (emoji), NFKC-sensitive characters
# (full-width letters, ligature), combining accents, words containing "sop".
TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "two  spaces\nnew line\n\n  indented\ttab",
    "汉字 测试 🎉 ｆｕｌｌ ﬁne cafe\u0301 café",
    "isopropyl soprano sop eop",
    "",
]
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello world, twice?"},
    {"role": "assistant", "content": "Hello hello."},
    {"role": "user", "content": "汉字 🎉"},
    {"role": "assistant", "content": "The  quick fox."},
]


def train_spm(folder, **options):
    """A ~400-piece BPE SentencePiece model with byte fallback, as these families use."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2, **options)
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def write_config(folder, cls, **extra):
    module = "tokenization_" + cls.lower().replace("tokenizer", "")
    config = {"tokenizer_class": cls, "auto_map": {"AutoTokenizer": [f"{module}.{cls}", None]}, **extra}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def split_encode(text, special_ids, encode, whole_word=()):
    """The original rule: each special token is its id, the text between them goes to ``encode``."""
    alternatives = [rf"\b{re.escape(t)}\b" if t in whole_word else re.escape(t)
                    for t in sorted(special_ids, key=len, reverse=True)]
    out = []
    for part in re.split("(" + "|".join(alternatives) + ")", text):
        if part in special_ids:
            out.append(special_ids[part])
        elif part:
            out += encode(part)
    return out


def check_family(tok, special_ids, encode, first, texts, whole_word=()):
    """Every text, bare and with special tokens, and the family's rendered conversation."""
    for text in texts:
        expected = split_encode(text, special_ids, encode, whole_word)
        assert tok(text, add_special_tokens=False)["input_ids"] == expected, text
        assert tok(text)["input_ids"] == first + expected, text


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tmp_path_factory.mktemp("family_tokenizers")


def test_internlm_adds_bos_and_keeps_its_pieces(folders):
    folder = folders / "internlm"
    sp = train_spm(folder, user_defined_symbols=["<eoh>", "<eoa>"])
    write_config(folder, "InternLMTokenizer")
    tok = load_tokenizer(str(folder))
    # The whole SentencePiece vocabulary, piece for piece (LlamaTokenizer(vocab_file=...) would
    # have 3 tokens in transformers 5).
    assert len(tok) == sp.get_piece_size() == 400
    assert tok.convert_ids_to_tokens(list(range(400))) == [sp.id_to_piece(i) for i in range(400)]
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "</s>")
    specials = {t: sp.piece_to_id(t) for t in ("<s>", "</s>", "<unk>", "<eoh>", "<eoa>")}
    check_family(tok, specials, sp.encode, [sp.bos_id()],
                 [*TEXTS, "<s><|User|>:Hi<eoh>\n<|Bot|>:Yo<eoa>\n</s>x<unk>"])
    assert tok.chat_template is None  # no packtune template of InternLM v1: "auto" means "default"


def test_internlm2_special_tokens_and_chat_template(folders):
    folder = folders / "internlm2"
    names = FAMILIES["internlm2"].specials
    # InternLM2's model keeps whitespace as it is and adds no dummy prefix.
    sp = train_spm(folder, user_defined_symbols=list(names), add_dummy_prefix=False, remove_extra_whitespaces=False,
                   normalization_rule_name="identity")
    added = {sp.piece_to_id(t): {"content": t, "special": True} for t in ("<unk>", "<s>", "</s>", *names)}
    write_config(folder, "InternLM2Tokenizer", added_tokens_decoder=added)
    tok = load_tokenizer(str(folder))
    assert len(tok) == 400 and tok.pad_token == "</s>"
    specials = {t: sp.piece_to_id(t) for t in ("<s>", "</s>", "<unk>", *names)}
    text = get_template("internlm2_chat", tok).text(CONV)
    assert text.startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n")
    check_family(tok, specials, sp.encode, [sp.bos_id()], [*TEXTS, text, "<|action_start|><|plugin|>\n{}<|action_end|>"])
    assert tok.apply_chat_template(CONV, tokenize=False) == text  # packtune's internlm2_chat as the chat template


def test_internlm2_config_that_disagrees_with_the_model_is_refused(folders):
    folder = folders / "internlm2_bad"
    sp = train_spm(folder, user_defined_symbols=list(FAMILIES["internlm2"].specials))
    wrong = sp.piece_to_id("<|im_end|>") + 1
    write_config(folder, "InternLM2Tokenizer", added_tokens_decoder={str(wrong): {"content": "<|im_end|>"}})
    with pytest.raises(DataError, match=r"puts '<\|im_end\|>' at id"):
        load_tokenizer(str(folder))
    plain = folders / "internlm2_plain"
    train_spm(plain)
    write_config(plain, "InternLM2Tokenizer")
    with pytest.raises(DataError, match="lacks the internlm2 special tokens"):
        load_tokenizer(str(plain))


def test_baichuan2_roles_no_bos_and_template(folders):
    folder = folders / "baichuan2"
    sp = train_spm(folder, user_defined_symbols=["<reserved_106>", "<reserved_107>"], remove_extra_whitespaces=False)
    token = lambda t: {"__type": "AddedToken", "content": t, "lstrip": False, "normalized": True}  # noqa: E731
    write_config(folder, "BaichuanTokenizer", add_bos_token=False, add_eos_token=False,
                 bos_token=token("<s>"), eos_token=token("</s>"), unk_token=token("<unk>"), pad_token=token("<unk>"))
    tok = load_tokenizer(str(folder))
    assert len(tok) == 400 and (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<unk>")
    specials = {t: sp.piece_to_id(t) for t in ("<s>", "</s>", "<unk>", "<reserved_106>", "<reserved_107>")}
    text = get_template("baichuan2_chat", tok).text(CONV)
    assert text.startswith("Be brief.<reserved_106>Hello world, twice?<reserved_107>Hello hello.</s><reserved_106>")
    check_family(tok, specials, sp.encode, [], [*TEXTS, text])
    assert tok.apply_chat_template(CONV, tokenize=False) == text


def test_baichuan_7b_v1_adds_bos(folders):
    folder = folders / "baichuan"
    sp = train_spm(folder)
    write_config(folder, "BaiChuanTokenizer")
    tok = load_tokenizer(str(folder))
    check_family(tok, {t: sp.piece_to_id(t) for t in ("<s>", "</s>", "<unk>")}, sp.encode, [sp.bos_id()], TEXTS)
    assert tok.chat_template is None  # a base model without chat roles: "auto" means "default"


def test_chatglm3_appended_specials_prefix_and_build_chat_input(folders):
    folder = folders / "chatglm3"
    sp = train_spm(folder, normalization_rule_name="identity", remove_extra_whitespaces=False)  # keeps "\n"
    write_config(folder, "ChatGLMTokenizer", eos_token="</s>", pad_token="<unk>", unk_token="<unk>", padding_side="left")
    tok = load_tokenizer(str(folder))
    n = sp.get_piece_size()
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    specials = {t: n + i for i, t in enumerate(names)} | {"</s>": sp.eos_id(), "<unk>": sp.unk_id()}
    assert len(tok) == n + 9 and tok.bos_token is None and tok.pad_token_id == sp.unk_id()
    text = get_template("chatglm3", tok).text(CONV)
    check_family(tok, specials, sp.encode, [specials["[gMASK]"], specials["sop"]],
                 [*TEXTS, text, "[gMASK]sop<|user|>\n isop sop<|observation|>"], whole_word=("sop", "eop"))
    assert tok.apply_chat_template(CONV, tokenize=False) == text
    # The rendering has the ids of ChatGLM3's build_chat_input: a role token, encode("\n"), then
    # encode(content) (this model has no piece across "\n" and the next word, as asserted).
    prompt = get_template("chatglm3", tok).prompt(CONV[:4])
    assert sp.decode(sp.encode("\n")) == "\n"  # this model keeps newlines, as ChatGLM's does
    ids = [specials["[gMASK]"], specials["sop"]]
    for m in CONV[:4]:
        ids += [specials[f"<|{m['role']}|>"], *sp.encode("\n"), *sp.encode(m["content"])]
        ids += [sp.eos_id()] if m["role"] == "assistant" else []
    ids += [specials["<|assistant|>"], *sp.encode("\n")]
    assert tok(prompt, add_special_tokens=False)["input_ids"] == ids


def tiny_bpe_ranks(n_merges=120):
    """A tiktoken-format vocabulary: the 256 bytes, then byte-pair merges learnt on CORPUS."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in w.encode()] for w in re.findall(r" ?\w+|\s+|[^\w\s]+", "\n".join(CORPUS[:5]))]
    for _ in range(n_merges):
        pairs = Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [a + b]
                i += 1
    return ranks


def test_qwen1_tiktoken_file(folders):
    folder = folders / "qwen"
    folder.mkdir()
    ranks = tiny_bpe_ranks()
    (folder / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    write_config(folder, "QWenTokenizer")
    tok = load_tokenizer(str(folder))
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205))]
    reference = tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={t: len(ranks) + i for i, t in enumerate(names)})
    assert len(tok) == reference.n_vocab == len(ranks) + 208
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (None, "<|endoftext|>", "<|endoftext|>")
    text = get_template("qwen_chat", tok).text(CONV)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    for sample in [*TEXTS, text, "<|extra_0|><|extra_204|>12345 don't WE'LL\r\n\r\n  x", "\n".join(CORPUS[:5])]:
        expected = reference.encode(unicodedata.normalize("NFC", sample), allowed_special="all")
        assert tok(sample)["input_ids"] == expected, sample  # no BOS: add_special_tokens adds nothing
    assert tok.decode(tok("café 汉字 <|im_end|>")["input_ids"]) == "café 汉字 <|im_end|>"
    assert tok.apply_chat_template(CONV, tokenize=False) == text
    (folder / "qwen.tiktoken").write_text("bm90IGJhc2U2NA== 0\nnot-base64! 1\n")
    with pytest.raises(DataError, match=r"qwen.tiktoken:2: not a 'base64-token rank' line"):
        load_tokenizer(str(folder))


def test_remote_code_is_never_run_and_saved_tokenizers_load_plainly(folders, tmp_path):
    from transformers import AutoTokenizer

    folder = folders / "internlm2"  # made by the internlm2 test above, or made here
    if not folder.is_dir():
        train_spm(folder, user_defined_symbols=list(FAMILIES["internlm2"].specials))
        write_config(folder, "InternLM2Tokenizer")
    (folder / "tokenization_internlm2.py").write_text("raise RuntimeError('remote code ran')\n")
    tok = load_tokenizer(str(folder), trust_remote_code=True)
    tok.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))  # the saved folder needs no packtune
    text = get_template("internlm2_chat", tok).text(CONV)
    assert again(text)["input_ids"] == tok(text)["input_ids"] and len(again) == len(tok)
    assert again.apply_chat_template(CONV, tokenize=False) == text


def test_trained_tokens_through_the_pipeline(folders):
    """encode_segments (the data pipeline) trains exactly each reply and its EOS, ChatGLM3 here."""
    folder = folders / "chatglm3"
    if not folder.is_dir():
        train_spm(folder)
        write_config(folder, "ChatGLMTokenizer")
    tok = load_tokenizer(str(folder))
    segments = get_template("chatglm3", tok).render(CONV)
    ids, labels, _ = encode_segments(tok, [segments])
    ids = [int(i) for i in ids]
    assert ids == tok("".join(t for t, _ in segments), add_special_tokens=False)["input_ids"]
    # Trained: after each <|assistant|> and its "\n", the reply up to and including its EOS.
    newline = len(tok("\n", add_special_tokens=False)["input_ids"])
    starts = [i + 1 + newline for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids("<|assistant|>")]
    expected = [i for a in starts for i in ids[a : ids.index(tok.eos_token_id, a) + 1]]
    trained = [i for i, label in zip(ids, labels) if label != -100]
    assert len(starts) == 2 and trained == expected


@pytest.mark.parametrize("name, cls, template", [("chatglm3_6b_lora_alpaca_e3", "ChatGLMTokenizer", "chatglm3"),
                                                 ("baichuan2_13b_full_oasst1_e3", "BaichuanTokenizer", "baichuan2_chat")])
def test_a_catalog_entry_packs_with_its_family_tokenizer(tmp_path, capsys, name, cls, template):
    """log-dataset on a built-in entry of a ported family: its tokenizer and template, packed."""
    from packtune.cli.main import main

    folder = tmp_path / "tokenizer"
    train_spm(folder, user_defined_symbols=["<reserved_106>", "<reserved_107>"] if "baichuan" in name else [])
    write_config(folder, cls)
    rows = [{"instruction": f"Say {w} twice.", "input": "", "output": f"{w} {w}."} for w in ("hello", "fox", "dog")]
    conv = [{"text": f"### Human: Say {w}.### Assistant: {w}."} for w in ("hello", "fox", "dog")]
    data = tmp_path / ("rows.json" if "alpaca" in name else "rows.jsonl")
    data.write_text(json.dumps(rows) if "alpaca" in name else "\n".join(map(json.dumps, conv)))
    code = main(["log-dataset", name, "--json", "--cfg-options", f"pretrained_model_name_or_path={folder}",
                 f"dataset={data}", "max_length=512", f"data_cache_dir={tmp_path / 'cache'}", "num_proc=1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["template"] == template
    assert report["kept"] == report["documents"] == 3 and report["packs"] == 1 and report["trained_tokens"] > 6

