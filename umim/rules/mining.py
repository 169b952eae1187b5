"""Merge-rule mining: count contiguous n-grams of a tokenized corpus and keep the frequent ones.

Counting is exact, hash-based and level-wise over one or more *shards* (a corpus in memory is one
shard; a corpus larger than memory is a list of shards, read one at a time):

* pass 1 counts unigrams; tokens below tau are relabelled 0, the others 1..U in id order;
* the ``max_n``-token window at every position, cut before its first token below tau or the end of
  its document, is packed as ``max_n`` base-(U+1) digits (int64, or Int128 when (U+1)^max_n does not
  fit: large vocabularies) and counted with one hash group-by per shard (the window table);
* level n sums the window table over its leading n digits, keeping only windows whose (n-1)-prefix is
  frequent in the *whole* corpus (Apriori: every prefix of a frequent n-gram is frequent), and adds
  the result into the running table, so memory is bounded by one shard plus the candidate table,
  never by the corpus. Totals equal those of counting the concatenated shards.
  One shard's window table is built once and serves every level; several shards are re-read per level.

The group-bys are polars' (multithreaded). One window table per shard replaced a bigram pass plus a
window table cut at rare bigrams (0.55 s on the 5M-token sample of ``benchmarks/bench_mining.py``),
which had replaced a sort-based counter (0.93 s); see docs/results.md for the figures.

Filtering (paper App. A, "hierarchical overlap filtering"), applied in this order:

* ``intra`` — an n-gram is removed when a longer kept candidate *starts or ends* with it and has
  the same count: it never occurs outside that longer span, so it is redundant (closed-pattern
  reading of the paper's intra-set stage).
* ``inter`` — an n-gram is removed when it is contained anywhere (prefix, middle or suffix) in a
  longer kept candidate (paper Pseudocode 1, ``exists_longer_overlap``). This stage removes many
  frequent bigrams and lowers the token reduction on out-of-domain text.

``removed_by_filter[stage][n]`` counts what a stage removed from what the stages before it left;
``marginal_by_filter[stage][n]`` what it changed: the n-grams the final set would hold if that stage
were left out, but does not hold. A stage whose removals a later stage makes anyway reports 0 there (inter removes
every n-gram contained in a longer kept one, which covers intra's prefix/suffix rule).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from umim.errors import UserError
from umim.rules.store import MAX_N, MergeRules

FILTER_STAGES = ("intra", "inter")

Shard = Callable[[], tuple[np.ndarray, np.ndarray]]
"""Loads one shard: ``(ids int [N_s], doc_offsets int [D_s + 1])``; called once per counting pass."""


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
    ids, off = _check_shard(ids, doc_offsets)
    return count_ngrams_sharded([lambda: (ids, off)], n_values, min_count, progress)


def count_ngrams_sharded(
    shards: Sequence[Shard],
    n_values: Iterable[int] = (2, 3, 4),
    min_count: int = 5,
    progress: bool = True,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """:func:`count_ngrams` of the concatenation of ``shards``, reading one shard at a time.

    Each shard is loaded once per pass (``max(n_values)`` passes: unigrams, then one per level; a single
    shard twice: unigrams, then its window table, which serves every level) and dropped before the
    next is loaded; documents never span two shards. Returns the same layout as
    :func:`count_ngrams`.
    """
    return _count(shards, n_values, min_count, progress)[0]


def _count(shards: Sequence[Shard], n_values: Iterable[int], min_count: int, progress: bool,
           vocab_size: int | None = None) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], int]:
    """:func:`count_ngrams_sharded` and the number of tokens read; ids >= ``vocab_size`` are refused."""
    n_values = sorted(set(int(n) for n in n_values))
    if not n_values or n_values[0] < 2:
        raise MiningError(f"n-gram lengths must be >= 2, got {n_values}")
    if min_count < 1:
        raise MiningError(f"min_count must be >= 1, got {min_count}")
    max_n = n_values[-1]
    unigram, tokens = np.zeros(0, dtype=np.int64), 0
    for load in shards:
        ids, _ = _check_shard(*load())
        counts = np.bincount(ids.astype(np.int64, copy=False))
        unigram = np.pad(unigram, (0, max(0, len(counts) - len(unigram))))
        unigram[: len(counts)] += counts
        tokens += ids.size
        del ids, counts
    if tokens == 0:
        raise MiningError("the corpus is empty: no tokens to count")
    if vocab_size is not None and len(unigram) > vocab_size:
        raise MiningError(f"corpus token id {len(unigram) - 1} exceeds the tokenizer's vocabulary ({vocab_size}): "
                          "wrong tokenizer fingerprint?")
    frequent = np.flatnonzero(unigram >= min_count)  # relabelled token t + 1 <-> id frequent[t]
    radix = len(frequent) + 1
    relabel = np.zeros(len(unigram), dtype=np.int32 if radix < 2**31 else np.int64)
    relabel[frequent] = np.arange(1, radix)
    if radix**max_n >= 2**127 or radix ** (max_n - max_n // 2) >= 2**63:
        raise MiningError(f"{max_n}-grams over {radix - 1} distinct frequent tokens do not fit 128-bit keys: "
                          "lower the n-gram length")
    wide = pl.Int64 if radix**max_n < 2**63 else pl.Int128
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    kept = {}  # a single shard's window table is built once and serves every level

    def windows(load: Shard) -> pl.DataFrame:
        if "windows" in kept:
            return kept["windows"]
        ids, off = _check_shard(*load())
        table = _window_table(*_relabelled(ids, relabel, off, max_n), max_n, radix, wide)
        if len(shards) == 1:
            kept["windows"] = table
        return table

    prefixes = None  # packed frequent (n-1)-grams
    for n in tqdm(range(2, max_n + 1), desc="counting n-grams", disable=not progress, leave=False):
        table = None
        for load in shards:
            part = _level_table(windows(load), n, max_n, radix, prefixes)
            # the running sum holds candidates only: its size is bounded by them, not by the corpus
            table = part if table is None else pl.concat([table, part]).group_by("k").agg(pl.col("c").sum())
            del part
        table = table.filter(pl.col("c") >= min_count)
        if n in n_values:
            # packed keys sort as their token ids do; two one-key sorts (the second stable) beat one two-key sort
            table = table.sort("k").sort("c", descending=True, maintain_order=True)
            out[n] = (frequent[_digits(table["k"], radix, n) - 1], table["c"].to_numpy().astype(np.int64))
        prefixes = table["k"]
    return out, tokens


def _check_shard(ids, doc_offsets) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids)
    if ids.size and ids.min() < 0:
        raise MiningError("token ids must be non-negative")
    off = np.asarray(doc_offsets, dtype=np.int64)
    if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != ids.size or (np.diff(off) < 0).any():
        raise MiningError(f"doc_offsets must rise from 0 to len(ids) = {ids.size}")
    return ids, off


def _digits(keys: pl.Series, radix: int, n: int) -> np.ndarray:
    """int64 [k, n]: the base-``radix`` digits of packed n-grams ``keys`` (first token first)."""
    if keys.dtype == pl.Int64:
        k = keys.to_numpy()
        out = np.empty((len(k), n), dtype=np.int64)
        for j in range(n - 1, -1, -1):
            k, out[:, j] = np.divmod(k, radix)
        return out
    r = pl.lit(radix, dtype=keys.dtype)  # Int128: numpy has no such integers
    return np.stack([pl.select((pl.lit(keys) // pl.lit(radix ** (n - 1 - j), dtype=keys.dtype) % r).cast(pl.Int64))
                     .to_series().to_numpy() for j in range(n)], axis=1).reshape(-1, n)


def _relabelled(ids: np.ndarray, relabel: np.ndarray, off: np.ndarray, max_n: int) -> tuple[np.ndarray, np.ndarray]:
    """One shard's tokens relabelled (0 = below tau) then ``max_n`` zeros: int [N_s + max_n]; and
    ``room`` uint8 [N_s], the tokens left in each position's document (itself included), capped at max_n."""
    size = ids.size
    room = np.full(size, max_n, dtype=np.uint8)
    for k in range(max_n - 1, 0, -1):
        last = off[1:] - k
        room[last[last >= off[:-1]]] = k
    padded = np.zeros(size + max_n, dtype=relabel.dtype)
    np.take(relabel, ids, out=padded[:size])
    return padded, room


