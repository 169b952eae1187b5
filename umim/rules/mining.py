"""Merge-rule mining: count contiguous n-grams of a tokenized corpus and keep the frequent ones.

Counting is exact and vectorized. An n-gram is encoded as ``rank(its (n-1)-prefix) * V + last``,
where the rank is the prefix's index among the frequent (n-1)-grams, so keys fit in int64 for any
vocabulary and every level is one stable sort of the positions still alive (kept grouped by prefix
between levels, so the sort sees long sorted runs). Apriori pruning (an n-gram can only reach tau
if its prefix does) keeps only positions whose prefix is frequent, so memory shrinks level by
level. Windows never cross document boundaries.

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

from umim.errors import UserError
from umim.rules.store import MAX_N, MergeRules

FILTER_STAGES = ("intra", "inter")


class MiningError(UserError):
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
    off = np.asarray(doc_offsets, dtype=np.int64)
    if off.ndim != 1 or len(off) < 2 or off[0] != 0 or off[-1] != ids.size or (np.diff(off) < 0).any():
        raise MiningError(f"doc_offsets must rise from 0 to len(ids) = {ids.size}")
    max_n, vocab = n_values[-1], int(ids.max()) + 1

    # room[p]: tokens left in p's document, capped at max_n (1 byte per token)
    room = np.full(ids.size, max_n, dtype=np.uint8)
    for k in range(max_n - 1, 0, -1):
        last = off[1:] - k
        ok = last >= off[:-1]
        room[last[ok]] = k
    unigram = np.bincount(ids, minlength=vocab)
    pos = np.flatnonzero(unigram[ids] >= min_count).astype(np.int32 if ids.size < 2**31 else np.int64)
    tok = ids[pos]
    order = np.argsort(tok.astype(np.uint16) if vocab <= 65536 else tok, kind="stable")
    # positions stay grouped by their prefix from level to level, so each level's keys arrive
    # nearly sorted and the stable sort (timsort/radix) is cheap
    pos, node = pos[order], tok[order].astype(np.int64)
    del order, tok
    prev = np.arange(vocab, dtype=np.int64)[:, None]  # n-gram of each rank at the previous level
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for n in tqdm(range(2, max_n + 1), desc="counting n-grams", disable=not progress, leave=False):
        keep = room[pos] >= n
        pos, node = pos[keep], node[keep]
        if pos.size == 0:
            for m in range(n, max_n + 1):
                if m in n_values:
                    out[m] = (np.zeros((0, m), dtype=np.int64), np.zeros(0, dtype=np.int64))
            break
        key = node * vocab + ids[pos + (n - 1)]
        order = np.argsort(key, kind="stable")
        key, pos = key[order], pos[order]
        del order, node
        new = np.empty(key.size, dtype=bool)
        new[0] = True
        np.not_equal(key[1:], key[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        cnt = np.diff(np.append(starts, key.size))
        frequent = cnt >= min_count
        uniq = key[starts[frequent]]
        del key, new, starts
        grams = np.column_stack([prev[uniq // vocab], uniq % vocab])  # lexicographic order
        fcount = cnt[frequent].astype(np.int64)
        if n in n_values:
            by_count = np.argsort(-fcount, kind="stable")  # ties keep lexicographic order
            out[n] = (grams[by_count], fcount[by_count])
        pos = pos[np.repeat(frequent, cnt)]
        node = np.repeat(np.arange(len(fcount), dtype=np.int64), fcount)  # noqa: F841 (read by the next level)
        prev = grams
    return out


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
    if not 2 <= min_n <= max_n <= MAX_N:
        raise MiningError(f"need 2 <= min_n <= max_n <= {MAX_N} (the spans a merger is trained for), "
                          f"got min_n={min_n}, max_n={max_n}")
    if min_count < 1:
        raise MiningError(f"min_count must be at least 1, got {min_count}")
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

