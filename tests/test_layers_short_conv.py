"""LFM2's short convolution on packed rows equals each document alone.

The convolution (kernel 3 here) is the only place LFM2's conv layers mix tokens; without
boundaries its taps read the end of the previous document (the issue measured gradients off by
0.76 and 0.97 relative on lfm2 and lfm2_moe). Through ``enable_varlen``, logits and the gradient
of every parameter equal each document alone, including documents of one and two tokens (shorter
than the kernel) and a long one at a large offset.
"""

from __future__ import annotations

import pytest

from packed_reference import assert_packed_equals_alone, cuda_logit_error, relative_errors, tiny_causal_lm

CONV = dict(layer_types=["conv", "full_attention"], conv_L_cache=3)
FAMILIES = {
    "lfm2": CONV,
    "lfm2_moe": {**CONV, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_dense_layers": 1},
    "lfm3": CONV,
}
LENGTHS = (17, 5, 1, 30, 2, 150, 9)


@pytest.mark.parametrize("model_type", FAMILIES, ids=list(FAMILIES))
def test_packed_row_equals_documents_alone(model_type):
    assert_packed_equals_alone(tiny_causal_lm(model_type, **FAMILIES[model_type]), [LENGTHS], by_positions=True, seed=1)


def test_without_enable_varlen_the_convolution_leaks():
    """The same comparison fails on the model's own forward: the check can see the leak."""
    _, errors = relative_errors(tiny_causal_lm("lfm2", **CONV), LENGTHS, enable=False)
    assert max(errors.values()) > 1e-2


@pytest.mark.gpu
def test_cuda_packed_row_equals_documents_alone():
    """On CUDA the convolution is causal_conv1d_fn with seq_idx where installed."""
    assert cuda_logit_error(tiny_causal_lm("lfm2", **CONV), LENGTHS) < 1e-4
