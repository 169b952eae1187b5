"""Perplexity of a text under an evicting KV cache, so KV policies and UMIM compare at matched TR.

The text ``x_0 .. x_{L-1}`` is fed one token per step; after step t (``t + 1`` tokens seen) the
policy evicts the cache down to its budget, and the next query attends only to what is left plus
itself. Token ``x_{t+1}`` is scored from step t, so ``L - 1`` tokens are scored, as in
:func:`umim_eval.scoring.perplexity.two_stage_nll`. The TR is reported two ways: ``tr_final`` =
``1 - cache / tokens`` after the last step (UMIM's ``kv_len_final / kv_len_unmerged``) and
``tr_mean`` = ``1 - sum cache / sum tokens`` over all steps (the attention reads actually saved).

Two paths, one result:

* step by step (any policy; needed when eviction depends on attention, e.g. H2O): ``L - 1``
  single-token forwards on a ``DynamicCache`` whose ``layer.keys/values`` [B, H_kv, T, D] are
  gathered per layer and head after every step;
* one forward (``policy.content_free``, e.g. StreamingLLM): the eviction pattern is simulated on
  positions alone and turned into a 4-D mask [B, 1, L, L] — query t sees exactly the slots the
  evicting cache would hold — which is exact because a key, once computed, never changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from umim.lm import cache_kwargs
from umim_eval.methods.base import KVPolicy
from umim_eval.scoring.token_nll import token_nll


@dataclass
class PolicyNLL:
    """Scores of B texts of equal length L under one policy."""

    token_nll: torch.Tensor
    """[B, L] float64 NLL (nats) of each token, NaN at t = 0 (not scored)."""
    cache_len: torch.Tensor
    """[L - 1] long, cache entries held after step t's eviction (t + 1 tokens seen)."""
    kept_positions: dict[int, torch.Tensor] | None = None
    """Step-by-step path only: layer -> [B, H_kv, T] original positions held in the final cache."""

    @property
    def nll(self) -> float:
        """Mean NLL per scored token."""
        return float(torch.nan_to_num(self.token_nll, nan=0.0).sum() / self.token_nll[:, 1:].numel())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def tr_final(self) -> float:
        return 1.0 - int(self.cache_len[-1]) / len(self.cache_len)

    @property
    def tr_mean(self) -> float:
        seen = torch.arange(1, len(self.cache_len) + 1)
        return 1.0 - float(self.cache_len.sum()) / float(seen.sum())


def _as_batch(ids, device) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must be [L] or [B, L] with L >= 2, got shape {tuple(ids.shape)}")
    return ids.to(device)


