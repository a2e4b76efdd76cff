"""The chunked loss head (issue 11, section 2) against the plain head, as a function.

``chunked_loss_sum(hidden, weight, targets, weights, chunk_size, transform)`` must give the loss
and the gradients of ``hidden`` and ``weight`` that ``weighted_loss_sum`` gives on the full
logits ``transform(hidden @ weight.T)``, in fp32 to a relative 1e-6 (see ``_rel``), for every number of
tokens, vocabulary, chunk size, ``loss_reduction`` (weights from ``target_weights``) and head
transform. The reference transforms below are written as the transformers model code writes
them (gemma2 ``final_logit_softcapping``, cohere ``logit_scale``, granite ``logits_scaling``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import Largest
from packtune.loss import REDUCTIONS, target_weights, weighted_loss_sum
from packtune.loss_head import chunked_loss_sum

TRANSFORMS = {
    "none": (),
    "softcap": (("softcap", 2.5),),
    "scale": (("scale", 0.0625),),
    "divide": (("divide", 4.0),),
}


def _reference_logits(logits: torch.Tensor, name: str) -> torch.Tensor:
    """The models' own head code (gemma2, cohere, granite)."""
    if name == "softcap":
        logits = logits / 2.5
        logits = torch.tanh(logits)
        return logits * 2.5
    if name == "scale":
        return logits * 0.0625
    if name == "divide":
        return logits / 4.0
    return logits


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error in the 2-norm, ``|got - want| / |want|``.

    Not elementwise: in fp32 the plain head's own gradients are up to ~1e-6 (largest element
    difference over the largest element) away from the same head computed in float64, and
    the chunked head's are as far (measured over 2,000 random cases: 9.6e-7 and 9.2e-7), so
    elementwise the two can differ by a little more than 1e-6 through rounding alone. In the
    norm both stay within ~5e-7 of float64 and within 7e-7 of each other.
    """
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def _problem(seed: int, tokens: int, vocab: int, hidden: int, reduction: str, docs: int, scale: float = 1.0):
    """Random hidden states, weight, and labels of ``docs`` documents, some positions untrained."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=gen) * scale).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=gen)
    labels[torch.rand(1, tokens, generator=gen) < 0.3] = -100
    cuts = torch.randperm(max(tokens - 1, 1), generator=gen)[: docs - 1].add(1).sort().values if tokens > 1 else torch.tensor([], dtype=torch.int64)
    cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([tokens])]).unique()
    targets, weights = target_weights(labels, cu, reduction)
    return h, w, targets, weights


def _grads(loss: torch.Tensor, *tensors: torch.Tensor, scale: float = 1.0):
    (loss * scale).backward()
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def _compare(h, w, targets, weights, chunk, transform, rel=1e-6):
    scale = 0.37  # the step's 1 / (sum of weights): the backward's incoming gradient is not 1
    got = chunked_loss_sum(h, w, targets, weights, chunk, TRANSFORMS[transform])
    got_h, got_w = _grads(got, h, w, scale=scale)
    want = weighted_loss_sum(_reference_logits(h @ w.T, transform), targets, weights)
    want_h, want_w = _grads(want, h, w, scale=scale)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=rel, abs=1e-30)
    assert _rel(got_h, want_h) <= rel, ("hidden", _rel(got_h, want_h))
    assert _rel(got_w, want_w) <= rel, ("weight", _rel(got_w, want_w))


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    tokens=st.integers(1, 70),
    vocab=st.integers(2, 300),
    chunk=st.integers(1, 80),
    reduction=st.sampled_from(REDUCTIONS),
    transform=st.sampled_from(sorted(TRANSFORMS)),
    docs=st.integers(1, 6),
)
def test_chunked_head_equals_plain_head(seed, tokens, vocab, chunk, reduction, transform, docs):
    h, w, targets, weights = _problem(seed, tokens, vocab, 16, reduction, docs)
    _compare(h, w, targets, weights, chunk, transform)


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_large_logits_and_many_chunks(transform):
    """Logits in the tens (a peaked softmax), a larger vocabulary, ten chunks."""
    h, w, targets, weights = _problem(7, 600, 1000, 32, "square", 9, scale=8.0)
    _compare(h, w, targets, weights, 64, transform)


def test_only_trained_positions_count_and_nothing_trained_is_zero():
    h, w, targets, weights = _problem(1, 20, 50, 8, "token", 2)
    targets = torch.full_like(targets, -100)
    weights = torch.zeros_like(weights)
    loss = chunked_loss_sum(h, w, targets, weights, 4)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert not h.grad.any() and not w.grad.any()


