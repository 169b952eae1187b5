"""Merge-rule mining: count contiguous n-grams of a tokenized corpus and keep the frequent ones.

Counting is exact and vectorized. An n-gram is encoded as ``rank(its (n-1)-prefix) * V + last``,
where the rank is the prefix's index among the frequent (n-1)-grams, so keys fit in int64 for any
vocabulary and every level is one ``np.unique`` over the positions still alive. Apriori pruning
(an n-gram can only reach tau if its prefix does) keeps only positions whose prefix is frequent,
so memory shrinks level by level. Windows never cross document boundaries.

Filtering (paper App. A, "hierarchical overlap filtering"), applied in this order:

* ``intra`` — an n-gram is removed when a longer kept candidate *starts or ends* with it and has
  the same count: it never occurs outside that longer span, so it is redundant (closed-pattern
  reading of the paper's intra-set stage).
* ``inter`` — an n-gram is removed when it is contained anywhere (prefix, middle or suffix) in a
  longer kept candidate (paper Pseudocode 1, ``exists_longer_overlap``). This stage removes many
  frequent bigrams and lowers the token reduction on out-of-domain text.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from tqdm.auto import tqdm

from .rules import MergeRules

FILTER_STAGES = ("intra", "inter")


class MiningError(ValueError):
    """The corpus or settings cannot produce a rule set."""


def count_ngrams(
    ids: np.ndarray,
    doc_offsets: np.ndarray,
    n_values: Iterable[int] = (2, 3, 4),
    min_count: int = 5,
    progress: bool = True,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Exact counts of every n-gram occurring at least ``min_count`` times.

    Parameters
    ----------
    ids : int array [N], all documents concatenated.
    doc_offsets : int array [D + 1], document d spans ``ids[doc_offsets[d]:doc_offsets[d+1]]``.
    n_values : n-gram lengths to return (each >= 2).
    min_count : keep n-grams with count >= min_count.

    Returns
    -------
    ``{n: (ngrams int64 [k, n], counts int64 [k])}``, rows sorted by descending count, then ids.
    """
    n_values = sorted(set(int(n) for n in n_values))
    if not n_values or n_values[0] < 2:
        raise MiningError(f"n-gram lengths must be >= 2, got {n_values}")
    if min_count < 1:
        raise MiningError(f"min_count must be >= 1, got {min_count}")
    ids = np.asarray(ids)
    if ids.size == 0:
        raise MiningError("the corpus is empty: no tokens to count")
    if ids.min() < 0:
        raise MiningError("token ids must be non-negative")
    vocab = int(ids.max()) + 1
    doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
    # end of the document each position belongs to: window [p, p+n) is valid iff p + n <= doc_end[p]
    doc_end = np.repeat(doc_offsets[1:], np.diff(doc_offsets)).astype(np.int64)
    ids64 = ids.astype(np.int64, copy=False)

    # level 1: keep positions whose token is frequent; node = token id
    unigram = np.bincount(ids64, minlength=vocab)
    pos = np.flatnonzero(unigram[ids64] >= min_count)
    node = ids64[pos]
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    levels = range(2, n_values[-1] + 1)
    for n in tqdm(levels, desc="counting n-grams", disable=not progress, leave=False):
        keep = pos + n <= doc_end[pos]
        pos, node = pos[keep], node[keep]
        if pos.size == 0:
            for m in range(n, n_values[-1] + 1):
                if m in n_values:
                    out[m] = (np.zeros((0, m), dtype=np.int64), np.zeros(0, dtype=np.int64))
            break
        key = node * vocab + ids64[pos + n - 1]
        uniq, first, inverse, cnt = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
        frequent = cnt >= min_count
        if n in n_values:
            rep = pos[first[frequent]]
            grams = ids64[rep[:, None] + np.arange(n)[None, :]]
            out[n] = _sort_rules(grams, cnt[frequent].astype(np.int64))
        alive = frequent[inverse]
        rank = np.cumsum(frequent) - 1
        pos, node = pos[alive], rank[inverse[alive]]
    return out


