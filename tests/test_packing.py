"""The packing contract: exact small cases and invariants (hypothesis)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import naive_bfd
from packtune.packing import pack_plan, plan_array
from packtune.packing.collate import collate_padded, collate_varlen
from packtune.packing.packs import IGNORE_INDEX, TokenizedSamples, build_packs, get_pack, layout_packs


# --- pack_plan -----------------------------------------------------------------------------


def test_plan_exact_small_cases():
    assert pack_plan([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]
    assert pack_plan([5, 3, 4, 2, 6], 8, "sequential") == [[0, 1], [2, 3], [4]]
    assert pack_plan([], 8) == []
    assert pack_plan([8, 8], 8) == [[0], [1]]
    assert pack_plan([1] * 5, 2) == [[0, 1], [2, 3], [4]]


def test_plan_rejects_overlong_and_bad_strategy():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than max_length=8"):
        pack_plan([3, 9], 8)
    with pytest.raises(ValueError, match="unknown pack strategy 'first_fit'"):
        pack_plan([3], 8, "first_fit")
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        pack_plan([3, -1], 8)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40).flatmap(lambda m: st.tuples(st.just(m), st.lists(st.integers(0, m), max_size=60))))
def test_bfd_is_textbook_best_fit_decreasing(case):
    max_length, lengths = case
    assert pack_plan(lengths, max_length) == naive_bfd(lengths, max_length)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 64).flatmap(lambda m: st.tuples(st.just(m), st.lists(st.integers(0, m), max_size=80))),
    st.sampled_from(["bfd", "sequential"]),
)
@example((56, [24] + [33] * 6), "bfd")  # OPT = 7 packs, far above total / max_length
def test_plan_invariants(case, strategy):
    max_length, lengths = case
    plan = pack_plan(lengths, max_length, strategy)
    flat = [i for p in plan for i in p]
    assert sorted(flat) == list(range(len(lengths)))  # every sample exactly once
    assert all(sum(lengths[i] for i in p) <= max_length for p in plan)
    assert all(p == sorted(p) and p for p in plan)
    if strategy == "sequential":
        assert flat == list(range(len(lengths)))  # order preserved
    else:
        # Any-fit property of best-fit decreasing: a pack is opened only for a sample that fits
        # in no open pack, and loads only grow, so no two packs could be merged (hence fewer
        # than 2 * total / max_length + 1 packs). 11/9 OPT + 6/9 would need OPT itself:
        # total / max_length is only a lower bound of it (many samples just over half of
        # max_length need a pack each).
        loads = sorted(sum(lengths[i] for i in p) for p in plan)
        assert len(loads) < 2 or loads[0] + loads[1] > max_length


def test_bfd_is_near_optimal_on_long_tailed_lengths():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(5.5, 0.9, 20_000).astype(int) + 1, 2048)
    samples, offsets = plan_array(lengths, 2048)
    assert len(offsets) - 1 <= math.ceil(lengths.sum() / 2048) + 1
    assert sorted(samples.tolist()) == list(range(lengths.size))


def test_bfd_plans_a_million_lengths_quickly():
    lengths = np.minimum(np.random.default_rng(1).lognormal(5, 1, 1_000_000).astype(int) + 1, 2048)
    start = time.perf_counter()
    samples, offsets = plan_array(lengths, 2048)
    elapsed = time.perf_counter() - start
    # The budget is 5 s on this machine; twice that keeps a loaded CI box from flaking.
    assert elapsed < 10, elapsed
    per_pack = np.add.reduceat(lengths[samples], offsets[:-1])
    assert per_pack.max() <= 2048
    assert len(offsets) - 1 <= 1.0001 * math.ceil(lengths.sum() / 2048)  # 99.99% of the lower bound


# --- packs ---------------------------------------------------------------------------------


def test_pack_fields_worked_example():
    packs, report = build_packs([([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])], max_length=8)
    assert len(packs) == 1
    p = packs[0]
    assert p["input_ids"].tolist() == [5, 6, 7, 8, 9]
    assert p["labels"].tolist() == [-100, 6, 7, -100, 9]
    assert p["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert p["cu_seqlens"].tolist() == [0, 3, 5]
    assert p["cu_seqlens"].dtype == np.int32
    assert p["max_seqlen"] == 3
    assert report.as_dict()["utilization"] == pytest.approx(5 / 8)


def test_first_label_of_every_document_is_masked():
    # Labels fully trained, as in pre-training: the first label of the 2nd doc must still go.
    packs, _ = build_packs([([1, 2], [1, 2]), ([3, 4, 5], [3, 4, 5])], max_length=8, strategy="sequential")
    assert packs[0]["labels"].tolist() == [-100, 2, -100, 4, 5]


def test_overflow_policies_are_counted():
    samples = [([1] * 10, [-100] + [1] * 9), ([2] * 3, [-100, 2, 2]), ([3] * 12, [-100] * 11 + [3])]
    packs, report = build_packs(samples, 6, overflow="truncate")
    assert report.truncated == 1 and report.truncated_tokens == 4
    # Sample 2 keeps only untrained tokens once cut: dropped and counted, never silently.
    assert report.dropped == {"no_trainable_token": 1}
    assert report.samples == report.packed + sum(report.dropped.values())
    assert sorted(len(p["input_ids"]) for p in packs) == [3, 6]
    _, report = build_packs(samples, 6, overflow="drop")
    assert report.dropped == {"too_long": 2} and report.packed == 1
    with pytest.raises(ValueError, match="sample 0 has 10 tokens, more than max_length=6"):
        build_packs(samples, 6, overflow="error")


def test_empty_samples_are_counted():
    _, report = build_packs([([], []), ([1, 2], [-100, 2])], 4)
    assert report.dropped == {"empty": 1} and report.packed == 1


def test_concat_mode_cuts_exact_rows_and_splits_samples():
    samples = [([1, 2, 3], [1, 2, 3]), ([4, 5, 6, 7, 8], [4, 5, 6, 7, 8]), ([9], [9])]
    packs, report = build_packs(samples, 4, strategy="concat")
    assert [p["input_ids"].tolist() for p in packs] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert [p["cu_seqlens"].tolist() for p in packs] == [[0, 3, 4], [0, 4], [0, 1]]
    assert [p["position_ids"].tolist() for p in packs] == [[0, 1, 2, 0], [0, 1, 2, 3], [0]]
    assert report.documents == 4 and report.packed == 3 and report.tokens == 9


def test_order_decides_sequential_grouping():
    samples = TokenizedSamples.from_lists([([i] * 3, [-100, i, i]) for i in range(1, 5)])
    layout, _ = layout_packs(samples, 6, "sequential", order=np.array([3, 2, 1, 0]))
    first = get_pack(samples, layout, 0)
    assert first["input_ids"].tolist() == [4, 4, 4, 3, 3, 3]
    with pytest.raises(ValueError, match="permutation"):
        layout_packs(samples, 6, "sequential", order=np.array([0, 0, 1, 2]))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 20), st.integers(0, 20)), min_size=1, max_size=40),
    st.integers(4, 32),
    st.sampled_from(["bfd", "sequential", "concat", "none"]),
)
def test_pack_invariants(spec, max_length, strategy):
    """Every kept token appears once, positions restart per doc, no label crosses a boundary."""
    rng = np.random.default_rng(len(spec))
    samples = []
    for n, prompt in spec:
        ids = rng.integers(0, 1000, n).tolist()
        labels = [IGNORE_INDEX if t < min(prompt, n - 1) else x for t, x in enumerate(ids)]
        samples.append((ids, labels))
    packs, report = build_packs(samples, max_length, strategy)
    assert report.samples == report.packed + sum(report.dropped.values())
    assert report.packs == len(packs)
    assert report.tokens == sum(len(p["input_ids"]) for p in packs)
    for p in packs:
        cu = p["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == len(p["input_ids"]) <= max_length
        assert p["max_seqlen"] == int(np.diff(cu).max())
        for a, b in zip(cu[:-1], cu[1:]):
            assert p["position_ids"][a:b].tolist() == list(range(b - a))
            assert p["labels"][a] == IGNORE_INDEX
    if strategy != "concat":
        # Documents are samples (possibly cut to max_length), each trainable.
        seen = sorted(tuple(p["input_ids"][a:b]) for p in packs for a, b in zip(p["cu_seqlens"][:-1], p["cu_seqlens"][1:]))
        assert len(seen) == report.packed


# --- collate -------------------------------------------------------------------------------


def test_collate_varlen_flattens_packs_into_one_row():
    packs, _ = build_packs([([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8, 9], [-100, 7, 8, 9])], 5, "sequential")
    batch = collate_varlen(packs, pad_to_multiple_of=8, pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0, 0, 0, 0, 0]]
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 9, 16]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]]
    assert batch.labels[0, 9:].tolist() == [IGNORE_INDEX] * 7  # padding is its own untrained doc
    assert batch.max_seqlen == 7
    inputs = batch.model_inputs()
    assert "attention_mask" not in inputs
    assert inputs["cu_seq_lens_q"] is inputs["cu_seq_lens_k"]
    assert inputs["max_length_q"] == 7


def test_collate_padded_rows():
    packs, _ = build_packs([([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5])], 5, "none")
    batch = collate_padded(packs, pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.labels.tolist() == [[-100, 2, 3], [-100, 5, -100]]
    assert batch.cu_seqlens.tolist() == [0, 3, 6]
    assert batch.num_tokens == 5 and not batch.varlen
    with pytest.raises(ValueError, match="one document per pack"):
        collate_padded(build_packs([([1, 2], [-100, 2]), ([3, 4], [-100, 4])], 5)[0])
