"""The KV cache of a merging decode: :class:`MergingCache` owns a transformers 5.x ``DynamicCache``
together with the attention mask and each row's next position, and the surgery it needs (rollback,
compaction) is done by the functions below.

Entries are edited on the cache layers directly (``layer.keys/values`` are ``[B, H_kv, T, D]``)
rather than through ``DynamicCache.crop``, whose argument changed meaning within 5.x (absolute
length in early releases, a negative count later; an oversized crop silently keeps stale entries).
Only plain (full-attention) dynamic layers are supported; sliding-window caches are refused.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from umim.lm import cache_kwargs


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no per-layer storage; UMIM needs a transformers 5.x DynamicCache")
    for layer in layers:
        if getattr(layer, "is_sliding", False) or hasattr(layer, "sliding_window"):
            raise TypeError("online merging does not support sliding-window KV caches")
    return layers


def cache_length(cache) -> int:
    """T, the number of cached steps (slots) per row."""
    return int(cache.get_seq_length())


def drop_last(cache, n: int) -> None:
    """Remove the last ``n`` cached steps of every row (``0 < n <= T``)."""
    T = cache_length(cache)
    if not 0 < n <= T:
        raise ValueError(f"cannot drop {n} cache entries from a cache of {T}")
    for layer in _layers(cache):
        layer.keys = layer.keys[..., : T - n, :]
        layer.values = layer.values[..., : T - n, :]


def compact(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop masked-out slots, re-packing each row's valid entries to the right (left padding).

    Parameters
    ----------
    cache : DynamicCache with T slots.
    mask : [B, T] long/bool, 1 for valid slots.

    Returns
    -------
    [B, T'] new attention mask, T' = max valid slots of any row (the cache now has T' slots).
    """
    mask = mask.bool()
    B, T = mask.shape
    counts = mask.sum(1)
    t_new = int(counts.max())
    # slot order per row: padding (invalid) first, then valid slots in their original order
    order = torch.argsort(mask.long() * (T + 1) + torch.arange(T, device=mask.device)[None], dim=1)
    index = order[:, T - t_new :]  # [B, T']
    new_mask = torch.arange(t_new, device=mask.device)[None] >= (t_new - counts)[:, None]
    for layer in _layers(cache):
        idx = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, idx)
        layer.values = layer.values.gather(2, idx)
    return new_mask.long()


def cache_bytes(cache) -> int:
    """Bytes held by the keys and values of all layers."""
    return sum(t.numel() * t.element_size() for layer in _layers(cache) for t in (layer.keys, layer.values))


class MergingCache:
    """A batch's KV cache, attention mask and next positions, for decoding with merges.

    Rows are left-padded. Positions are per row and contiguous over the row's valid slots, so a
    row's merges never shift another row. Rolling back k entries of a row cuts them off with one
    row, and masks them out with several (rows merge at different steps); masked slots are removed
    by :meth:`compact`.

    Parameters
    ----------
    lm : the causal LM (its config builds the cache; its forward fills it).
    compact_every : with several rows, compact after this many steps (and at the end).

    Attributes
    ----------
    cache : the ``DynamicCache``, T slots per row.
    mask : [B, T] long, 1 for valid slots.
    next_pos : [B] (host) compressed position of each row's next step.
    """

    def __init__(self, lm, compact_every: int = 16):
        self.lm, self.compact_every = lm, compact_every
        self.cache = DynamicCache(config=lm.config)
        self.mask: torch.Tensor | None = None
        self.next_pos: list[int] = []
        self._since_compact = 0

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor, **kw) -> torch.Tensor:
        out = self.lm(inputs_embeds=embeds, attention_mask=self.mask, position_ids=positions,
                      **cache_kwargs(self.lm, self.cache), use_cache=True, **kw)
        return out.logits[:, -1, :].float()

    def prefill(self, embeds: list[torch.Tensor]) -> torch.Tensor:
        """Feed each row's prompt ``embeds[b]`` [S_b, d], left-padded to S = max S_b; [B, V] logits."""
        B, S, e0 = len(embeds), max(len(e) for e in embeds), embeds[0]
        padded = torch.zeros(B, S, e0.shape[-1], dtype=e0.dtype, device=e0.device)
        self.mask = torch.zeros(B, S, dtype=torch.long, device=e0.device)
        for b, e in enumerate(embeds):
            padded[b, S - len(e) :] = e
            self.mask[b, S - len(e) :] = 1
        positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 1)
        self.next_pos = [len(e) for e in embeds]
        return self._forward(padded, positions, logits_to_keep=1)

    def step(self, embeds: torch.Tensor, live: list[bool]) -> torch.Tensor:
        """Feed one step ``embeds`` [B, 1, d] at each row's next position; [B, V] logits.

        Rows not ``live`` (finished) feed a masked dummy slot at their last position (their next one
        may lie past the model's context), and their position does not advance."""
        column = torch.tensor(live, device=self.mask.device, dtype=self.mask.dtype)[:, None]
        self.mask = torch.cat([self.mask, column], 1)
        at = [p if v else p - 1 for p, v in zip(self.next_pos, live)]
        logits = self._forward(embeds, torch.tensor(at, device=self.mask.device)[:, None])
        self.next_pos = [p + int(v) for p, v in zip(self.next_pos, live)]
        self._since_compact += 1
        return logits

    def rollback(self, k: list[int]) -> None:
        """Roll back the last ``k[b]`` steps fed to each row b (0: none): cut off with one row,
        masked out with several; the row's next position moves back by ``k[b]``."""
        if not any(k):
            return
        T = self.mask.shape[1]
        if len(k) == 1:
            drop_last(self.cache, k[0])
            self.mask = self.mask[:, : T - k[0]]
        else:
            for b, n in enumerate(k):
                if n:
                    self.mask[b, T - n :] = 0
        self.next_pos = [p - n for p, n in zip(self.next_pos, k)]

    def maybe_compact(self, last: bool = False) -> None:
        """Compact every ``compact_every`` steps, and on the ``last`` one, when slots are masked out."""
        due = last or self._since_compact >= self.compact_every
        if len(self.next_pos) > 1 and due and bool((self.mask == 0).any()):
            self.compact()

    def compact(self) -> None:
        """Gather each row's valid slots to the right; the cache shrinks to the longest row."""
        self.mask = compact(self.cache, self.mask)
        self._since_compact = 0

    def lengths(self) -> list[int]:
        """[B] valid entries per row."""
        return self.mask.sum(1).tolist()
