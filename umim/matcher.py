"""Span matcher: left-to-right longest match of rule n-grams over token ids.

The ONE segmentation used by training collation, prompt merging, perplexity and evaluation.

The rule set is stored as a trie laid out in sorted integer arrays, one level per n-gram length:
a node at level n is identified by its index in ``keys[n]``, where the key of a node is
``parent_node * vocab_size + token`` (level-1 nodes are the token ids themselves). Looking up every
window of a sequence is then ``max_n - 1`` vectorized ``searchsorted`` calls, exact for any
vocabulary (no hashing), and the greedy walk that turns match lengths into segments is a single
linear pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


class SpanMatcher:
    """Longest-match segmenter for a rule set ``{n: int array [k, n]}`` over a vocabulary of size V."""

    def __init__(self, ngrams: Mapping[int, np.ndarray], vocab_size: int):
        self.vocab_size = int(vocab_size)
        self.max_n = max([n for n, g in ngrams.items() if len(g)] or [1])
        self.keys: dict[int, np.ndarray] = {}
        self.is_rule: dict[int, np.ndarray] = {}
        # node id of every rule's prefix of the current length, per rule length
        parents = {n: np.asarray(g, dtype=np.int64)[:, 0].copy() for n, g in ngrams.items() if len(g)}
        for n, g in ngrams.items():
            g = np.asarray(g)
            if len(g) and (g.min() < 0 or g.max() >= self.vocab_size):
                raise ValueError(f"rule {n}-grams hold token ids outside [0, {self.vocab_size})")
        for level in range(2, self.max_n + 1):
            longer = [n for n in parents if n >= level]
            level_keys = {
                n: parents[n] * self.vocab_size + np.asarray(ngrams[n], dtype=np.int64)[:, level - 1] for n in longer
            }
            keys = np.unique(np.concatenate(list(level_keys.values())))
            is_rule = np.zeros(len(keys), dtype=bool)
            for n in longer:
                parents[n] = np.searchsorted(keys, level_keys[n])
                if n == level:
                    is_rule[parents[n]] = True
            self.keys[level], self.is_rule[level] = keys, is_rule

    def match_lengths(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """Length of the longest rule n-gram starting at each position (1 where none does).

        Parameters
        ----------
        ids : int array [B, L] (or [L])
        lengths : int array [B], valid (unpadded) length of each row; windows never cross it.

        Returns
        -------
        int8 array with the shape of ``ids``.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids outside the rules' vocabulary [0, {self.vocab_size}): wrong tokenizer?")
        squeeze = ids.ndim == 1
        ids2 = ids[None] if squeeze else ids
        B, L = ids2.shape
        if lengths is None:
            lengths = np.full(B, L, dtype=np.int64)
        out = np.ones((B, L), dtype=np.int8)
        node = ids2
        alive = np.arange(L)[None, :] < np.asarray(lengths)[:, None]
        for level in range(2, self.max_n + 1):
            width = L - level + 1
            if width <= 0:
                break
            node = node[:, :width]
            alive = alive[:, :width] & (np.arange(width)[None, :] + level - 1 < np.asarray(lengths)[:, None])
            keys = self.keys[level]
            key = node * self.vocab_size + ids2[:, level - 1 : level - 1 + width]
            idx = np.searchsorted(keys, key)
            idx_c = np.minimum(idx, len(keys) - 1)
            alive = alive & (keys[idx_c] == key)
            node = np.where(alive, idx_c, 0)
            out[:, :width][alive & self.is_rule[level][idx_c]] = level
        return out[0] if squeeze else out

    def segment(self, ids: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
        """Segments ``(start, length)`` covering ``ids`` in order (longest match, left to right)."""
        starts, lens = self.segment_batch(np.asarray(ids, dtype=np.int64)[None])
        n = int((lens[0] > 0).sum())
        return list(zip(starts[0, :n].tolist(), lens[0, :n].tolist()))

    def segment_batch(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Segment every row of a batch.

        Parameters
        ----------
        ids : int array [B, L]
        lengths : int array [B] of valid lengths (right padding beyond), default all L.

        Returns
        -------
        starts, lens : int64 arrays [B, S_max]; rows padded with start 0 and length 0.
        """
        ids = np.asarray(ids, dtype=np.int64)
        B, L = ids.shape
        if lengths is None:
            lengths = np.full(B, L, dtype=np.int64)
        steps = self.match_lengths(ids, lengths).tolist()
        rows_starts: list[list[int]] = []
        for b in range(B):
            step, n, i, starts = steps[b], int(lengths[b]), 0, []
            append = starts.append
            while i < n:  # greedy walk: one iteration per segment, linear in L
                append(i)
                i += step[i]
            rows_starts.append(starts)
        s_max = max((len(s) for s in rows_starts), default=0)
        starts = np.zeros((B, s_max), dtype=np.int64)
        lens = np.zeros((B, s_max), dtype=np.int64)
        for b, s in enumerate(rows_starts):
            if s:
                starts[b, : len(s)] = s
                ends = np.append(starts[b, 1 : len(s)], lengths[b])
                lens[b, : len(s)] = ends - starts[b, : len(s)]
        return starts, lens
