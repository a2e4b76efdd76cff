"""Every text causal LM of the installed transformers trains packed EXACTLY, or is REFUSED IN WORDS.

Each model type (``every_model.text_types()``) is built tiny and random and run through
``every_model.outcome``: ``enable_varlen`` and ``check_no_leak``, then one packed row of documents
of 80, 17, 5, 30 and 9 tokens against each document alone under the model's default attention
(logits and the gradient of every parameter). Exact, or refused by ``enable_varlen`` /
``check_no_leak`` with a ``ValueError`` (``StatefulLayerError``), ``NotImplementedError`` or
``LeakError`` in one line. A ``TypeError`` or ``AttributeError`` from inside a model fails, and so
does a model that passes ``check_no_leak`` and is not exact: the leak check was fooled.

``NOT_EXACT`` is the one table of the types that are not exact, each with why. Entries that start
with ``PENDING`` are made exact by work in flight; there a crash is an expected failure
(``xfail``). A type in the table that turns exact fails until its entry is removed, so the table
only shrinks.
"""

from __future__ import annotations

import pytest

from every_model import outcome, text_types, tiny_model_of

PENDING = "pending"
_STATE = "carries state from token to token and packtune has no varlen form of it: refused by enable_varlen"
_ASIDE = ("its attention does not go through transformers' AttentionInterface, so packtune cannot route it; "
          "check_no_leak refuses it (LeakError)")

#: Model type -> why it is not exact on packed rows.
NOT_EXACT: dict[str, str] = {
    # Layers with state packtune has no varlen form of.
    "recurrent_gemma": f"RG-LRU recurrence {_STATE}",
    "rwkv": f"RWKV time mixing {_STATE}",
    "xlstm": f"mLSTM recurrence {_STATE}",
    "inkling_text": f"short convolution inside attention {_STATE}",
    "zaya": f"convolutional (CCA) q/k/v projection {_STATE}",
    # Attention outside AttentionInterface: packtune cannot reach it, the leak check refuses the model.
    "bloom": f"ALiBi: {_ASIDE}",
    "mpt": f"ALiBi: {_ASIDE}",
    "xglm": f"sinusoidal positions from the whole row: {_ASIDE}",
    "openai-gpt": f"learned absolute positions from the whole row: {_ASIDE}",
    "cpmant": f"relative position buckets over the whole row: {_ASIDE}",
}

#: Model types this test's generic tiny config cannot build yet, each with why (the test checks
#: that building still fails, so an entry cannot outlive its reason).
_GENERIC = "the generic tiny config does not fit it"
UNBUILT: dict[str, str] = {
    "cohere_compass_text": f"{_GENERIC}: its rotary embeddings want rope_parameters per layer type (KeyError)",
    "dbrx": f"{_GENERIC}: DbrxAttentionConfig built from defaults lacks rope_theta (AttributeError)",
    "dots3_note_text": f"{_GENERIC}: still 39M parameters (sizes named its own way)",
    "gemma3n_text": f"{_GENERIC}: its KV-sharing layers need the layer that produces their cache",
    "inkling2_text": f"{_GENERIC}: still 14M parameters (sizes named its own way)",
    "inkling2_loop_text": f"{_GENERIC}: still 14M parameters (sizes named its own way)",
    "kolibri1_1": f"{_GENERIC}: a sliding layer must read the K/V of a layer the subsample leaves out",
    "qwen4_exp_text": f"{_GENERIC}: its linear-attention head sizes are derived from settings it leaves None",
    "zamba": f"{_GENERIC}: its shared transformer block is tied across the layers the subsample leaves out",
}

TYPES = text_types()


def test_the_tables_name_real_text_types():
    assert len(TYPES) > 100
    assert set(NOT_EXACT) <= set(TYPES), set(NOT_EXACT) - set(TYPES)
    assert set(UNBUILT) <= set(TYPES) and not set(UNBUILT) & set(NOT_EXACT)
    assert all(len(why) > 20 for why in [*NOT_EXACT.values(), *UNBUILT.values()])


@pytest.mark.parametrize("model_type", TYPES)
def test_exact_or_refused_in_words(model_type):
    if model_type in UNBUILT:
        with pytest.raises(Exception):  # noqa: B017 - any build error keeps the entry honest
            tiny_model_of(model_type)
        pytest.xfail(UNBUILT[model_type])
    why = NOT_EXACT.get(model_type)
    try:
        kind, words = outcome(model_type)
    except Exception as exc:
        if why is not None and why.startswith(PENDING):
            pytest.xfail(f"{why}; here: {type(exc).__name__}: {str(exc)[:200]}")
        raise
    if kind == "exact":
        assert why is None, f"{model_type} is exact now ({words}): remove it from NOT_EXACT"
    elif kind == "refused":
        assert why is not None, f"{model_type} is refused ({words}): make it exact, or add it to NOT_EXACT with why"
        assert "\n" not in words and len(words) > 40, f"not a one-line refusal in words: {words!r}"
    else:
        pytest.fail(f"{model_type}: check_no_leak passed, yet the packed row is not exact ({words})")
