"""Span matcher: left-to-right longest match of rule n-grams over token ids.

The ONE segmentation used by training collation, prompt merging, perplexity and evaluation.

The rule set is stored as a trie laid out in integer arrays, one level per n-gram length: a node
at level n is identified by its index in ``keys[n]``, where the key of a node is
``parent_node * vocab_size + token`` (level-1 nodes are the token ids themselves), so keys are exact
for any vocabulary. Each level also has an open-addressing hash table (linear probing, at most half
full) from key to node, probed for all positions of a batch at once: looking up every window is
``max_n - 1`` vectorized probes over the positions whose prefix is still alive (random binary
searches into multi-MB arrays were cache-miss bound and twice as slow). The greedy walk that turns
match lengths into segments is a single linear pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from umim.errors import UserError


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
                raise UserError(f"rule {n}-grams hold token ids outside [0, {self.vocab_size})")
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
        self.tables = {level: self._build_table(keys) for level, keys in self.keys.items()}

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
        squeeze = ids.ndim == 1
        ids2 = ids[None] if squeeze else ids
        B, L = ids2.shape
        lengths = np.full(B, L, dtype=np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64)
        room = (lengths[:, None] - np.arange(L)[None, :]).ravel()  # tokens left in the row
        flat = ids2.ravel()
        valid = flat[room > 0]
        if valid.size and (valid.min() < 0 or valid.max() >= self.vocab_size):
            raise UserError(f"token ids outside the rules' vocabulary [0, {self.vocab_size}): wrong tokenizer?")
        out = np.ones(B * L, dtype=np.int8)
        pos = np.flatnonzero(room >= 2)
        node = flat[pos]
        for level in range(2, self.max_n + 1):
            if level > 2:
                ok = room[pos] >= level
                pos, node = pos[ok], node[ok]
            found = self._lookup(level, node * self.vocab_size + flat[pos + level - 1])
            hit = found >= 0
            pos, node = pos[hit], found[hit]
            out[pos[self.is_rule[level][node]]] = level
            if pos.size == 0:
                break
        out = out.reshape(B, L)
        return out[0] if squeeze else out

    # -- hash tables -------------------------------------------------------------------------------
    @staticmethod
    def _slot(keys: np.ndarray, bits: int) -> np.ndarray:
        """Fibonacci hashing: top ``bits`` bits of key * 2^64 / golden ratio."""
        return ((keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits)).astype(np.int64)

    def _build_table(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        bits = max(1, int(np.ceil(np.log2(max(2, 2 * len(keys))))))
        size = 1 << bits
        table_keys = np.full(size, -1, dtype=np.int64)
        table_nodes = np.zeros(size, dtype=np.int64)
        slot = self._slot(keys, bits)
        pending = np.arange(len(keys))
        while pending.size:  # each round places one key per free slot, the rest probe onwards
            s = slot[pending]
            free = table_keys[s] == -1
            cand = pending[free]
            _, first = np.unique(s[free], return_index=True)
            won = cand[first]
            table_keys[slot[won]] = keys[won]
            table_nodes[slot[won]] = won
            placed = np.zeros(len(keys), dtype=bool)
            placed[won] = True
            pending = pending[~placed[pending]]
            slot[pending] = (slot[pending] + 1) & (size - 1)
        return table_keys, table_nodes, bits

    def _lookup(self, level: int, keys: np.ndarray) -> np.ndarray:
        """Node index of each key at ``level``, -1 where absent."""
        table_keys, table_nodes, bits = self.tables[level]
        mask = (1 << bits) - 1
        slot = self._slot(keys, bits)
        found = np.full(len(keys), -1, dtype=np.int64)
        todo = np.arange(len(keys))
        while todo.size:
            s = slot[todo]
            k = table_keys[s]
            hit = k == keys[todo]
            found[todo[hit]] = table_nodes[s[hit]]
            more = ~hit & (k != -1)
            todo = todo[more]
            slot[todo] = (s[more] + 1) & mask
        return found

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
