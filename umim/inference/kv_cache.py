"""The KV cache of a merging decode: ragged per-row storage (:class:`RaggedKV`) behind
:class:`MergingCache`, which also owns each row's next position and builds the attention masks.

Why ragged storage (issue 13): rows merge at different steps, so their lengths drift apart. A
rectangular cache (transformers' ``DynamicCache``, ``[B, H_kv, T, D]``) stays as long as the longest
row, and its rolled-back slots must be masked until a compaction. Here each layer keeps one pool of
slots ``[H_kv, C + 1, D]`` and each row a list of its slot ids, so the stored bytes are the sum of the
row lengths (plus one scratch slot), and a rollback returns its slots to a free list that the next
steps reuse. For attention, each layer's update gathers the rows' slots into a rectangle
``[B, H_kv, W, D]`` (W = the longest row) that the model's own attention (SDPA or eager) reads with
our 4-D mask (none when every row has W entries) and drops right after; only the ragged pool
persists between steps. That gather copies as much as ``DynamicCache``'s ``torch.cat`` does each
step, so batch 1 costs no more than before.

Alternatives checked (transformers 5.24):

* a packed cache (all rows one sequence, block-diagonal mask) stores the same bytes, but every row's
  query meets every row's keys: attention FLOPs grow B-fold (counted for SmolLM2-135M at batch 32
  and ~160 entries a row: 11 GFLOP a step, more than the rest of the model's 9);
* transformers' paged cache (``transformers.generation.continuous_batching``, ``paged|`` attention;
  ``"sdpa_paged"`` is refused by name) runs on CPU through ``generate_batch``, but its requests are
  token ids scheduled by its own manager: it takes no ``inputs_embeds`` (our surrogate embeddings)
  and has no way to remove a request's last n-1 entries mid-decode (our rollback); its blocks also
  leave up to a block of slack per row.

Pools grow by ``grow`` of their capacity at a time (far fewer copies than one per step); ``trim``
returns the spare slots at the end of a decode, so the final storage is exact.
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from umim.errors import UserError
from umim.lm import cache_kwargs


def check_full_attention(config) -> None:
    """Refuse models with sliding-window layers (the ragged cache keeps every entry, as full
    attention needs); the layer kinds are read the way transformers builds its own cache."""
    for layer in DynamicCache(config=config).layers:
        if getattr(layer, "is_sliding", False) or hasattr(layer, "sliding_window"):
            raise TypeError("online merging does not support sliding-window KV caches")


def cache_length(cache) -> int:
    """The cache's width: cached steps per row of a ``DynamicCache``, the longest row of a :class:`RaggedKV`."""
    return int(cache.get_seq_length())


