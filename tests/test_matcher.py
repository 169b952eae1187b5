"""Span matcher: property tests of the left-to-right longest-match segmentation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from umim.merging.matcher import SpanMatcher

V = 6
SETTINGS = settings(
    max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def rules_strategy(alphabet=st.integers(0, V - 1)):
    """{n: set of n-tuples} for n in 2..4 (possibly empty sets)."""
    return st.fixed_dictionaries(
        {n: st.sets(st.tuples(*[alphabet] * n), max_size=12) for n in (2, 3, 4)}
    )


def to_arrays(rules: dict[int, set]) -> dict[int, np.ndarray]:
    return {n: np.array(sorted(g), dtype=np.int64).reshape(-1, n) for n, g in rules.items()}


def reference_segment(ids: list[int], rules: dict[int, set]) -> list[tuple[int, int]]:
    """Brute force: at each position take the longest rule starting there (else one token)."""
    out, i = [], 0
    while i < len(ids):
        step = 1
        for n in (4, 3, 2):
            if i + n <= len(ids) and tuple(ids[i : i + n]) in rules.get(n, ()):
                step = n
                break
        out.append((i, step))
        i += step
    return out


def reference_match_lengths(ids: list[int], rules: dict[int, set]) -> list[int]:
    out = []
    for i in range(len(ids)):
        best = 1
        for n in (2, 3, 4):
            if i + n <= len(ids) and tuple(ids[i : i + n]) in rules.get(n, ()):
                best = n
        out.append(best)
    return out


def check_segmentation(ids: list[int], segs: list[tuple[int, int]], rules: dict[int, set]) -> None:
    # cover exactly, in order
    pos = 0
    for start, length in segs:
        assert start == pos
        assert 1 <= length <= 4
        pos += length
    assert pos == len(ids)
    # concatenation reproduces ids
    assert [t for s, n in segs for t in ids[s : s + n]] == ids
    for start, length in segs:
        if length > 1:  # every multi-token segment is a rule
            assert tuple(ids[start : start + length]) in rules[length]
        for longer in range(length + 1, 5):  # longest match
            assert tuple(ids[start : start + longer]) not in rules[longer] or start + longer > len(ids)


sequences = st.lists(st.integers(0, V - 1), min_size=0, max_size=60)


@st.composite
def rules_and_ids(draw, alphabet=st.integers(0, V - 1)):
    """A sequence and a rule set made of random n-grams plus n-grams taken from the sequence itself
    (so that matches, overlapping candidates and nested rules are common)."""
    ids = draw(st.lists(alphabet, min_size=0, max_size=60))
    rules = draw(rules_strategy(alphabet))
    for n in (2, 3, 4):
        windows = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
        if windows:
            picks = draw(st.lists(st.integers(0, len(windows) - 1), max_size=8))
            rules[n] = rules[n] | {windows[i] for i in picks}
    return rules, ids


@SETTINGS
@given(case=rules_and_ids())
def test_segment_properties_and_brute_force(case):
    """Cover exactly and in order, concatenation = ids, multi-token segments are rules, longest
    match, lengths in 1..4, and agreement with a brute-force left-to-right longest match."""
    rules, ids = case
    matcher = SpanMatcher(to_arrays(rules), V)
    segs = matcher.segment(ids)
    assert all(isinstance(s, int) and isinstance(n, int) for s, n in segs)
    check_segmentation(ids, segs, rules)
    assert segs == reference_segment(ids, rules)
    np.testing.assert_array_equal(
        matcher.match_lengths(np.array(ids, dtype=np.int64)), np.array(reference_match_lengths(ids, rules))
    )


@st.composite
def padded_batch(draw):
    rows = draw(st.lists(sequences, min_size=1, max_size=5))
    L = max(len(r) for r in rows) + draw(st.integers(0, 5))
    ids = np.zeros((len(rows), L), dtype=np.int64)
    for b, r in enumerate(rows):
        # garbage after the row (real ids): matches must still stop at the row end
        ids[b, len(r) :] = draw(st.lists(st.integers(0, V - 1), min_size=L - len(r), max_size=L - len(r)))
        ids[b, : len(r)] = r
    rules = draw(rules_strategy())
    for n in (2, 3, 4):
        # windows of the padded rows, including ones that cross a row's end into its padding
        windows = [tuple(row[i : i + n]) for row in ids.tolist() for i in range(L - n + 1)]
        if windows:
            picks = draw(st.lists(st.integers(0, len(windows) - 1), max_size=10))
            rules[n] = rules[n] | {windows[i] for i in picks}
    return rules, rows, ids, np.array([len(r) for r in rows], dtype=np.int64)


@SETTINGS
@given(batch=padded_batch())
def test_segment_batch_matches_per_row_segment(batch):
    rules, rows, ids, lengths = batch
    matcher = SpanMatcher(to_arrays(rules), V)
    starts, lens = matcher.segment_batch(ids, lengths)
    assert starts.dtype == np.int64 and lens.dtype == np.int64
    assert starts.shape == lens.shape and starts.shape[0] == len(rows)
    assert starts.shape[1] == max(len(reference_segment(r, rules)) for r in rows)
    for b, row in enumerate(rows):
        k = int((lens[b] > 0).sum())
        got = list(zip(starts[b, :k].tolist(), lens[b, :k].tolist()))
        assert got == matcher.segment(row) == reference_segment(row, rules)
        # padding entries are (0, 0) and real ones never cross the row length
        assert (lens[b, k:] == 0).all() and (starts[b, k:] == 0).all()
        assert (starts[b, :k] + lens[b, :k] <= lengths[b]).all()
        assert int(lens[b].sum()) == lengths[b]
    # match_lengths on the padded batch never reaches past a row's length
    ml = matcher.match_lengths(ids, lengths)
    for b, row in enumerate(rows):
        np.testing.assert_array_equal(ml[b, : len(row)], reference_match_lengths(row, rules))


@settings(max_examples=300, deadline=None, database=None)
@given(case=rules_and_ids(st.sampled_from([0, 1, 65_535, 65_536, 100_000, 128_255])))
def test_large_vocab_equals_brute_force(case):
    rules, ids = case
    matcher = SpanMatcher(to_arrays(rules), 128_256)
    segs = matcher.segment(ids)
    assert segs == reference_segment(ids, rules)
    check_segmentation(ids, segs, rules)


def test_large_vocab_no_key_collisions():
    # with a 16-bit packing 1 * 65536 + 70000 == 2 * 65536 + 4464: must not match
    V_big = 128_256
    m = SpanMatcher({2: np.array([[1, 70_000]]), 3: np.array([[128_255, 128_254, 65_536]])}, V_big)
    assert m.segment([2, 4464, 1, 70_000]) == [(0, 1), (1, 1), (2, 2)]
    assert m.segment([128_255, 128_254, 65_536, 1, 70_000]) == [(0, 3), (3, 2)]
    assert m.segment([128_255, 128_254, 65_537]) == [(0, 1), (1, 1), (2, 1)]


def test_empty_rule_set_gives_single_tokens():
    for rules in ({}, {2: np.zeros((0, 2), dtype=np.int64)}, {n: np.zeros((0, n)) for n in (2, 3, 4)}):
        m = SpanMatcher(rules, V)
        assert m.segment([0, 1, 2, 3, 3, 3]) == [(i, 1) for i in range(6)]
        assert m.segment([]) == []
        starts, lens = m.segment_batch(np.array([[1, 2, 3], [4, 5, 0]]), np.array([3, 2]))
        assert starts.tolist() == [[0, 1, 2], [0, 1, 0]]
        assert lens.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_fixed_examples():
    m = SpanMatcher({2: np.array([[1, 2], [2, 3]]), 3: np.array([[1, 2, 3]]), 4: np.array([[2, 3, 4, 5]])}, V)
    # longest match at 0 is (1,2,3), not (1,2); then (4,5) is no rule
    assert m.segment([1, 2, 3, 4, 5]) == [(0, 3), (3, 1), (4, 1)]
    # greedy left-to-right: (1,2) wins over the 4-gram (2,3,4,5) that starts inside it
    assert m.segment([1, 2, 4, 2, 3, 4, 5]) == [(0, 2), (2, 1), (3, 4)]
    # a prefix of a rule is not a rule: (2,3,4) is only a trie node
    assert m.segment([2, 3, 4]) == [(0, 2), (2, 1)]
    np.testing.assert_array_equal(m.match_lengths(np.array([2, 3, 4, 5, 1, 2])), [4, 1, 1, 1, 2, 1])


def test_empty_batch_rows():
    m = SpanMatcher({2: np.array([[1, 2]])}, V)
    starts, lens = m.segment_batch(np.zeros((2, 0), dtype=np.int64))
    assert starts.shape == (2, 0) and lens.shape == (2, 0)
    starts, lens = m.segment_batch(np.array([[1, 2], [1, 2]]), np.array([0, 2]))
    assert lens.tolist() == [[0], [2]]


def test_rule_ids_outside_vocab_rejected():
    with pytest.raises(ValueError, match="outside"):
        SpanMatcher({2: np.array([[1, V]])}, V)
    with pytest.raises(ValueError, match="outside"):
        SpanMatcher({2: np.array([[-1, 0]])}, V)
