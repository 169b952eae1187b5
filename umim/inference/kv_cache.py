"""KV-cache surgery for online merging on transformers 5.x ``DynamicCache``.

Entries are edited on the cache layers directly (``layer.keys/values`` are ``[B, H_kv, T, D]``)
rather than through ``DynamicCache.crop``, whose argument changed meaning within 5.x (absolute
length in early releases, a negative count later; an oversized crop silently keeps stale entries).
Only plain (full-attention) dynamic layers are supported; sliding-window caches are refused.
"""

from __future__ import annotations

import torch


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
    return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size() for l in _layers(cache))
