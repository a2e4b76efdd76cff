"""load_model / save_model beyond the per-family reference: refusals, the native layout,
NormHead with LoRA, ALiBi decoding with a KV cache, Qwen-1's long-context note, LoRA export."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from ports_reference import CONFIGS, VOCAB, write_checkpoint

import packtune
from packtune.cli.main import main
from packtune.ports.api import load_model, save_model
from packtune.ports.files import read_weights
from packtune.ports.layout import PortError
from packtune.ports.norm_head import NormHead


def _write_config(folder, cfg: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


CHATGLM_V1 = dict(architectures=["ChatGLMModel"], model_type="chatglm", hidden_size=4096, num_layers=28, num_attention_heads=32,
                  inner_hidden_size=16384, max_sequence_length=2048, position_encoding_2d=True, vocab_size=130528,
                  bos_token_id=130004, eos_token_id=130005, gmask_token_id=130001, mask_token_id=130000, layernorm_epsilon=1e-5)


def test_refusals_are_one_line(tmp_path, capsys):
    v1 = _write_config(tmp_path / "chatglm-6b", CHATGLM_V1)
    with pytest.raises(PortError, match=r"ChatGLM-6B \(v1\) is not supported: it uses 2-D position encoding"):
        load_model(v1)
    unknown = _write_config(tmp_path / "unknown", {"model_type": "mystery_lm", "hidden_size": 8})
    with pytest.raises(PortError, match="'mystery_lm' is neither a transformers architecture nor one packtune ports"):
        load_model(unknown)
    odd = {**CONFIGS["baichuan2-7b"][0], "architectures": ["BaichuanForCausalLM"]}
    odd.pop("z_loss_weight")  # Baichuan2 layout with Baichuan 1's markers: fits none
    with pytest.raises(PortError, match="fits no known Baichuan"):
        load_model(_write_config(tmp_path / "odd", odd))
    quantized = {**CONFIGS["chatglm3"][0], "quantization_bit": 4}
    with pytest.raises(PortError, match="quantization_bit = 4"):
        load_model(_write_config(tmp_path / "int4", quantized))
    capsys.readouterr()
    assert main(["chat", v1, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ChatGLM-6B (v1)" in err


def test_pickled_code_in_a_bin_is_refused(tmp_path):
    folder = tmp_path / "internlm"
    write_checkpoint(folder, "internlm")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["extra"] = subprocess.Popen  # any object that is not a tensor: unpickling would import code
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(PortError, match="weights_only=True"):
        load_model(folder)


def _ids(n: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["baichuan2-7b", "baichuan2-13b"])
def test_native_layout_loads_and_keeps_the_normalised_head(family, tmp_path):
    write_checkpoint(tmp_path / "base", family)
    model = load_model(tmp_path / "base")
    assert isinstance(model.lm_head, NormHead)
    save_model(model, tmp_path / "native", format="native")
    written = json.loads((tmp_path / "native" / "config.json").read_text())
    assert written["model_type"] == {"baichuan2-7b": "llama", "baichuan2-13b": "baichuan_alibi"}[family]
    assert "packtune_attn_backend" not in written and written["use_cache"] is True
    # The model saving it is unchanged: still varlen, still cache-off.
    assert model.config._attn_implementation == "packtune_varlen" and model.config.use_cache is False
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        expected = model(_ids()).logits
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "native")  # no packtune loader, no remote code
        torch.testing.assert_close(plain(_ids()).logits, expected, rtol=1e-5, atol=1e-5)
        again = load_model(tmp_path / "native")
        assert isinstance(again.lm_head, NormHead)
        torch.testing.assert_close(again(_ids()).logits, expected, rtol=1e-5, atol=1e-5)


def test_norm_head_trains_raw_rows_under_lora(tmp_path):
    from packtune.recipe.model_setup import apply_lora

    write_checkpoint(tmp_path / "base", "baichuan2-7b")
    model = load_model(tmp_path / "base")
    with torch.no_grad():
        before = model(_ids()).logits
    lora = apply_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0})
    assert isinstance(lora.get_base_model().lm_head, NormHead)  # the head is not wrapped, still normalised
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    logits = lora(input_ids=_ids(), position_ids=pos).logits
    alone = lora(input_ids=_ids()[:, 4:], position_ids=pos[:, 4:]).logits
    torch.testing.assert_close(logits[:, 4:], alone, rtol=1e-5, atol=1e-5)  # varlen under LoRA
    with torch.no_grad():
        torch.testing.assert_close(lora(_ids()).logits, before)  # B = 0: LoRA starts as the identity
    logits.sum().backward()
    trained = [p.grad for n, p in lora.named_parameters() if "lora_" in n and p.requires_grad]
    assert trained and any(float(g.abs().sum()) > 0 for g in trained)


def test_alibi_decoding_with_a_cache_matches_full_recompute(tmp_path):
    write_checkpoint(tmp_path / "base", "baichuan2-13b")
    model = load_model(tmp_path / "base").eval()
    for cfg in (model.config,):
        cfg.use_cache = True  # what chat does
    prompt = _ids(6, seed=3)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == seq.tolist()
    # A left-padded batch decodes each row as if alone (padding is a document of its own).
    short = _ids(3, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), prompt])
    mask = torch.cat([torch.tensor([[0, 0, 0, 1, 1, 1]]), torch.ones(1, 6, dtype=torch.long)])
    both = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
    alone = model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=4, do_sample=False)
    assert both[0, 3:].tolist() == alone[0].tolist() and both[1].tolist() == out[0, :10].tolist()
    # Right-padded training rows (use_varlen_attn = False): the real tokens never see the padding.
    with torch.no_grad():
        padded = model(batch.flip(1), attention_mask=mask.flip(1), use_cache=False).logits
        torch.testing.assert_close(padded[0, :3], model(short.flip(1), use_cache=False).logits[0], rtol=1e-5, atol=1e-5)
    # attn_implementation passed to load_model is kept (no varlen switch); ALiBi stays per document.
    eager = load_model(tmp_path / "base", attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(eager(prompt).logits, model(prompt, use_cache=False).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("explicit", [True, False], ids=["cu_seq_lens", "position_ids"])
def test_alibi_host_reads_do_not_grow_with_depth(tmp_path, host_reads, explicit):  # noqa: F811  (the imported fixture)
    """The ALiBi class uses the boundaries enable_varlen's hook validated once per forward: no
    host read (a device sync on CUDA) per layer."""

    def reads(layers: int) -> int:
        write_checkpoint(tmp_path / str(layers), "baichuan2-13b", num_hidden_layers=layers)
        model = load_model(tmp_path / str(layers)).train()
        pos = torch.cat([torch.arange(n) for n in (5, 9, 3, 7)])[None]
        batch = {"input_ids": _ids(24), "position_ids": pos}
        if explicit:
            cu = torch.tensor([0, 5, 14, 17, 24])
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
        host_reads.clear()
        model(**batch).logits.square().mean().backward()
        return sum(host_reads.values())

    shallow, deep = reads(2), reads(4)
    assert deep == shallow <= 4, (shallow, deep, dict(host_reads))


def test_qwen_says_once_where_the_original_differs(tmp_path):
    write_checkpoint(tmp_path / "base", "qwen")  # seq_length = 24, dynamic NTK and logn on
    model = load_model(tmp_path / "base")
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(_ids(30))  # training mode: the original is exact at any length too
        model.eval()
        model(_ids(20))  # within seq_length
    with pytest.warns(UserWarning, match="beyond seq_length = 24 tokens the original applies dynamic NTK and logn"):
        model(_ids(30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(_ids(30))  # once


LORA_CONFIG = '''pretrained_model_name_or_path = {model!r}
use_varlen_attn = True
dataset = 'packtune://demo_tasks.jsonl'
dataset_format = 'alpaca'
prompt_template = 'default'
max_length = 64
pack_to_max_length = True
tokenizer_name_or_path = 'packtune://mistral-v1'
dtype = 'float32'
lora = dict(r=4, alpha=8, dropout=0.0)
'''


def test_lora_export_is_native_only_and_merges_to_either_layout(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PACKTUNE_CACHE", str(tmp_path / "cache"))
    from packtune.config import load_settings
    from packtune.recipe.model_setup import build_model

    base = tmp_path / "internlm2"
    write_checkpoint(base, "internlm2", vocab_size=32000)
    config = tmp_path / "lora.py"
    config.write_text(LORA_CONFIG.format(model=str(base)))
    model = build_model(load_settings(str(config)), torch.device("cpu"), torch.float32)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(0))  # a trained adapter
    pth = tmp_path / "iter_1.pth"
    torch.save({"model": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}}, pth)
    capsys.readouterr()

    assert main(["convert", "pth_to_hf", str(config), str(pth), str(tmp_path / "x"), "--format", "original"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "adapters are exported for the native layout only" in err

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert main(["convert", "pth_to_hf", str(config), str(pth), str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "note: a LoRA adapter on separate q/k/v cannot be expressed on the InternLM2 checkpoint's fused layout" in out
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert main(["convert", "pth_to_hf", str(config), str(pth), str(merged), "--merge"]) == 0
    assert json.loads((merged / "config.json").read_text())["model_type"] == "internlm2"
    assert "model.layers.0.attention.wqkv.weight" in read_weights(merged)[0]

    from packtune.cli.chat import load_chat_model

    ids = torch.tensor([[1, 1824, 2369, 1235, 264, 11503]])
    chat_model = load_chat_model(str(adapter), "cpu")[0]
    assert chat_model.config.use_cache is True  # load_model turns it off for training; chat turns it back on
    with torch.no_grad():
        via_adapter = chat_model(ids).logits
        torch.testing.assert_close(load_chat_model(str(merged), "cpu")[0](ids).logits, via_adapter, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(load_model(base)(ids).logits, via_adapter)
    assert main(["chat", str(adapter), "--prompt", "What sound does a cow make?", "--max-new-tokens", "3"]) == 0


def test_import_packtune_stays_cheap_and_exports_the_api():
    code = "import sys, packtune; print(sorted(m for m in ('torch', 'packtune.ports') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    assert packtune.load_model is load_model and packtune.save_model is save_model