def cache_bytes(cache) -> int:
    """Bytes of storage the cache's keys and values hold between steps (allocated, not just live)."""
    if isinstance(cache, RaggedKV):
        return cache.nbytes()
    # a DynamicCache's tensors come from torch.cat after the first step: their own storage
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float mask (0 where ``allowed``, the dtype's minimum elsewhere), taken as-is by SDPA and eager attention."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


class RaggedKV:
    """Keys and values of B rows of different lengths, stored ragged.

    Per layer one pool of slots ``[H_kv, C + 1, D]`` (head-major: see :meth:`update`): slot 0 is
    scratch (the target of padding and of finished rows' dummy steps, never read unmasked), slots
    1..C hold entries or are free. ``table`` [B, W] holds each row's slot ids right-packed: row b's
    L_b entries fill its last L_b columns in sequence order, W = max L_b, padding points at slot 0.

    A forward is planned first (:meth:`plan_prefill`, :meth:`plan_step`: which slots the new entries
    take); the model then calls :meth:`update` once per layer, as on a transformers cache.

    The bookkeeping (table, free list) lives on the host, small and read by Python; each forward
    copies its slot ids to ``device`` once, not once per layer.

    Parameters
    ----------
    device : where the model runs (and the pools live).
    grow : when the free slots run out, the pool grows by this fraction of its capacity (at least
        what the step needs): fewer pool copies, at most that much spare storage until :meth:`trim`.
    """

    def __init__(self, device: torch.device | str = "cpu", grow: float = 0.125):
        self.device, self.grow = torch.device(device), grow
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.capacity = self.peak = 0  # slots allocated now / at most so far
        self.free = torch.empty(0, dtype=torch.long)
        self.table = torch.zeros(0, 0, dtype=torch.long)
        self.valid = torch.zeros(0, 0, dtype=torch.bool)
        # the planned forward, on the device: slots written, slots read (None: a prefill, which reads
        # its fresh rectangle), and for a prefill which of its [B, S] entries are kept
        self._write = self._read = self._keep = None
        self._planned = False  # a plan serves one forward: its layer 0 update consumes it
        self._packed = True
        self._fresh = False  # the planned prefill is the cache's first: its slots are 1..n in order

    # -- planning --------------------------------------------------------------------------------
    def _take(self, n: int) -> torch.Tensor:
        """[n] free slot ids, growing the capacity when too few are free."""
        short = n - len(self.free)
        if short > 0:
            extra = max(short, math.ceil(self.grow * self.capacity))
            self.free = torch.cat([self.free, torch.arange(self.capacity + 1, self.capacity + extra + 1)])
            self.capacity += extra
            self.peak = max(self.peak, self.capacity)
        taken, self.free = self.free[len(self.free) - n :], self.free[: len(self.free) - n]
        return taken

    def plan_prefill(self, lens: torch.Tensor) -> torch.Tensor | None:
        """The next forward feeds B rows of ``lens`` [B] entries, right-padded to S = max; the cache must be empty.

        Returns
        -------
        [n] long (on the device): flat indices into the forward's [B * S] entries of the n real ones,
        row by row; None when no row is padded (all are real).
        """
        if self.table.numel():
            raise ValueError("prefill needs an empty cache")
        lens = lens.cpu()
        S, n = int(lens.max()), int(lens.sum())
        fed = torch.arange(S)[None] < lens[:, None]  # [B, S] where the forward's entries are real
        self.valid = fed.flip(1)  # the table is right-packed
        self.table = torch.zeros(fed.shape, dtype=torch.long)
        # both masks list the entries row by row in sequence order, the order update() writes in
        slots = self._take(n)
        self.table[self.valid] = slots
        self._packed = True
        # a first prefill takes slots 1..n in order: update() then writes each pool in one strided copy
        self._fresh = not self.keys and self.capacity == n and torch.equal(slots, torch.arange(1, n + 1))
        # flat [B*S] indices of the real entries, made on the host (a boolean index on the device would sync)
        keep = None if n == fed.numel() else fed.flatten().nonzero().squeeze(1).to(self.device)
        self._write, self._read, self._keep = slots.to(self.device), None, keep
        self._planned = True
        return keep

    def plan_step(self, live: torch.Tensor) -> None:
        """The next forward feeds one entry per row; ``live`` [B] bool: kept (finished rows' entries go to scratch)."""
        self._pack()
        live = live.cpu()
        new = torch.zeros(len(live), dtype=torch.long)
        new[live] = self._take(int(live.sum()))
        self.table = torch.cat([self.table, new[:, None]], 1)
        self.valid = torch.cat([self.valid, live[:, None]], 1)
        self._packed = bool(live.all())
        self._write, self._read = new.to(self.device), self.table.flatten().to(self.device)
        self._planned, self._fresh = True, False

    # -- the model's side ------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the planned forward's ``key_states``, ``value_states`` [B, H_kv, q, D] of one layer and
        return the keys and values its attention reads, [B, H_kv, W, D] in ``table``'s layout."""
        if layer_idx == 0:
            if not self._planned:  # e.g. a plain model forward on a finished decode's cache
                raise RuntimeError("a RaggedKV forward must be planned (MergingCache.prefill/step feed it)")
            self._planned = False
        out = []
        for pools, states in ((self.keys, key_states), (self.values, value_states)):
            H, D = states.shape[1], states.shape[3]
            heads = states.transpose(0, 1)  # [H, B, q, D]: a pool is head-major
            if self._read is None and self._fresh:  # a first prefill: scratch slot 0, then the entries in order
                pools[layer_idx] = pool = states.new_empty(H, self.capacity + 1, D)
                pool[:, 0] = 0
                if self._keep is None:
                    pool[:, 1:].view(heads.shape).copy_(heads)
                else:
                    pool[:, 1:] = heads.reshape(H, -1, D).index_select(1, self._keep)
                out.append(states)
                continue
            pool = pools.get(layer_idx)
            if pool is None or pool.shape[1] <= self.capacity:  # zero-filled: masked slots must stay finite
                fresh = states.new_zeros(H, self.capacity + 1 - (0 if pool is None else pool.shape[1]), D)
                pool = fresh if pool is None else torch.cat([pool, fresh], 1)
                pools[layer_idx] = pool
            if self._read is None:  # prefill: store the valid entries, attend over the fresh rectangle
                flat = heads.reshape(H, -1, D)
                pool.index_copy_(1, self._write, flat if self._keep is None else flat.index_select(1, self._keep))
                out.append(states)
            else:
                pool.index_copy_(1, self._write, heads[:, :, 0])
                B, W = self.table.shape
                gathered = pool.index_select(1, self._read)  # [H, B*W, D]
                # [B, H, W, D] with each row's and head's W x D keys contiguous, the layout SDPA reads fastest
                # (the earlier slot-major pool gave a strided view: SDPA took 1.4-1.5x on CPU, batch 32)
                out.append(gathered.view(H, B, W, D).transpose(0, 1))
        return out[0], out[1]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset) for transformers' own causal mask, asked only by forwards without a mask
        of ours: a prefill of unpadded rows (it attends over its fresh entries alone) and a step over a
        full table (every row W entries: the step attends over all W, the new one last)."""
        if not self._planned:
            raise RuntimeError("a RaggedKV forward must be planned (MergingCache.prefill/step feed it)")
        if self._read is None:
            return query_length, 0
        if not self.full():
            raise RuntimeError("a decode step over a ragged cache needs its 4-D mask")
        return self.table.shape[1], 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """The first query's position in the mask (see :meth:`get_mask_sizes`): 0 in a prefill, W - 1 in a step."""
        return 0 if self._read is None else self.table.shape[1] - 1

    def full(self) -> bool:
        """Whether every row holds an entry in every column of ``table`` (no padding, no finished row's dummy)."""
        return bool(self.valid.all())

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest row's entries (read only: the model may ask between a plan and its forward)."""
        return int(self.valid.sum(1).max()) if self.valid.numel() else 0

    # -- surgery ---------------------------------------------------------------------------------
    def _pack(self) -> None:
        """Re-pack the table right (a finished row's dummy column is dropped): table-only, the entries stay put."""
        if self._packed:
            return
        B, W = self.valid.shape
        width = int(self.valid.sum(1).max()) if B else 0
        order = torch.argsort(self.valid.long() * (W + 1) + torch.arange(W)[None], dim=1)[:, W - width :]
        self.valid = self.valid.gather(1, order)
        self.table = self.table.gather(1, order).masked_fill(~self.valid, 0)
        self._packed = True

    def rollback(self, k: torch.Tensor) -> None:
        """Remove the last ``k[b]`` entries of each row b ([B] long, ``k[b] <= L_b``); their slots are freed."""
        self._pack()
        W = self.table.shape[1]
        cols = torch.arange(W)[None]
        drop = (cols >= W - k[:, None]) & self.valid  # never padding: slot 0 is not freed
        self.free = torch.cat([self.free, self.table[drop]])
        # right-packed rows stay right-packed by shifting each right by its k (cheaper than a re-sort)
        src = cols - k[:, None]
        kept = src >= 0
        src = src.clamp(min=0)
        self.valid = self.valid.gather(1, src) & kept
        self.table = self.table.gather(1, src).masked_fill(~self.valid, 0)
        width = int(self.valid.sum(1).max())
        self.table, self.valid = self.table[:, W - width :], self.valid[:, W - width :]

    def trim(self) -> None:
        """Drop the spare and freed slots: the pools then hold exactly the live entries (+ the scratch slot)."""
        self._pack()
        self._write = self._read = self._keep = None  # slots are renumbered: no plan survives
        self._planned = self._fresh = False
        live = self.table[self.valid]
        if len(live) == self.capacity:
            return
        idx = torch.cat([torch.zeros(1, dtype=torch.long), live]).to(self.device)
        for pools in (self.keys, self.values):
            for i, pool in pools.items():
                pools[i] = pool.index_select(1, idx)
        self.table[self.valid] = torch.arange(1, len(live) + 1)
        self.capacity, self.free = len(live), torch.empty(0, dtype=torch.long)

    # -- accounting ------------------------------------------------------------------------------
    def lengths(self) -> list[int]:
        """[B] entries per row."""
        return self.valid.sum(1).tolist()

    def slot_bytes(self) -> int:
        """Bytes of one slot over all layers, keys and values."""
        return sum(p[:, 0].numel() * p.element_size() for pools in (self.keys, self.values) for p in pools.values())

    def nbytes(self) -> int:
        """Allocated bytes of the pools: ``(capacity + 1) * slot_bytes()``."""
        return sum(p.untyped_storage().nbytes() for pools in (self.keys, self.values) for p in pools.values())


