"""Merge-rule mining (paper App. A): exact n-gram counts, thresholding and overlap filtering."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from umim.rules.mining import (
    MiningError,
    count_ngrams,
    filter_inter,
    filter_intra,
    mine_rules,
)


def fp(vocab_size: int) -> dict:
    return {"name": "synthetic", "vocab_size": int(vocab_size), "vocab_sha256": "0" * 64}


def make_corpus(docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([t for d in docs for t in d], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return ids, offsets


def reference_counts(docs: list[list[int]], n: int) -> Counter:
    """Independent count: every window of length n inside one document."""
    c: Counter = Counter()
    for d in docs:
        for i in range(len(d) - n + 1):
            c[tuple(d[i : i + n])] += 1
    return c


def as_dict(grams: np.ndarray, counts: np.ndarray) -> dict[tuple, int]:
    out = {tuple(int(t) for t in g): int(c) for g, c in zip(grams, counts)}
    assert len(out) == len(grams), "duplicate n-gram rows"
    return out


def rules_dict(rules, n: int) -> dict[tuple, int]:
    return as_dict(rules.ngrams[n], rules.counts[n])


def random_docs(rng: np.random.Generator, num_docs: int, vocab: int, max_len: int) -> list[list[int]]:
    docs = []
    for _ in range(num_docs):
        length = int(rng.integers(0, max_len + 1))
        docs.append(rng.integers(0, vocab, size=length).tolist())
    # make sure edge cases are present: empty and very short documents
    docs += [[], [int(rng.integers(0, vocab))], rng.integers(0, vocab, size=2).tolist()]
    rng.shuffle(docs)
    return docs


# -- exact counts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("min_count", [1, 2, 3, 7])
def test_count_ngrams_matches_counter_per_document(seed, min_count):
    rng = np.random.default_rng(seed)
    docs = random_docs(rng, num_docs=12, vocab=5, max_len=80)
    ids, offsets = make_corpus(docs)
    out = count_ngrams(ids, offsets, (2, 3, 4), min_count=min_count, progress=False)
    assert sorted(out) == [2, 3, 4]
    for n in (2, 3, 4):
        expected = {g: c for g, c in reference_counts(docs, n).items() if c >= min_count}
        grams, counts = out[n]
        assert grams.dtype == np.int64 and counts.dtype == np.int64
        assert grams.shape == (len(expected), n)
        assert as_dict(grams, counts) == expected
        # documented order: descending count, ties by token ids
        keys = [(-int(c), tuple(int(t) for t in g)) for g, c in zip(grams, counts)]
        assert keys == sorted(keys)


def test_windows_never_cross_documents():
    # the pair (1, 2) only exists across the boundary of the two documents
    docs = [[0, 0, 1]] * 5 + [[2, 3, 3]] * 5
    ids, offsets = make_corpus(docs)
    out = count_ngrams(ids, offsets, (2, 3), min_count=1, progress=False)
    got2 = as_dict(*out[2])
    assert (1, 2) not in got2
    assert got2 == {(0, 0): 5, (0, 1): 5, (2, 3): 5, (3, 3): 5}
    assert as_dict(*out[3]) == {(0, 0, 1): 5, (2, 3, 3): 5}
    # as ONE document the boundary pairs exist
    one = count_ngrams(ids, np.array([0, len(ids)]), (2,), min_count=1, progress=False)
    assert as_dict(*one[2])[(1, 2)] == 1


def test_count_only_requested_lengths():
    rng = np.random.default_rng(5)
    docs = random_docs(rng, 6, 4, 50)
    ids, offsets = make_corpus(docs)
    out = count_ngrams(ids, offsets, [4], min_count=2, progress=False)
    assert list(out) == [4]
    expected = {g: c for g, c in reference_counts(docs, 4).items() if c >= 2}
    assert as_dict(*out[4]) == expected


def test_documents_shorter_than_n_give_empty_arrays():
    docs = [[1, 2], [1, 2], [1, 2]]
    ids, offsets = make_corpus(docs)
    out = count_ngrams(ids, offsets, (2, 3, 4), min_count=1, progress=False)
    assert as_dict(*out[2]) == {(1, 2): 3}
    for n in (3, 4):
        assert out[n][0].shape == (0, n)
        assert out[n][1].shape == (0,)


def test_large_vocab_counts_exactly():
    """Token ids up to 128,255 (Llama-3 vocabulary): keys must not collide or overflow."""
    rng = np.random.default_rng(11)
    V = 128_256
    fragments = [rng.integers(0, V, size=6).tolist() for _ in range(40)]
    fragments += [[V - 1, V - 2, 65_536, 65_535], [0, V - 1, 0, V - 1], [70_000, 65_536, 70_000, 65_536]]
    docs = []
    for _ in range(30):
        doc = []
        for _ in range(int(rng.integers(1, 8))):
            doc += fragments[int(rng.integers(len(fragments)))]
            doc += rng.integers(0, V, size=int(rng.integers(0, 3))).tolist()
        docs.append(doc)
    docs += [[V - 1, V - 2, 65_536, 65_535]] * 3
    ids, offsets = make_corpus(docs)
    assert ids.max() <= V - 1 and ids.max() > 65_536
    for min_count in (1, 2, 4):
        out = count_ngrams(ids, offsets, (2, 3, 4), min_count=min_count, progress=False)
        for n in (2, 3, 4):
            expected = {g: c for g, c in reference_counts(docs, n).items() if c >= min_count}
            assert as_dict(*out[n]) == expected, (min_count, n)
    rules = mine_rules(ids, offsets, fp(V), min_count=2, filters=(), progress=False)
    assert (V - 1, V - 2, 65_536, 65_535) in rules_dict(rules, 4)
    assert rules_dict(rules, 4) == {g: c for g, c in reference_counts(docs, 4).items() if c >= 2}


# -- planted n-grams ---------------------------------------------------------------------------------


def planted_corpus(seed: int = 0):
    """Noise over ids 100..999 with a 4-gram planted 20 times and a 3-gram planted 30 times."""
    rng = np.random.default_rng(seed)
    four, three = [1, 2, 3, 4], [5, 6, 7]
    docs = []
    plants = [four] * 20 + [three] * 30
    order = rng.permutation(len(plants))
    for i in range(0, len(order), 5):
        doc: list[int] = []
        for j in order[i : i + 5]:
            doc += rng.integers(100, 1000, size=int(rng.integers(3, 40))).tolist()
            doc += plants[j]
        doc += rng.integers(100, 1000, size=int(rng.integers(0, 10))).tolist()
        docs.append(doc)
    return docs, four, three


def test_planted_ngrams_found_with_right_counts():
    docs, four, three = planted_corpus()
    ids, offsets = make_corpus(docs)
    rules = mine_rules(ids, offsets, fp(1000), min_count=10, filters=(), progress=False)
    assert rules_dict(rules, 4) == {(1, 2, 3, 4): 20}
    assert rules_dict(rules, 3) == {(5, 6, 7): 30, (1, 2, 3): 20, (2, 3, 4): 20}
    assert rules_dict(rules, 2) == {(5, 6): 30, (6, 7): 30, (1, 2): 20, (2, 3): 20, (3, 4): 20}
    # descending counts inside each n
    assert [tuple(g) for g in rules.ngrams[2][:2].tolist()] == [(5, 6), (6, 7)]
    assert rules.tokens_scanned == ids.size
    assert rules.min_count == 10 and rules.n_range == (2, 4) and rules.filters == []
    assert rules.removed_by_filter == {}
    assert len(rules) == 1 + 3 + 5


def test_planted_ngrams_with_both_filters_keep_only_the_longest():
    docs, four, three = planted_corpus(seed=3)
    ids, offsets = make_corpus(docs)
    rules = mine_rules(ids, offsets, fp(1000), min_count=10, progress=False)
    assert rules.filters == ["intra", "inter"]
    assert rules_dict(rules, 4) == {(1, 2, 3, 4): 20}
    assert rules_dict(rules, 3) == {(5, 6, 7): 30}
    assert rules_dict(rules, 2) == {}
    # intra: (1,2,3),(2,3,4) (same count as the 4-gram), all five bigrams (same count as a trigram)
    assert rules.removed_by_filter["intra"] == {2: 5, 3: 2, 4: 0}
    assert rules.removed_by_filter["inter"] == {2: 0, 3: 0, 4: 0}
    # what each stage changed: inter alone removes everything intra removed, so intra changed nothing,
    # and intra alone already leaves the final set here, so inter changed nothing either
    assert rules.marginal_by_filter == {"intra": {2: 0, 3: 0, 4: 0}, "inter": {2: 0, 3: 0, 4: 0}}


# -- filters -----------------------------------------------------------------------------------------


def intra_corpus():
    """A B C five times, A B three more times alone: f(AB)=8, f(BC)=5, f(ABC)=5 (A,B,C = 1,2,3)."""
    return [[1, 2, 3]] * 5 + [[1, 2]] * 3


def test_no_filter_keeps_everything_above_tau():
    docs = intra_corpus()
    ids, offsets = make_corpus(docs)
    rules = mine_rules(ids, offsets, fp(4), min_count=2, min_n=2, max_n=3, filters=(), progress=False)
    assert rules_dict(rules, 2) == {(1, 2): 8, (2, 3): 5}
    assert rules_dict(rules, 3) == {(1, 2, 3): 5}
    # tau between counts
    rules = mine_rules(ids, offsets, fp(4), min_count=6, min_n=2, max_n=3, filters=(), progress=False)
    assert rules_dict(rules, 2) == {(1, 2): 8}
    assert rules_dict(rules, 3) == {}


def test_intra_removes_same_count_suffix_and_keeps_higher_count_prefix():
    ids, offsets = make_corpus(intra_corpus())
    rules = mine_rules(ids, offsets, fp(4), min_count=2, min_n=2, max_n=3, filters=("intra",), progress=False)
    assert rules.filters == ["intra"]
    assert rules_dict(rules, 2) == {(1, 2): 8}  # (2,3) has the same count as (1,2,3): removed
    assert rules_dict(rules, 3) == {(1, 2, 3): 5}
    assert rules.removed_by_filter == {"intra": {2: 1, 3: 0}}


def test_intra_removes_same_count_prefix():
    # (1,2) only ever occurs inside (1,2,3); (2,3) also occurs alone
    ids, offsets = make_corpus([[1, 2, 3]] * 4 + [[2, 3]] * 2)
    rules = mine_rules(ids, offsets, fp(4), min_count=2, min_n=2, max_n=3, filters=("intra",), progress=False)
    assert rules_dict(rules, 2) == {(2, 3): 6}
    assert rules_dict(rules, 3) == {(1, 2, 3): 4}
    assert rules.removed_by_filter["intra"] == {2: 1, 3: 0}


def test_inter_removes_contained_ngrams_even_with_higher_count():
    ids, offsets = make_corpus(intra_corpus())
    rules = mine_rules(ids, offsets, fp(4), min_count=2, min_n=2, max_n=3, filters=("inter",), progress=False)
    assert rules.filters == ["inter"]
    assert rules_dict(rules, 2) == {}
    assert rules_dict(rules, 3) == {(1, 2, 3): 5}
    assert rules.removed_by_filter == {"inter": {3: 0, 2: 2}}


def test_filters_run_intra_then_inter_whatever_the_order_given():
    ids, offsets = make_corpus(intra_corpus())
    rules = mine_rules(
        ids, offsets, fp(4), min_count=2, min_n=2, max_n=3, filters=("inter", "intra"), progress=False
    )
    assert rules.filters == ["intra", "inter"]
    assert rules.removed_by_filter == {"intra": {2: 1, 3: 0}, "inter": {3: 0, 2: 1}}
    assert rules_dict(rules, 2) == {}
    assert rules_dict(rules, 3) == {(1, 2, 3): 5}


def _arr(rows, n):
    return np.array(rows, dtype=np.int64).reshape(-1, n)


def test_filter_inter_prefix_middle_suffix():
    ngrams = {
        2: _arr([[2, 3], [1, 2], [3, 4], [7, 8], [4, 1]], 2),
        3: _arr([[1, 2, 3], [2, 3, 4], [9, 9, 9], [3, 4, 1]], 3),
        4: _arr([[1, 2, 3, 4]], 4),
    }
    counts = {2: np.array([50, 40, 30, 20, 10]), 3: np.array([9, 8, 7, 6]), 4: np.array([5])}
    g, c, removed = filter_inter(ngrams, counts)
    # (2,3) is in the middle of (1,2,3,4), (1,2) its prefix, (3,4) its suffix, (4,1) is in kept (3,4,1)
    assert as_dict(g[2], c[2]) == {(7, 8): 20}
    # (1,2,3) prefix and (2,3,4) suffix of the 4-gram; (3,4,1) and (9,9,9) are in no 4-gram
    assert as_dict(g[3], c[3]) == {(9, 9, 9): 7, (3, 4, 1): 6}
    assert as_dict(g[4], c[4]) == {(1, 2, 3, 4): 5}
    assert removed == {4: 0, 3: 2, 2: 4}
    # inputs are not modified
    assert len(ngrams[2]) == 5 and len(ngrams[3]) == 4


def test_filter_intra_direct():
    ngrams = {
        2: _arr([[1, 2], [2, 3], [5, 6], [6, 7], [8, 9]], 2),
        3: _arr([[1, 2, 3], [5, 6, 7], [0, 8, 9]], 3),
        4: _arr([[0, 1, 2, 3]], 4),
    }
    counts = {
        2: np.array([10, 7, 4, 6, 3]),
        3: np.array([7, 4, 2]),
        4: np.array([7]),
    }
    g, c, removed = filter_intra(ngrams, counts)
    # (2,3): suffix of (1,2,3) with count 7 -> removed; (1,2): count 10 > 7 -> kept
    # (5,6): prefix of (5,6,7) with count 4 -> removed; (6,7): 6 > 4 -> kept
    # (8,9): suffix of (0,8,9) but 3 != 2 -> kept
    assert as_dict(g[2], c[2]) == {(1, 2): 10, (6, 7): 6, (8, 9): 3}
    # (1,2,3): suffix of (0,1,2,3) with the same count -> removed
    assert as_dict(g[3], c[3]) == {(5, 6, 7): 4, (0, 8, 9): 2}
    assert as_dict(g[4], c[4]) == {(0, 1, 2, 3): 7}
    assert removed == {2: 2, 3: 1, 4: 0}


def test_filter_intra_same_count_but_not_prefix_or_suffix_is_kept():
    # the count matches but (2,9) is neither prefix nor suffix of (1,2,3)
    ngrams = {2: _arr([[2, 9], [3, 2]], 2), 3: _arr([[1, 2, 3]], 3)}
    counts = {2: np.array([5, 5]), 3: np.array([5])}
    g, c, removed = filter_intra(ngrams, counts)
    assert as_dict(g[2], c[2]) == {(2, 9): 5, (3, 2): 5}
    assert removed == {2: 0, 3: 0}


def test_mined_rules_filters_against_reference_on_random_corpus():
    """Filtered output equals an independent implementation of both documented rules."""
    rng = np.random.default_rng(7)
    docs = random_docs(rng, 20, 4, 60)
    ids, offsets = make_corpus(docs)
    tau = 4
    cand = {n: {g: c for g, c in reference_counts(docs, n).items() if c >= tau} for n in (2, 3, 4)}
    # intra: drop n-grams that are prefix/suffix of an (n+1)-candidate with the same count
    intra = {}
    for n in (2, 3, 4):
        longer = cand.get(n + 1, {})
        intra[n] = {
            g: c
            for g, c in cand[n].items()
            if not any(c == lc and (lg[:n] == g or lg[1:] == g) for lg, lc in longer.items())
        }
    # inter: drop n-grams contained anywhere in a kept longer n-gram (longest first)
    inter = dict(intra)
    for n in (3, 2):
        kept_longer = [lg for m in (4, 3) if m > n for lg in inter[m]]
        inter[n] = {
            g: c
            for g, c in inter[n].items()
            if not any(lg[j : j + n] == g for lg in kept_longer for j in range(len(lg) - n + 1))
        }
    r_none = mine_rules(ids, offsets, fp(4), min_count=tau, filters=(), progress=False)
    r_intra = mine_rules(ids, offsets, fp(4), min_count=tau, filters=("intra",), progress=False)
    r_both = mine_rules(ids, offsets, fp(4), min_count=tau, progress=False)
    for n in (2, 3, 4):
        assert rules_dict(r_none, n) == cand[n]
        assert rules_dict(r_intra, n) == intra[n]
        assert rules_dict(r_both, n) == inter[n]
        assert r_intra.removed_by_filter["intra"][n] == len(cand[n]) - len(intra[n])
        assert r_both.removed_by_filter["inter"][n] == len(intra[n]) - len(inter[n])
    assert sum(len(v) for v in intra.values()) > sum(len(v) for v in inter.values()) > 0


# -- bad input ---------------------------------------------------------------------------------------


def test_empty_corpus_raises():
    with pytest.raises(MiningError, match="empty"):
        mine_rules(np.array([], dtype=np.int64), np.array([0]), fp(10), progress=False)
    with pytest.raises(MiningError, match="empty"):
        count_ngrams(np.array([], dtype=np.int64), np.array([0]), progress=False)


def test_tau_above_every_count_raises_clear_message():
    docs = [[1, 2, 3, 1, 2]] * 3  # (1,2) occurs 6 times, the most frequent bigram
    ids, offsets = make_corpus(docs)
    with pytest.raises(MiningError) as info:
        mine_rules(ids, offsets, fp(4), min_count=7, progress=False)
    msg = str(info.value)
    assert ">= 7" in msg
    assert "6 times" in msg
    assert "min-count" in msg
    # one below the maximum works
    rules = mine_rules(ids, offsets, fp(4), min_count=6, filters=(), progress=False)
    assert rules_dict(rules, 2) == {(1, 2): 6}


@pytest.mark.parametrize("min_n,max_n", [(1, 4), (0, 2), (3, 2), (5, 4), (-1, 3)])
def test_invalid_n_range_raises(min_n, max_n):
    ids, offsets = make_corpus([[1, 2, 3, 4]] * 10)
    with pytest.raises(MiningError, match="min_n"):
        mine_rules(ids, offsets, fp(5), min_count=2, min_n=min_n, max_n=max_n, progress=False)


@pytest.mark.parametrize("n_values", [[1, 2], [], [0]])
def test_count_ngrams_invalid_lengths_raise(n_values):
    ids, offsets = make_corpus([[1, 2, 3, 4]] * 10)
    with pytest.raises(MiningError):
        count_ngrams(ids, offsets, n_values, min_count=2, progress=False)


def test_unknown_filter_raises():
    ids, offsets = make_corpus([[1, 2, 3, 4]] * 10)
    with pytest.raises(MiningError, match="bogus"):
        mine_rules(ids, offsets, fp(5), min_count=2, filters=("intra", "bogus"), progress=False)


def test_min_count_below_one_raises():
    ids, offsets = make_corpus([[1, 2, 3, 4]] * 10)
    with pytest.raises(MiningError, match="min_count"):
        mine_rules(ids, offsets, fp(5), min_count=0, progress=False)


def test_ids_outside_tokenizer_vocab_raise():
    ids, offsets = make_corpus([[1, 2, 3, 4]] * 10)
    with pytest.raises(MiningError, match="vocabulary"):
        mine_rules(ids, offsets, fp(4), min_count=2, progress=False)


def test_negative_ids_raise():
    with pytest.raises(MiningError, match="non-negative"):
        count_ngrams(np.array([1, -1, 2]), np.array([0, 3]), progress=False)


def test_umim_mine_max_tokens_limits_frequency_mining(tmp_path, tiny_tokenizer):
    """`umim mine --max-tokens N` mines only the whole documents within the first N tokens."""
    import json

    from umim.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join("the quick brown fox jumps over the lazy dog" for _ in range(60)))
    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok)
    for limit, out in ((0, "all"), (40, "head")):
        assert main(["mine", "--tokenizer", str(tok), "--data", str(corpus), "--min-count", "2",
                     "--max-tokens", str(limit), "--out", str(tmp_path / out)]) == 0
    scanned = {o: json.loads((tmp_path / o / "rules.json").read_text())["tokens_scanned"] for o in ("all", "head")}
    assert scanned["head"] <= 40 < scanned["all"]
