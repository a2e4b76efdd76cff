"""Sparse attention and layers that read their own mask, on packed rows.

* DeepSeek sparse attention (deepseek_v32, glm_moe_dsa, and hy_v4 / axk2 / dots3_note_text that
  share its indexer) with ``index_topk=4``: each query's top-k runs over its own document's keys,
  so the packed row equals each document alone (logits and every gradient), with documents far
  longer than the top-k and at a large offset. Handing the indexer a plain causal mask instead
  (top-k over the whole row) fails the same comparison.
* Kolibri 1.1's indexer (a pool of key blocks, then its top-k, sinks and local keys, counted
  from each document's start) is exact given the documents' mask.
* Doge's dynamic mask (a learned bias plus a top-``keep_window_size`` selection) is exact too,
  with a sliding window as well; so is PhiMoE, whose window only its model's mask carries.
* check_no_leak passes them on its own row (no exact top-k ties in its documents).
* MiniMax-M3's block-sparse layers and DeepSeek-V4's compressed layers are refused by
  ``enable_varlen`` in one line naming the layer.
* Attention keywords packtune does not honour are refused by name.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CONFIG_MAPPING

import packtune.layers.masked as masked
from packed_reference import compare_packed_alone, tiny
from packtune.attention.hf import ROUTINE_KWARGS, packtune_attention_forward
from packtune.layers import VARLEN_LAYERS, UnsupportedLayerError
from packtune.modeling import LeakError, check_no_leak, enable_varlen

DSA = dict(num_key_value_heads=4, index_topk=4)
FAMILIES = {
    "deepseek_v32": DSA,
    "glm_moe_dsa": DSA,
    "hy_v4": DSA,
    "axk2": DSA,
    "dots3_note_text": dict(DSA, sliding_window=4),
    # Distinct tokens (vocab > tokens): Doge's first-layer bias depends on the token only, and
    # its top-k breaks ties between equal biases by slot in the row.
    "doge": dict(keep_window_size=6, vocab_size=512),
    # Kolibri 1.1: a sliding layer, an indexer layer (a pool of 4-key blocks, then the top-k of
    # it, sinks and local keys) and a layer reusing its keys, values and pool.
    "kolibri1_1": dict(
        num_hidden_layers=3, layer_types=["sliding_attention", "indexed_attention", "indexed_attention"],
        kv_source_layers=[0, 1, 1], index_layers=[1], mlp_only_layers=[0], mlp_only_intermediate_size=96,
        sliding_window=8, index_num_heads=2, index_topk=4, index_pool_size=16, index_compression=4,
        index_num_local_tokens=4, index_num_sink_tokens=2, num_local_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32,
    ),
}


def _needs(model_type):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type}")


@pytest.mark.parametrize("model_type", list(FAMILIES))
@pytest.mark.parametrize("lengths", [(17, 5, 30, 9), (150, 17, 5, 30)], ids=["short", "offset"])
def test_mask_reading_layers_packed_equal_documents_alone(model_type, lengths):
    _needs(model_type)
    logits, grads = compare_packed_alone(model_type, lengths, **FAMILIES[model_type])
    assert logits < 1e-5 and grads < 1e-4, (logits, grads)


def test_doge_sliding_window_stays_in_the_documents_mask():
    """Doge with a sliding window: its model builds a sliding-window mask for every layer, and the
    dynamic mask's top-k runs over it; the documents' mask packtune hands it keeps that window
    (the leak check's lengths, documents far longer than the window)."""
    _needs("doge")
    logits, grads = compare_packed_alone("doge", (71, 5, 67), **FAMILIES["doge"], sliding_window=8)
    assert logits < 1e-5 and grads < 1e-4, (logits, grads)


def test_phimoe_sliding_window_from_its_config(monkeypatch):
    """PhiMoE's window is only in the mask its model builds from the config: packtune hands it to
    the varlen attention. Without that form the long documents attend past the window. (Checked
    by check_no_leak, in eval mode: in training PhiMoE's router samples its experts at random.)"""
    _needs("phimoe")
    assert check_no_leak(enable_varlen(tiny("phimoe", sliding_window=8))) <= 5e-5
    monkeypatch.delitem(VARLEN_LAYERS, "PhimoeAttention")
    with pytest.raises(LeakError, match="PhimoeForCausalLM: on a packed row of documents of 71, 5, 67"):
        check_no_leak(enable_varlen(tiny("phimoe", sliding_window=8)))


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa", "doge"])
def test_the_leak_check_passes_them(model_type):
    """check_no_leak's own row (71, 5, 67 tokens): distinct ordinary tokens in each document, so no
    top-k over exactly tied scores (a repeated token, the zero padding embedding), whose winner
    is the slot in the row, makes the document alone ill-defined."""
    _needs(model_type)
    extra = dict(sliding_window=8) if model_type == "doge" else dict(index_topk=16)
    model = enable_varlen(tiny(model_type, **{**FAMILIES[model_type], **extra}))
    assert check_no_leak(model) <= 5e-5


@pytest.mark.parametrize("model_type", ["deepseek_v32", "doge", "kolibri1_1"])
def test_top_k_over_the_whole_row_is_caught(model_type, monkeypatch):
    """The comparison above can fail: a causal mask without the documents lets the indexer pick keys
    of earlier documents (and the attention must then see them)."""

    def row_causal(kwargs, rows, length, device, window=None):
        return torch.ones(length, length, dtype=torch.bool, device=device).tril().expand(rows, 1, length, length)

    monkeypatch.setattr(masked, "document_causal_mask", row_causal)
    monkeypatch.setattr("packtune.attention.hf._dense_documents", lambda *a: None)
    logits, _ = compare_packed_alone(model_type, (17, 5, 30, 9), **FAMILIES[model_type])
    assert logits > 1e-3


def test_minimax_m3_block_sparse_is_refused_in_one_line():
    _needs("minimax_m3_vl_text")
    model = tiny("minimax_m3_vl_text", layer_types=["minimax_m3_sparse", "full_attention"])
    with pytest.raises(UnsupportedLayerError) as err:
        enable_varlen(model)
    message = str(err.value)
    assert "\n" not in message and "MiniMaxM3VLAttention" in message and "block-sparse" in message
    assert model.config._attn_implementation == "eager"  # refused before anything switched


def test_minimax_m3_dense_layers_are_exact():
    _needs("minimax_m3_vl_text")
    logits, grads = compare_packed_alone("minimax_m3_vl_text", (17, 5, 30, 9),
                                         layer_types=["full_attention", "full_attention"])
    assert logits < 1e-5 and grads < 1e-4


def test_deepseek_v4_compressed_attention_is_refused_in_one_line():
    _needs("deepseek_v4")
    with pytest.raises(UnsupportedLayerError, match=r"DeepseekV4Attention .*compressed") as err:
        enable_varlen(tiny("deepseek_v4"))
    assert "\n" not in str(err.value)


class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.is_causal = True
        self.config = type("C", (), {})()


@pytest.mark.parametrize("keyword", ["position_bias", "block_indices", "some_new_feature"])
def test_unknown_attention_keywords_are_refused_by_name(keyword):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(NotImplementedError, match=keyword):
        packtune_attention_forward(_Attn(), q, q, q, None, **{keyword: torch.zeros(1)})


def test_routine_keywords_and_empty_values_pass():
    q = torch.randn(1, 2, 5, 8)
    routine = {k: None for k in ROUTINE_KWARGS}
    routine.update(use_cache=False, output_hidden_states=True, position_ids=torch.arange(5).unsqueeze(0))
    out, _ = packtune_attention_forward(_Attn(), q, q, q, None, indices=None, block_indices=None, **routine)
    assert out.shape == (1, 5, 2, 8)


def test_indices_without_a_mask_are_refused():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(NotImplementedError, match="indices"):
        packtune_attention_forward(_Attn(), q, q, q, None, indices=torch.zeros(1, 5, 2, dtype=torch.int32))


def test_a_layer_with_no_mask_and_no_is_causal_is_refused_by_name():
    class NoFlag(torch.nn.Module):
        config = type("C", (), {})()

    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(NotImplementedError, match="NoFlag"):
        packtune_attention_forward(NoFlag(), q, q, q, None)
