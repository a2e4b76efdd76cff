"""Every text causal LM of the installed transformers trains packed EXACTLY, or is REFUSED IN WORDS.

Each model type (``every_model.text_types()``) is built tiny and random and run through
``every_model.outcome``: ``enable_varlen`` and ``check_no_leak``, then one packed row of documents
of 80, 17, 5, 30 and 9 tokens against each document alone under the model's default attention
(logits and the gradient of every parameter). Exact, or refused by ``enable_varlen`` /
``check_no_leak`` with a ``ValueError`` (``StatefulLayerError``), ``NotImplementedError`` or
``LeakError`` in one line. A ``TypeError`` or ``AttributeError`` from inside a model fails, and so
does a model that passes ``check_no_leak`` and is not exact: the leak check was fooled.

``NOT_EXACT`` is the one table of the types that are not exact, each with why; the refusal must be
the one the entry names last, in parentheses (``StatefulLayerError`` or ``UnsupportedLayerError``
from ``enable_varlen``, ``LeakError`` from ``check_no_leak``). A type in the table that turns
exact fails until its entry is removed, so the table only shrinks. Every type builds tiny
(``every_model._OVERRIDES`` where the generic sizes do not fit it).
"""

from __future__ import annotations

import pytest

from every_model import outcome, text_types

_STATE = ("carries state from token to token and packtune has no varlen form of it: refused by enable_varlen "
          "(StatefulLayerError)")
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
    **{t: f"short convolutions (one with input-dependent taps) in the key/value projections {_STATE}"
       for t in ("inkling2_text", "inkling2_loop_text")},
    # Attention packtune knows it cannot make exact.
    "deepseek_v4": "compressed sparse attention appends keys pooled over the whole row, which mix documents: "
                   "refused by enable_varlen (UnsupportedLayerError)",
    # Attention outside AttentionInterface: packtune cannot reach it, the leak check refuses the model.
    "bloom": f"ALiBi: {_ASIDE}",
    "mpt": f"ALiBi: {_ASIDE}",
    "xglm": f"sinusoidal positions from the whole row: {_ASIDE}",
    "openai-gpt": f"learned absolute positions from the whole row: {_ASIDE}",
    "cpmant": f"relative position buckets over the whole row: {_ASIDE}",
}

TYPES = text_types()


def test_the_tables_name_real_text_types():
    assert len(TYPES) > 100
    assert set(NOT_EXACT) <= set(TYPES), set(NOT_EXACT) - set(TYPES)
    assert all(len(why) > 20 and why.endswith("Error)") for why in NOT_EXACT.values())


@pytest.mark.parametrize("model_type", TYPES)
def test_exact_or_refused_in_words(model_type):
    why = NOT_EXACT.get(model_type)
    kind, words = outcome(model_type)
    if kind == "exact":
        assert why is None, f"{model_type} is exact now ({words}): remove it from NOT_EXACT"
    elif kind == "refused":
        assert why is not None, f"{model_type} is refused ({words}): make it exact, or add it to NOT_EXACT with why"
        assert "\n" not in words and len(words) > 40, f"not a one-line refusal in words: {words!r}"
        expected = why.rsplit("(", 1)[-1].rstrip(")")
        assert words.startswith(f"{expected}: "), f"{model_type}: refused, but not as NOT_EXACT says ({why}): {words}"
    else:
        pytest.fail(f"{model_type}: check_no_leak passed, yet the packed row is not exact ({words})")