def _window_table(padded: np.ndarray, room: np.ndarray, max_n: int, radix: int, dtype) -> pl.DataFrame:
    """Counts of one shard's windows: the ``max_n`` tokens from each position, cut before the first
    token below tau or the document's end, kept when at least 2 tokens long.

    ``padded``, ``room`` : see :func:`_relabelled`. A window is packed as ``max_n`` base-``radix``
    digits, 0 after the cut (so a key's leading n digits are the n-gram at that position when its
    n-th digit is not 0). Returns columns ``k`` (``dtype``) and ``c`` (Int64). Every level is derived
    from this one table: a single hash group-by over the shard's positions.
    """
    size = room.size
    starts = (padded[:size] != 0) & (padded[1 : size + 1] != 0) & (room >= 2)
    live = starts.copy()
    halves = []
    split = max_n if dtype == pl.Int64 else max_n // 2  # Int128: two int64 halves, joined below
    for lo, hi in ((0, split), (split, max_n)):
        if lo == hi:
            continue
        key = np.zeros(size, dtype=np.int64)
        for j in range(lo, hi):  # whole-array slices: faster than gathering at the starts
            digit = padded[j : j + size]
            if j >= 2:  # the window goes on while its tokens are frequent and in the document
                live &= (digit != 0) & (room > j)
                digit = np.where(live, digit, 0)
            key *= radix
            key += digit
        halves.append(pl.Series(key[starts]))
        del key
    if len(halves) == 1:
        keys = halves[0].alias("k")
    else:
        keys = pl.select((pl.lit(halves[0]).cast(dtype) * pl.lit(radix ** (max_n - split), dtype=dtype)
                          + pl.lit(halves[1])).alias("k")).to_series()
    return keys.to_frame().lazy().group_by("k").agg(pl.len().cast(pl.Int64).alias("c")).collect()