def _sort_rules(grams: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort rows by descending count, ties by token ids (deterministic output)."""
    order = np.lexsort(tuple(grams[:, j] for j in reversed(range(grams.shape[1]))) + (-counts,))
    return grams[order], counts[order]


def _row_ids(*arrays: np.ndarray) -> list[np.ndarray]:
    """Map equal rows of same-width int arrays to equal integers (joint dense ids)."""
    stacked = np.concatenate(arrays, axis=0)
    if len(stacked) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in arrays]
    _, inv = np.unique(stacked, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    splits = np.cumsum([len(a) for a in arrays])[:-1]
    return np.split(inv, splits)


def filter_intra(ngrams: dict, counts: dict) -> tuple[dict, dict, dict[int, int]]:
    """Drop an n-gram that is the prefix or suffix of an (n+1)-gram candidate with the same count."""
    ngrams, counts, removed = dict(ngrams), dict(counts), {}
    for n in sorted(ngrams):
        if n + 1 not in ngrams or len(ngrams[n]) == 0:
            removed[n] = 0
            continue
        longer, lcount = ngrams[n + 1], counts[n + 1]
        drop = np.zeros(len(ngrams[n]), dtype=bool)
        for part in (longer[:, :n], longer[:, 1:]):
            # join on (tokens, count): equal count means g never occurs outside the longer span
            g_ids, p_ids = _row_ids(
                np.column_stack([ngrams[n], counts[n]]), np.column_stack([part, lcount])
            )
            drop |= np.isin(g_ids, p_ids)
        removed[n] = int(drop.sum())
        ngrams[n], counts[n] = ngrams[n][~drop], counts[n][~drop]
    return ngrams, counts, removed


def filter_inter(ngrams: dict, counts: dict) -> tuple[dict, dict, dict[int, int]]:
    """Drop every n-gram contained anywhere in a longer candidate (paper Pseudocode 1)."""
    ngrams, counts, removed = dict(ngrams), dict(counts), {}
    for n in sorted(ngrams, reverse=True):
        subs = [ngrams[m][:, j : j + n] for m in ngrams if m > n for j in range(m - n + 1)]
        subs = [s for s in subs if len(s)]
        if not subs or len(ngrams[n]) == 0:
            removed[n] = 0
            continue
        g_ids, *s_ids = _row_ids(ngrams[n], *subs)
        drop = np.isin(g_ids, np.concatenate(s_ids))
        removed[n] = int(drop.sum())
        ngrams[n], counts[n] = ngrams[n][~drop], counts[n][~drop]
    return ngrams, counts, removed


def mine_rules(
    ids: np.ndarray,
    doc_offsets: np.ndarray,
    tokenizer_fp: dict,
    min_count: int = 5,
    min_n: int = 2,
    max_n: int = 4,
    filters: Iterable[str] = FILTER_STAGES,
    corpus: str = "",
    progress: bool = True,
) -> MergeRules:
    """Count, threshold and filter n-grams of a tokenized corpus into a :class:`MergeRules`.

    Parameters
    ----------
    ids, doc_offsets : the corpus as in :func:`count_ngrams`.
    tokenizer_fp : fingerprint of the tokenizer that produced ``ids``.
    filters : subset of ``("intra", "inter")``, applied in that order; ``()`` keeps every candidate.
    """
    filters = list(filters)
    unknown = set(filters) - set(FILTER_STAGES)
    if unknown:
        raise MiningError(f"unknown filter stage(s) {sorted(unknown)}; choose from {FILTER_STAGES}")
    if not 2 <= min_n <= max_n:
        raise MiningError(f"need 2 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
    ids = np.asarray(ids)
    if ids.size and int(ids.max()) >= tokenizer_fp["vocab_size"]:
        raise MiningError("corpus token ids exceed the tokenizer's vocabulary: wrong tokenizer fingerprint?")
    counted = count_ngrams(ids, doc_offsets, range(min_n, max_n + 1), min_count, progress)
    ngrams = {n: g for n, (g, _) in counted.items()}
    counts = {n: c for n, (_, c) in counted.items()}
    if sum(len(g) for g in ngrams.values()) == 0:
        best = _max_count(ids, doc_offsets, min_n)
        raise MiningError(
            f"no n-gram of length {min_n}..{max_n} occurs >= {min_count} times in {ids.size} tokens "
            f"(most frequent {min_n}-gram occurs {best} times): lower --min-count or use a larger corpus"
        )
    removed = {}
    for stage in FILTER_STAGES:
        if stage in filters:
            fn = filter_intra if stage == "intra" else filter_inter
            ngrams, counts, removed[stage] = fn(ngrams, counts)
    return MergeRules(
        ngrams=ngrams,
        counts=counts,
        tokenizer=tokenizer_fp,
        min_count=min_count,
        n_range=(min_n, max_n),
        filters=[s for s in FILTER_STAGES if s in filters],
        corpus=corpus,
        tokens_scanned=int(ids.size),
        removed_by_filter=removed,
    )


def _max_count(ids: np.ndarray, doc_offsets: np.ndarray, n: int) -> int:
    counted = count_ngrams(ids, doc_offsets, [n], 1, progress=False)[n][1]
    return int(counted.max()) if len(counted) else 0