def test_without_autograd_only_the_loss_is_computed():
    h, w, targets, weights = _problem(2, 30, 64, 8, "sample", 3)
    with torch.no_grad():
        loss = chunked_loss_sum(h, w, targets, weights, 7)
    assert loss.grad_fn is None
    assert float(loss) == pytest.approx(float(weighted_loss_sum(h @ w.T, targets, weights)), rel=1e-6)
    # Only the hidden states need a gradient (a frozen output layer): the weight gets none.
    w_frozen = w.detach()
    loss = chunked_loss_sum(h, w_frozen, targets, weights, 7)
    loss.backward()
    want_h, = torch.autograd.grad(weighted_loss_sum(h @ w_frozen.T, targets, weights), h)
    assert _rel(h.grad, want_h) <= 1e-6 and w_frozen.grad is None


def test_bf16_autocast_matches_the_plain_head_under_autocast():
    """Under autocast the products run in bf16, as the plain head's do; the softmax in fp32."""
    h, w, targets, weights = _problem(3, 200, 500, 32, "token", 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_loss_sum(h, w, targets, weights, 64)
        want = weighted_loss_sum(h @ w.T, targets, weights)
    got_h, got_w = _grads(got, h, w)
    want_h, want_w = _grads(want, h, w)
    assert got.dtype == torch.float32 and got_w.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), rel=1e-3)
    assert _rel(got_h, want_h) < 2e-2 and _rel(got_w, want_w) < 2e-2


def test_backward_runs_once_and_bad_arguments_are_refused():
    h, w, targets, weights = _problem(4, 10, 20, 8, "token", 1)
    loss = chunked_loss_sum(h, w, targets, weights, 4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        loss.backward()
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got 0"):
        chunked_loss_sum(h, w, targets, weights, 0)
    with pytest.raises(ValueError, match=r"must be \(tokens, d\) and \(vocab, d\)"):
        chunked_loss_sum(h, w[:, :4], targets, weights, 4)
    with pytest.raises(ValueError, match=r"must be \(10,\)"):
        chunked_loss_sum(h, w, targets[:5], weights, 4)


def test_logits_never_exist_in_full():
    """No tensor of the forward and backward is larger than one chunk of logits (or the weight)."""
    tokens, vocab, hidden, chunk = 400, 1000, 8, 16
    h, w, targets, weights = _problem(5, tokens, vocab, hidden, "token", 3)
    for name, transform in TRANSFORMS.items():
        with Largest() as seen:
            chunked_loss_sum(h, w, targets, weights, chunk, transform).backward()
        assert seen.largest <= chunk * vocab, (name, seen.largest)
    with Largest() as seen:  # the plain head, for contrast
        weighted_loss_sum(h @ w.T, targets, weights).backward()
    assert seen.largest == tokens * vocab


@pytest.mark.parametrize("value, problem", [
    (0, "`loss_chunk_size` must be None or an int >= 1, got 0 (int); fix: set `loss_chunk_size` to None or an int >= 1"),
    (512.0, "`loss_chunk_size` must be None or an int >= 1, got 512.0 (float); fix: write `loss_chunk_size = 512` (an int, not a float)"),
    ("1024", "`loss_chunk_size` must be None or an int >= 1, got '1024' (str); fix: write `loss_chunk_size = 1024` (without quotes)"),
])
def test_loss_chunk_size_setting(value, problem):
    from packtune.config import ConfigError, Settings, load_settings
    from packtune.config.settings import LOSS_CHUNK_SIZE

    base = dict(pretrained_model_name_or_path="org/model", dataset="tatsu-lab/alpaca")
    assert Settings(**base).loss_chunk_size == LOSS_CHUNK_SIZE == 1024
    assert Settings(**base, loss_chunk_size=None).loss_chunk_size is None
    with pytest.raises(ConfigError) as err:
        Settings(**base, loss_chunk_size=value)
    assert problem in str(err.value)
    with pytest.raises(ConfigError, match="did you mean `loss_chunk_size`"):
        load_settings("tiny_llama_full_demo", ["loss_chunk_sise=8"])


def test_benchmark_runs_and_checks_both_heads(tmp_path, capsys, monkeypatch):
    """``benchmarks/bench_loss_head.py`` at a tiny size, in this process: both heads run, are
    checked equal, and the table prints; no figure is asserted (benchmarks hold the goals)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loss_head.py"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what the module sets on import; undone after
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("packtune_bench_loss_head", path)
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        out = tmp_path / "table.md"
        argv = ["--tokens", "256", "--side-tokens", "128", "--hidden", "32", "--vocab", "500", "--chunk", "48",
                "--rounds", "1", "--out", str(out), "--in-process"]
        assert bench.main(argv) == 0
    finally:
        sys.path.remove(str(path.parent))
    table = out.read_text()
    assert "peak memory" in table and "time, best of 1" in table and "chunked head alone at 256" in table
    assert "largest relative gap" in table and (tmp_path / "table.json").is_file()
    assert table in capsys.readouterr().out