def visible_mask(policy: KVPolicy, L: int, schedule: str = "proportional",
                 prompt_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulate a content-free policy on positions only.

    Returns
    -------
    ``(visible [L, L] bool, cache_len [L - 1] long)``: ``visible[t, j]`` is True when the query of
    step t attends to token j (the last row, never a query that scores anything, sees itself only).
    """
    vis = torch.eye(L, dtype=torch.bool)
    pos = torch.zeros(1, 1, 0, dtype=torch.long)
    lens = []
    policy.reset()
    for t in range(L - 1):
        pos = torch.cat([pos, torch.full((1, 1, 1), t)], dim=-1)
        vis[t, pos[0, 0]] = True
        n_keep = policy.budget(t + 1, _n_total(L, schedule, prompt_len), schedule)
        if pos.shape[-1] > n_keep:
            pos = pos.gather(-1, policy.keep(0, pos, n_keep))
        lens.append(pos.shape[-1])
    return vis, torch.tensor(lens)


@torch.no_grad()
def _n_total(L: int, schedule: str, prompt_len: int | None) -> int:
    """What ``budget`` reads as ``n_total``: the prompt length for ``prompt``, else ``L - 1`` steps."""
    if schedule != "prompt":
        return L - 1
    if prompt_len is None or not 0 < prompt_len <= L:
        raise ValueError(f"the prompt schedule needs prompt_len in [1, {L}], got {prompt_len}")
    return prompt_len


def _one_forward(lm, ids: torch.Tensor, policy: KVPolicy, schedule: str, prompt_len: int | None) -> PolicyNLL:
    B, L = ids.shape
    vis, lens = visible_mask(policy, L, schedule, prompt_len)
    dtype = lm.get_input_embeddings().weight.dtype
    mask = torch.zeros(B, 1, L, L, dtype=dtype, device=ids.device)
    mask.masked_fill_(~vis.to(ids.device), torch.finfo(dtype).min)
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=torch.arange(L, device=ids.device).expand(B, L)).logits
    nll = torch.full((B, L), float("nan"), dtype=torch.float64)
    nll[:, 1:] = token_nll(logits[:, :-1], ids[:, 1:]).cpu()
    return PolicyNLL(token_nll=nll, cache_len=lens)


def evict(cache, pos: dict[int, torch.Tensor], policy: KVPolicy, new_pos: torch.Tensor, n_keep: int | list[int],
          attentions=None) -> list[int]:
    """Register the slots just written to ``cache`` and evict each row down to its budget.

    Shared by scoring (:func:`policy_nll`) and decoding
    (:func:`umim_eval.scoring.policy_generate.policy_generate_batch`). Rows of a batch hold
    different numbers of entries in one rectangular cache: a slot at position -1 is padding, masked
    out of attention. Every layer and head of a row holds the same number of real slots, so after an
    eviction each row is left-padded the same way everywhere and one [B, T] mask serves all layers.

    Parameters
    ----------
    cache : a ``DynamicCache`` whose ``layers[i].keys/values`` [B, H_kv, T, D] end with the Q new slots.
    pos : layer -> [B, H_kv, T - Q] original positions of the older slots (-1: padding); updated in
        place to the positions held after eviction.
    policy : the KV policy that picks the slots to keep.
    new_pos : [Q] (the same for every row) or [B, Q] long, original positions of the tokens just fed,
        ascending over a row's real ones; -1 for padding tokens.
    n_keep : entries each row may hold after this call: one int for all rows, or [B].
    attentions : per-layer attention weights [B, H, Q, T] of the forward that wrote the new slots
        (required when ``policy.needs_attentions``); weights from or to padding are zeroed before the
        policy sees them, so padding never adds to a score.

    Returns
    -------
    [B] real entries each row holds afterwards.
    """
    layers = cache.layers
    if policy.needs_attentions and (attentions is None or len(attentions) != len(layers)
                                    or any(a is None for a in attentions)):
        raise ValueError(f"{policy.name} needs attention weights: load the model with attn_implementation='eager'")
    B, dev = layers[0].keys.shape[0], layers[0].keys.device
    new_pos = new_pos.to(dev).expand(B, -1) if new_pos.ndim == 1 else new_pos.to(dev)
    real = torch.cat([pos[0][:, 0] >= 0, new_pos >= 0], dim=1) if 0 in pos else new_pos >= 0  # [B, T]
    n_real = real.sum(-1).tolist()  # one host sync per step: which rows are over budget
    budget = [n_keep] * B if isinstance(n_keep, int) else list(n_keep)
    held = [min(n, k) for n, k in zip(n_real, budget)]
    over = any(n > k for n, k in zip(n_real, held))
    mask = None if all(n == real.shape[1] for n in n_real) else (new_pos >= 0)[:, None, :, None] & real[:, None, None]
    for i, layer in enumerate(layers):
        if getattr(layer, "is_sliding", False):
            raise TypeError("KV policies are evaluated on full-attention caches only")
        new = new_pos[:, None].expand(B, layer.keys.shape[1], -1)
        pos[i] = torch.cat([pos[i], new], dim=-1) if i in pos else new.clone()
        if policy.needs_attentions:
            policy.observe(i, attentions[i] if mask is None else attentions[i] * mask, pos[i])
    if over:
        compact(cache, pos, policy, held)
    return held


def compact(cache, pos: dict[int, torch.Tensor], policy: KVPolicy, n_keep: list[int]) -> None:
    """Keep row b's ``n_keep[b]`` slots chosen by ``policy.keep`` (all its real ones when it holds no
    more), gathered to the right: the cache shrinks to ``max n_keep`` slots and each row is
    left-padded, its padding at position -1 (``cache`` and ``pos`` as in :func:`evict`)."""
    dev = cache.layers[0].keys.device
    held = torch.tensor(n_keep, device=dev)
    for i, layer in enumerate(cache.layers):
        idx = policy.keep(i, pos[i], n_keep)  # [B, H_kv, K]
        gather = idx[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
        K = idx.shape[-1]
        padding = torch.arange(K, device=dev) < (K - held)[:, None, None]
        pos[i] = pos[i].gather(-1, idx).masked_fill(padding, -1)


@torch.no_grad()
def _step_by_step(lm, ids: torch.Tensor, policy: KVPolicy, schedule: str, prompt_len: int | None) -> PolicyNLL:
    B, L = ids.shape
    dev = ids.device
    cache = DynamicCache(config=lm.config)
    pos: dict[int, torch.Tensor] = {}  # layer -> [B, H_kv, T] original position of each slot
    nll = torch.full((B, L), float("nan"), dtype=torch.float64)
    lens = []
    policy.reset()
    for t in range(L - 1):
        T = cache.get_seq_length()
        out = lm(input_ids=ids[:, t : t + 1], attention_mask=torch.ones(B, T + 1, dtype=torch.long, device=dev),
                 position_ids=torch.full((B, 1), t, device=dev), **cache_kwargs(lm, cache), use_cache=True,
                 output_attentions=policy.needs_attentions)
        nll[:, t + 1] = token_nll(out.logits[:, -1:], ids[:, t + 1 : t + 2])[:, 0].cpu()
        evict(cache, pos, policy, torch.tensor([t]), policy.budget(t + 1, _n_total(L, schedule, prompt_len), schedule),
              out.attentions if policy.needs_attentions else None)
        lens.append(cache.get_seq_length())
    return PolicyNLL(token_nll=nll, cache_len=torch.tensor(lens), kept_positions={i: p.cpu() for i, p in pos.items()})


def policy_nll(lm, ids, policy: KVPolicy, schedule: str = "proportional", step_by_step: bool | None = None,
               prompt_len: int | None = None) -> PolicyNLL:
    """NLL of texts scored token by token while ``policy`` evicts the KV cache.

    Parameters
    ----------
    lm : a Hugging Face causal LM in eval mode (full attention; eager for policies that need attentions).
    ids : [L] or [B, L] token ids (rows of equal length, no padding), L >= 2.
    policy : the KV policy; its ``ratio`` sets the budget through ``schedule``.
    schedule : ``"proportional"`` (budget ``(1 - ratio)`` of the tokens seen at every step),
        ``"fixed"`` (``(1 - ratio)`` of the whole text, the cache grows until it is full) or
        ``"prompt"`` (the first ``prompt_len`` tokens reduced by ``ratio``, the rest kept; see
        :meth:`~umim_eval.methods.base.KVPolicy.budget`).
    step_by_step : force the step-by-step path (default: one forward when the policy allows it).
    prompt_len : prompt length for the ``prompt`` schedule.

    Returns
    -------
    :class:`PolicyNLL` with ``token_nll`` [B, L] and ``cache_len`` [L - 1].
    """
    ids = _as_batch(ids, lm.device)
    fast = policy.content_free and not policy.needs_attentions and not step_by_step
    return (_one_forward if fast else _step_by_step)(lm, ids, policy, schedule, prompt_len)
