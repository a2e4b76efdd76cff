"""The chunked loss head on CUDA (issue 11, section 2): fp32 and bf16 autocast against the plain head.

Marked ``gpu`` (skipped without CUDA). No hypothesis or peft here: ``benchmarks/gpu_check.sh``
runs this file on a bare GPU machine. In fp32 (TF32 off, torch's default for matmuls) the
chunked head equals the plain head to a relative 1e-5 in the 2-norm; under bf16 autocast both
run the products in bf16 and the softmax in fp32, and agree to bf16's precision. The peak
memory of the chunked head stays below one full set of logits.
"""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_model
from packtune.loss import target_weights, weighted_loss_sum
from packtune.loss_head import chunked_loss_sum
from packtune.packing.collate import collate_varlen
from packtune.packing.packs import IGNORE_INDEX, TokenizedSamples, get_pack, layout_packs
from packtune.recipe.step import forward_loss_sum

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-30))


def _inputs(tokens=3000, hidden=256, vocab=32000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen).cuda().requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.05).cuda().requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=gen)
    labels[torch.rand(1, tokens, generator=gen) < 0.2] = IGNORE_INDEX
    targets, weights = target_weights(labels, torch.tensor([0, tokens // 3, tokens]), "sample")
    return h, w, targets.cuda(), weights.cuda()


def _run(fn, h, w, autocast: bool):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = fn()
    (loss * 0.5).backward()
    out = (loss.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    return out


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("transform", [(), (("softcap", 30.0),), (("scale", 0.0625),), (("divide", 8.0),)], ids=["none", "softcap", "scale", "divide"])
def test_chunked_head_on_cuda_equals_plain(autocast, transform):
    h, w, targets, weights = _inputs()

    def plain():
        logits = h @ w.T
        for kind, v in transform:  # as the model code writes it
            logits = torch.tanh(logits / v) * v if kind == "softcap" else logits * v if kind == "scale" else logits / v
        return weighted_loss_sum(logits, targets, weights)

    got = _run(lambda: chunked_loss_sum(h, w, targets, weights, 512, transform), h, w, autocast)
    want = _run(plain, h, w, autocast)
    rel = 2e-2 if autocast else 1e-5
    assert got[0].dtype == torch.float32
    assert float(got[0]) == pytest.approx(float(want[0]), rel=rel / 10)
    assert _rel(got[1], want[1]) <= rel and _rel(got[2], want[2]) <= rel


def test_chunked_head_on_cuda_stays_below_the_logits():
    h, w, targets, weights = _inputs(tokens=8192, hidden=256, vocab=32000)
    logits_bytes = 8192 * 32000 * 4
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    chunked_loss_sum(h, w, targets, weights, 1024).backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < logits_bytes / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_step_on_cuda(dtype):
    """``forward_loss_sum`` on a tiny gemma2 (soft-capped head) on CUDA, chunked vs plain."""
    model = tiny_model("gemma2", attn_implementation="packtune_varlen").cuda()
    gen = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(12):
        length = int(torch.randint(6, 30, (1,), generator=gen))
        ids = torch.randint(3, 128, (length,), generator=gen).tolist()
        samples.append((ids, [IGNORE_INDEX] * 3 + ids[3:]))
    samples = TokenizedSamples.from_lists(samples)
    layout, _ = layout_packs(samples, 128, "bfd")
    batch = collate_varlen([get_pack(samples, layout, p) for p in range(len(layout))]).to("cuda")
    targets, weights = target_weights(batch.labels, batch.cu_seqlens, "token")
    results = []
    for chunk in (16, None):
        model.zero_grad(set_to_none=True)
        loss = forward_loss_sum(model, batch, targets, weights, dtype, chunk)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])))
    rel = 1e-5 if dtype == torch.float32 else 3e-2
    assert float(results[0][0]) == pytest.approx(float(results[1][0]), rel=rel)
    assert _rel(results[0][1], results[1][1]) <= rel
