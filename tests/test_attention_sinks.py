"""Attention sinks: ``varlen_attn_func(..., sinks=)`` and the families that use them (gpt-oss & co).

The reference is the plainest softmax-with-sink there is: per document, float64 scores with the
mask applied, one more column holding the sink logit, softmax, the sink column dropped. Values
and the gradients of q, k, v and the sinks are compared on every backend that runs on CPU.
The families run a packed row (documents longer than the sliding window, the later ones at a
large offset) through ``enable_varlen`` against each document alone through the model's own
eager attention: logits and the gradient of every parameter.
"""

from __future__ import annotations

import pytest
import torch

from packed_reference import compare_packed_alone
from packtune.attention import backends
from packtune.attention.varlen import AttnRequest, varlen_attn_func
from varlen_reference import call_cost


def sink_reference(q, k, v, cu, sinks, causal, window, softcap, scale):
    """Softmax with a sink column, one document at a time, float64; ``(total, heads, dv)``."""
    outs = []
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    for d, (a, b) in enumerate(zip(cu, cu[1:])):
        n = b - a
        qi = q[a:b].double().transpose(0, 1)
        ki = k[a:b].double().transpose(0, 1).repeat_interleave(group, 0)
        vi = v[a:b].double().transpose(0, 1).repeat_interleave(group, 0)
        s = qi @ ki.transpose(-1, -2) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(n).unsqueeze(1)
        j = torch.arange(n).unsqueeze(0)
        allowed = torch.ones(n, n, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if window[0] >= 0:
            allowed &= j >= i - window[0]
        s = s.masked_fill(~allowed, float("-inf"))
        sink = sinks.double().view(heads, 1, 1).expand(heads, n, 1) if sinks.dim() == 1 else sinks[a:b].double().t().unsqueeze(-1)
        p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
        outs.append((p @ vi).transpose(0, 1))
    return torch.cat(outs)


CASES = {
    "causal": dict(causal=True, window=(-1, -1), softcap=0.0),
    "sliding": dict(causal=True, window=(3, 0), softcap=0.0),
    "softcap": dict(causal=True, window=(-1, -1), softcap=5.0),
    "bidirectional": dict(causal=False, window=(-1, -1), softcap=0.0),
}


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("per_token", [False, True])
def test_sinks_match_softmax_with_a_sink_column(backend, case, per_token):
    opts = CASES[case]
    lengths = [7, 1, 12, 4, 12]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    total, heads, kv_heads, dim = cu[-1], 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(total, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    sinks = torch.randn((total, heads) if per_token else (heads,), generator=gen) * 2
    grad = torch.randn(total, heads, dim, generator=gen)
    mine = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    theirs = [t.clone().double().requires_grad_() for t in (q, k, v, sinks)]
    with call_cost(0.0):  # several buckets: the per-token sinks travel through the gathers
        out = varlen_attn_func(
            *mine[:3], torch.tensor(cu, dtype=torch.int32), torch.tensor(cu, dtype=torch.int32), 12, 12,
            causal=opts["causal"], window_size=opts["window"], softcap=opts["softcap"], sinks=mine[3], backend=backend,
        )
    ref = sink_reference(*theirs[:3], cu, theirs[3], opts["causal"], opts["window"], opts["softcap"], dim**-0.5)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    (out * grad).sum().backward()
    (ref * grad.double()).sum().backward()
    for name, a, b in zip(("q", "k", "v", "sinks"), mine, theirs):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"d{n}: {m}")
    # The sink changes the result: without it the output differs (the check above can fail).
    plain = varlen_attn_func(q, k, v, torch.tensor(cu, dtype=torch.int32), torch.tensor(cu, dtype=torch.int32),
                             12, 12, causal=opts["causal"], window_size=opts["window"], softcap=opts["softcap"])
    assert (plain - out.detach()).abs().max() > 1e-2


def test_lse_with_sinks_counts_the_sink():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(5, 2, 8, generator=gen) for _ in range(3))
    sinks = torch.tensor([0.5, -1.0])
    cu = torch.tensor([0, 5], dtype=torch.int32)
    _, lse, _ = varlen_attn_func(q, k, v, cu, cu, 5, 5, causal=True, sinks=sinks, return_attn_probs=True, backend="eager")
    s = torch.einsum("qhd,khd->hqk", q, k) * 8**-0.5
    s = s.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.logsumexp(torch.cat([s, sinks.view(2, 1, 1).expand(2, 5, 1)], -1), -1)
    torch.testing.assert_close(lse, expected)


@pytest.mark.parametrize("name", ["flash_attn", "torch"])
def test_flash_kernels_refuse_sinks_in_words(name):
    req = AttnRequest(device_type="cuda", dtype=torch.bfloat16, causal=True, window=(-1, -1), softcap=0.0,
                      dropout_p=0.0, alibi=False, return_lse=False, head_dim=64, v_head_dim=64, gqa=False,
                      needs_grad=True, sinks=True)
    reason = backends.unsupported(name, req)
    assert reason is not None and "sink" in reason
    assert backends.unsupported("sdpa", req) is None


def test_bad_sinks_shape_is_refused():
    q = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="sinks must have shape"):
        varlen_attn_func(q, q, q, cu, cu, 4, 4, sinks=torch.zeros(3))


# Families with sinks: a sliding window of 4 (documents are longer), and one long first document
# that puts the later ones at a large offset.
SINK_FAMILIES = {
    "gpt_oss": dict(sliding_window=4, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["sliding_attention", "full_attention"]),
    "granite_swa": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "granitemoe_swa": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "mimo_v2_flash": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "flint": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("model_type", list(SINK_FAMILIES))
@pytest.mark.parametrize("lengths", [(17, 5, 30, 9), (300, 17, 5, 30)], ids=["short", "offset"])
def test_sink_families_packed_equal_documents_alone(model_type, lengths):
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type}")
    logits, grads = compare_packed_alone(model_type, lengths, **SINK_FAMILIES[model_type])
    assert logits < 1e-5 and grads < 1e-4, (logits, grads)


def test_sinks_are_honoured_on_the_dense_path_too():
    """A padded batch (the dense-mask path) of gpt-oss rows equals each row alone."""
    import copy

    from packed_reference import tiny
    from packtune.modeling import enable_varlen

    model = tiny("gpt_oss", **SINK_FAMILIES["gpt_oss"]).eval()
    reference = copy.deepcopy(model)
    enable_varlen(model)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        for row, n in ((0, 9), (1, 6)):
            alone = reference(input_ids=ids[row : row + 1, :n]).logits[0]
            torch.testing.assert_close(out[row, :n], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_sinks_on_cuda_bf16_match_eager():
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 100, 130, 400], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(400, 8, 64, generator=gen).cuda().bfloat16().requires_grad_() for _ in range(3))
    sinks = torch.randn(8, generator=gen).cuda().requires_grad_()
    out = varlen_attn_func(q, k, v, cu, cu, 270, 270, causal=True, window_size=(63, 0), sinks=sinks)
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v, sinks)]
    for t in (q, k, v, sinks):
        t.grad = None
    ref = varlen_attn_func(q, k, v, cu, cu, 270, 270, causal=True, window_size=(63, 0), sinks=sinks, backend="eager")
    ref.float().square().sum().backward()
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for mine, t in zip(grads, (q, k, v, sinks)):
        torch.testing.assert_close(mine.float(), t.grad.float(), rtol=5e-2, atol=5e-2)