class MergingCache:
    """A batch's KV cache (:class:`RaggedKV`) and each row's next position, for decoding with merges.

    Positions are per row and contiguous over the row's entries, so a row's merges never shift
    another row. Rolling back k entries of a row frees their slots at once, at any batch size.

    Parameters
    ----------
    lm : the causal LM (full attention only; its forward fills the cache).
    grow : see :class:`RaggedKV`.

    Attributes
    ----------
    kv : the :class:`RaggedKV`.
    next_pos : [B] (host) compressed position of each row's next step.
    """

    def __init__(self, lm, grow: float = 0.125):
        check_full_attention(lm.config)
        if len(set((getattr(lm, "hf_device_map", None) or {}).values())) > 1:
            raise UserError("online merging needs the LM on one device (the ragged cache's slot tables live on "
                            "one); load it without a multi-GPU device_map")
        self.lm, self.kv = lm, RaggedKV(lm.device, grow)
        self.next_pos: list[int] = []

    def prefill(self, embeds: list[torch.Tensor]) -> torch.Tensor:
        """Feed each row's prompt ``embeds[b]`` [S_b, d] in one forward; [B, V] logits at each row's last entry.

        Rows are right-padded to S = max S_b: under a plain causal mask a real entry never sees the
        padding after it, so no padding mask is needed and attention takes SDPA's is_causal path (a
        4-D padding mask cost ~5 % of a batch-8 prefill); the padding's outputs are neither stored
        nor read. Rows of one length (batch 1 always) need no padding: the forward is then the model's
        own, with ``logits_to_keep=1`` and no hook, and each layer's entries go to its pool in one copy."""
        B, S, e0 = len(embeds), max(len(e) for e in embeds), embeds[0]
        lens = torch.tensor([len(e) for e in embeds])
        keep = self.kv.plan_prefill(lens)
        self.next_pos = lens.tolist()
        if keep is None:  # no padding (always at batch 1): no scatter, no hook
            padded = torch.stack(embeds)
        else:  # scattered by the host-made index (a boolean index on the device would sync)
            padded = e0.new_zeros(B, S, e0.shape[-1])
            padded.view(B * S, -1).index_copy_(0, keep, torch.cat(embeds))
        positions = torch.arange(S, device=e0.device)[None].expand(B, S)

        def forward():
            return self.lm(inputs_embeds=padded, position_ids=positions, **cache_kwargs(self.lm, self.kv),
                           use_cache=True, logits_to_keep=1)

        if keep is None:
            return forward().logits[:, -1].float()
        # the model's own head (with any logit scaling) runs once per row, on its last entry: a hook
        # hands it those rows (logits_to_keep would keep the same columns in every row)
        last = (lens - 1).to(e0.device)

        def last_rows(module, args, output):
            output.last_hidden_state = output.last_hidden_state[torch.arange(B, device=e0.device), last][:, None]
            return output

        hook = self.lm.base_model.register_forward_hook(last_rows)
        try:
            return forward().logits[:, -1].float()
        finally:
            hook.remove()

    def step(self, embeds: torch.Tensor, live: list[bool]) -> torch.Tensor:
        """Feed one step ``embeds`` [B, 1, d] at each row's next position; [B, V] logits.

        Rows not ``live`` (finished) feed a dummy at their last position (their next one may lie past
        the model's context) into the scratch slot, and their position does not advance."""
        self.kv.plan_step(torch.tensor(live))
        at = torch.tensor([p if v else p - 1 for p, v in zip(self.next_pos, live)], device=embeds.device)
        # rows of equal length (batch 1 always) need no mask of ours: transformers' own then lets SDPA
        # take its mask-free kernel (flash attention on a GPU; a 4-D mask rules it out)
        mask = None if self.kv.full() else additive_mask(self.kv.valid.to(embeds.device)[:, None, None, :],
                                                         embeds.dtype)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=at[:, None],
                         **cache_kwargs(self.lm, self.kv), use_cache=True).logits[:, -1].float()
        self.next_pos = [p + int(v) for p, v in zip(self.next_pos, live)]
        return logits

    def rollback(self, k: list[int]) -> None:
        """Roll back the last ``k[b]`` steps fed to each row b (0: none); its next position moves back by ``k[b]``."""
        if not any(k):
            return
        self.kv.rollback(torch.tensor(k))
        self.next_pos = [p - n for p, n in zip(self.next_pos, k)]

    def finish(self) -> None:
        """End of a decode: return the spare slots, so the storage is exactly the rows' entries."""
        self.kv.trim()

    def lengths(self) -> list[int]:
        """[B] entries per row."""
        return self.kv.lengths()
