"""Every ported family against a plain-torch reference of its original architecture.

For each family a tiny checkpoint is written in the ORIGINAL layout (original config keys,
names, fused shapes, file format; see ``ports_reference``). ``packtune.load_model`` turns it
into the native class with varlen attention; then, in fp32:

* the logits of a packed row, per document, equal the reference run on each document alone;
* the gradient of every original parameter, mapped back through ``save_model``'s original
  map (``to_original``), equals the reference's autograd gradient;
* ``save_model(format="original")`` of the untouched model gives the input tensors bit for
  bit, in the base's file format, with the original config and the base's side files.
"""

from __future__ import annotations

import json

import pytest
import torch
from ports_reference import FAMILIES, VOCAB, reference_logits, write_checkpoint

import packtune
from packtune.ports.api import load_model, save_model, to_original
from packtune.ports.files import read_weights, weight_files

LENGTHS = (5, 3, 7)
NATIVE = {"internlm": "llama", "internlm2": "llama", "baichuan-7b": "llama", "baichuan2-7b": "llama",
          "baichuan2-13b": "baichuan_alibi", "chatglm3": "glm", "qwen": "qwen2"}


def _packed(gen: torch.Generator):
    docs = [torch.randint(3, VOCAB, (n,), generator=gen) for n in LENGTHS]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    inputs = {
        "input_ids": torch.cat(docs)[None],
        "position_ids": torch.cat([torch.arange(n) for n in LENGTHS])[None],
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(LENGTHS), "max_length_k": max(LENGTHS),
    }
    return docs, inputs


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = float(expected.abs().max().clamp_min(1e-12))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_reference_and_round_trips(family, tmp_path):
    base = tmp_path / "base"
    cfg, state = write_checkpoint(base, family)
    model = load_model(base)
    assert model.config.model_type == NATIVE[family]
    assert model.config._attn_implementation == "packtune_varlen" and model.config.use_cache is False
    assert packtune.check_no_leak(model) < 1e-5

    gen = torch.Generator().manual_seed(1)
    docs, inputs = _packed(gen)
    logits = model(**inputs).logits[0]
    probe = torch.randn(logits.shape, generator=gen)
    (logits * probe).sum().backward()
    grads = to_original(model, {n: p.grad for n, p in model.named_parameters()})

    weights = {n: t.clone().requires_grad_(True) for n, t in state.items() if not n.endswith("inv_freq")}
    total, start = 0.0, 0
    for doc in docs:
        ref = reference_logits(family, cfg, weights, doc)
        _close(logits[start : start + len(doc)].detach(), ref.detach(), f"{family} logits")
        total = total + (ref * probe[start : start + len(doc)]).sum()
        start += len(doc)
    total.backward()
    assert set(grads) == set(weights)
    for name, w in weights.items():
        _close(grads[name], w.grad, f"{family} grad {name}")

    out = tmp_path / "original"
    save_model(model, out, format="original")
    saved, fmt = read_weights(out)
    assert fmt == weight_files(base)[0]  # a .bin base stays .bin
    assert set(saved) == set(weights)  # derived inv_freq buffers dropped, nothing else
    for name, tensor in weights.items():
        assert saved[name].dtype == tensor.dtype and torch.equal(saved[name], tensor.detach()), name
    written = json.loads((out / "config.json").read_text())
    for key in ("model_type", "architectures", "auto_map"):
        assert written[key] == cfg[key]
    module = cfg["auto_map"]["AutoModelForCausalLM"].split(".")[0]
    assert (out / f"{module}.py").read_text() == (base / f"{module}.py").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text())["stand_in"] == family
