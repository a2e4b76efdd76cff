"""Llama 4 on packed rows: chunked attention and NoPE temperature tuning counted per document.

A tiny llama4_text with a chunk of 8 tokens, one RoPE (chunked) layer and one NoPE layer with
temperature tuning that changes within a few tokens (``floor_scale=4``): documents longer than a
chunk, and one long first document that puts the others at a large offset. Logits and every
gradient equal each document alone through transformers' own eager forward; switching either
part of the varlen form off makes the same comparison fail.
"""

from __future__ import annotations

import pytest

import packtune.layers.llama4 as llama4
from packed_reference import compare_packed_alone

CONFIG = dict(
    attention_chunk_size=8,
    no_rope_layers=[1, 0],  # layer 0: RoPE + chunked; layer 1: NoPE, full attention
    attn_temperature_tuning=True,
    floor_scale=4,
    attn_scale=0.5,
    intermediate_size_mlp=96,
    num_local_experts=2,
)


@pytest.mark.parametrize("lengths", [(17, 5, 30, 9), (203, 17, 5, 30)], ids=["short", "offset"])
def test_llama4_packed_equals_documents_alone(lengths):
    logits, grads = compare_packed_alone("llama4_text", lengths, **CONFIG)
    assert logits < 1e-5 and grads < 1e-4, (logits, grads)


def test_llama4_without_cu_seq_lens_uses_position_ids():
    logits, grads = compare_packed_alone("llama4_text", (17, 5, 30, 9), with_cu=False, **CONFIG)
    assert logits < 1e-5 and grads < 1e-4, (logits, grads)


def test_chunks_over_the_row_are_caught(monkeypatch):
    monkeypatch.setattr(llama4, "chunked_boundaries", lambda cu, chunk: cu)
    logits, _ = compare_packed_alone("llama4_text", (17, 5, 30, 9), **CONFIG)
    assert logits > 1e-2


def test_temperature_over_the_row_is_caught(monkeypatch):
    original = llama4._temperature
    monkeypatch.setattr(llama4, "_temperature", lambda module, pos: original(module, pos * 0))
    _, grads = compare_packed_alone("llama4_text", (17, 5, 30, 9), **CONFIG)
    assert grads > 1e-2


def test_chunked_host_counts_from_each_document_start():
    assert llama4.chunked_host((0, 5, 7, 20), 4) == (0, 4, 5, 7, 11, 15, 19, 20)
    assert llama4.chunked_host((0, 3), 8) == (0, 3)