def _level_table(windows: pl.DataFrame, n: int, max_n: int, radix: int, prefixes) -> pl.DataFrame:
    """Counts of the n-grams in ``windows`` (see :func:`_window_table`) whose (n-1)-prefix is in
    ``prefixes`` (all when None). Columns ``k`` (n base-``radix`` digits) and ``c``."""
    dtype = windows.schema["k"]
    gram = pl.col("k") // pl.lit(radix ** (max_n - n), dtype=dtype)
    table = windows.lazy().filter(gram % pl.lit(radix, dtype=dtype) != 0)  # windows of >= n tokens
    if prefixes is not None:  # Apriori: an n-gram can reach tau only if its (n-1)-prefix does, corpus-wide
        prefix = (pl.col("k") // pl.lit(radix ** (max_n - n + 1), dtype=dtype)).cast(prefixes.dtype)
        table = table.filter(prefix.is_in(prefixes.implode()))
    if n < max_n:  # full windows are unique keys already
        table = table.group_by(gram.alias("k")).agg(pl.col("c").sum())
    fits = radix**n < 2**63
    return table.with_columns(pl.col("k").cast(pl.Int64)).collect() if fits and dtype != pl.Int64 else table.collect()


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


FILTERS = {"intra": filter_intra, "inter": filter_inter}


def apply_filters(ngrams: dict, counts: dict, filters: Iterable[str]) -> tuple[dict, dict, dict, dict]:
    """Run the stages of ``filters`` in the order of :data:`FILTER_STAGES`.

    Returns the kept ``ngrams``, ``counts``, ``removed`` (per stage and n: what the stage removed from
    what the stages before it left) and ``marginal`` (per stage and n: the n-grams the final set
    would hold if that stage were left out, but does not hold; 0 when later stages remove them anyway).
    """
    stages = [s for s in FILTER_STAGES if s in set(filters)]

    def run(skip: str | None):
        g, c, removed = dict(ngrams), dict(counts), {}
        for stage in stages:
            if stage != skip:
                g, c, removed[stage] = FILTERS[stage](g, c)
        return g, c, removed

    kept, kept_counts, removed = run(None)
    marginal = {}
    for stage in stages:
        without = run(stage)[0]
        marginal[stage] = {}
        for n in sorted(kept):
            w_ids, k_ids = _row_ids(without[n], kept[n])
            marginal[stage][n] = int((~np.isin(w_ids, k_ids)).sum())
    return kept, kept_counts, removed, marginal


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
    ids, off = _check_shard(ids, doc_offsets)
    return mine_rules_sharded([lambda: (ids, off)], tokenizer_fp, min_count, min_n, max_n, filters, corpus, progress)


def mine_rules_sharded(
    shards: Sequence[Shard],
    tokenizer_fp: dict,
    min_count: int = 5,
    min_n: int = 2,
    max_n: int = 4,
    filters: Iterable[str] = FILTER_STAGES,
    corpus: str = "",
    progress: bool = True,
) -> MergeRules:
    """:func:`mine_rules` of the concatenation of ``shards`` (see :func:`count_ngrams_sharded`)."""
    filters = list(filters)
    unknown = set(filters) - set(FILTER_STAGES)
    if unknown:
        raise MiningError(f"unknown filter stage(s) {sorted(unknown)}; choose from {FILTER_STAGES}")
    if not 2 <= min_n <= max_n <= MAX_N:
        raise MiningError(f"need 2 <= min_n <= max_n <= {MAX_N} (the spans a merger is trained for), "
                          f"got min_n={min_n}, max_n={max_n}")
    if min_count < 1:
        raise MiningError(f"min_count must be at least 1, got {min_count}")
    counted, tokens = _count(shards, range(min_n, max_n + 1), min_count, progress, tokenizer_fp["vocab_size"])
    ngrams = {n: g for n, (g, _) in counted.items()}
    counts = {n: c for n, (_, c) in counted.items()}
    if sum(len(g) for g in ngrams.values()) == 0:
        best = _count(shards, [min_n], 1, False)[0][min_n][1]
        raise MiningError(
            f"no n-gram of length {min_n}..{max_n} occurs >= {min_count} times in {tokens} tokens "
            f"(most frequent {min_n}-gram occurs {int(best.max()) if len(best) else 0} times): "
            "lower --min-count or use a larger corpus"
        )
    ngrams, counts, removed, marginal = apply_filters(ngrams, counts, filters)
    return MergeRules(
        ngrams=ngrams,
        counts=counts,
        tokenizer=tokenizer_fp,
        min_count=min_count,
        n_range=(min_n, max_n),
        filters=[s for s in FILTER_STAGES if s in filters],
        corpus=corpus,
        tokens_scanned=tokens,
        removed_by_filter=removed,
        marginal_by_filter=marginal,
    )
