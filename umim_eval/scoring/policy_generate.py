"""Decoding under an evicting KV cache, so KV policies generate text at a controlled TR.

A batch of prompts is prefilled left-padded (in one forward, or one column per step), then one
token per row is decoded per step; after every forward the policy evicts each row's cache down to
that row's budget with the same mechanics as scoring (:func:`umim_eval.scoring.policy_nll.evict`).
Every token keeps its original position, so at ratio 0 nothing is evicted and the tokens equal
Hugging Face ``generate`` (greedy, or sampled from the same global RNG state).

Batches: the rows share one rectangular cache [B, H_kv, T, D]; a row's slots carry their original
positions, -1 marking padding (the prompt's left padding, the slots a finished row feeds until the
batch ends, and the room a row with a smaller budget leaves after an eviction, which gathers each
row's kept slots to the right). Padding is masked out of attention, and its attention weights are
zeroed before H2O adds them to its scores, so a row's text, cache and TR do not depend on the other
rows (up to float rounding of the padded matmuls). Rows stop independently (EOS, ``max_new_tokens``,
the context); at the end each row's slots are gathered to the right, so the final cache (and H2O's
scores) of row b is its last ``cache_len`` slots. :func:`policy_generate` is the batch of one.

The last sampled token is fed too (one extra forward, as in :meth:`umim.inference.generation.MergedLM.generate`),
so the final cache covers the whole text and the TR is measured like UMIM's
``1 - kv_len_final / kv_len_unmerged``: ``1 - cache entries / tokens seen`` with
``tokens seen = prompt + generated`` (EOS included when it stopped the text).

Budget schedules (:meth:`~umim_eval.methods.base.KVPolicy.budget`), per row:

* ``fixed`` (default): one cache size, ``(1 - ratio)`` of ``prompt + max_new_tokens``: the paper's
  StreamingLLM setup, where the window is a share of the prompt plus generation length. The TR
  hits the target when the text runs to ``max_new_tokens``; a text that stops early at EOS has seen
  fewer tokens than the budget was sized for, so its TR is lower.
* ``proportional``: ``(1 - ratio)`` of the tokens seen so far, at every step.
* ``prompt``: only the prompt is reduced, by ``round(ratio * L)`` entries; every generated token
  then adds one entry, so the cache always holds what a prompt merged to TR ``ratio`` would
  (the matched-TR runners use this: the generation is never reduced, for any method).

Sampling draws one ``multinomial`` over all B rows per step (finished rows included) from the global
generator, seeded once per batch by ``sampling.seed``: a batch's texts are reproducible given its
seed and its prompts in order, and a batch of one draws exactly what Hugging Face ``generate`` does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from umim.errors import UserError
from umim.inference.decoding import StopCheck, TokenPicker
from umim.inference.generation import SamplingConfig
from umim.lm import cache_kwargs
from umim_eval.methods.base import SCHEDULES, KVPolicy, check_ratio, model_context
from umim_eval.scoring.policy_nll import compact, evict

PREFILLS = ("full", "step")


@dataclass
class PolicyGeneration:
    """One prompt decoded under a KV policy."""

    generated_ids: list[int]
    """New token ids, EOS (and nothing after it) excluded."""
    n_prompt: int
    """Prompt tokens."""
    n_seen: int
    """Tokens whose keys and values were computed: prompt + generated (EOS included)."""
    cache_len: int
    """Cache entries per layer and head after the last eviction."""
    stop_reason: str
    """``"eos"``, ``"max_new_tokens"`` or ``"context"`` (the model's position limit)."""

    @property
    def tr(self) -> float:
        """Achieved token reduction ``1 - cache_len / n_seen``."""
        return 1.0 - self.cache_len / self.n_seen if self.n_seen else 0.0


def policy_generate(lm, prompt_ids: list[int], policy: KVPolicy, sampling: SamplingConfig | None = None,
                    schedule: str = "fixed", prefill: str = "full") -> PolicyGeneration:
    """Decode one prompt while ``policy`` evicts the KV cache: :func:`policy_generate_batch` with one row."""
    return policy_generate_batch(lm, [prompt_ids], policy, sampling, schedule, prefill)[0]


@torch.no_grad()
def policy_generate_batch(lm, prompts: list[list[int]], policy: KVPolicy, sampling: SamplingConfig | None = None,
                          schedule: str = "fixed", prefill: str = "full",
                          ratios: list[float] | None = None) -> list[PolicyGeneration]:
    """Decode a batch of prompts while ``policy`` evicts each row's KV cache.

    Parameters
    ----------
    lm : a Hugging Face causal LM in eval mode with a full-attention ``DynamicCache`` (eager
        attention for policies with ``needs_attentions``, e.g. H2O).
    prompts : B prompts, token ids, each non-empty; lengths may differ (they are left-padded).
    policy : the KV policy (its per-batch state is reset here).
    sampling : decoding settings (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``seed``, ``eos_token_id``); default greedy, 64 tokens, no EOS.
        ``stop_strings`` are not supported here (they need a tokenizer).
    schedule : ``"fixed"`` (budget from ``L + max_new_tokens``), ``"proportional"`` or ``"prompt"``.
    prefill : ``"full"``: one forward over the padded prompts with full attention, then one eviction
        to the budget (how the H2O reference implementation prefills; H2O scores the prompt with all
        its queries); ``"step"``: one column per forward with an eviction after each, so later
        prompt tokens already see the evicted cache (exactly :func:`policy_nll`'s pattern,
        max L forwards).
    ratios : [B] target TR of each row (default: ``policy.ratio`` for all).

    Returns
    -------
    B :class:`PolicyGeneration`, in prompt order: the new ids and the achieved TR.
    """
    cfg = sampling or SamplingConfig()
    if cfg.stop_strings:
        raise UserError("policy_generate does not support stop_strings; cut the decoded text instead")
    if prefill not in PREFILLS:
        raise UserError(f"unknown prefill {prefill!r}; choose from {PREFILLS}")
    if schedule not in SCHEDULES:
        raise UserError(f"unknown budget schedule {schedule!r}; choose from {SCHEDULES}")
    if not prompts:
        raise UserError("prompts: give at least one prompt")
    ratios = [policy.ratio] * len(prompts) if ratios is None else [check_ratio(r) for r in ratios]
    if len(ratios) != len(prompts):
        raise UserError(f"{len(prompts)} prompts but {len(ratios)} ratios: give one target TR per prompt")
    context = model_context(lm)
    lens = []
    for b, p in enumerate(prompts):
        ids = torch.as_tensor(list(p), dtype=torch.long)
        if ids.ndim != 1 or len(ids) == 0:
            raise UserError(f"prompt {b}: prompt_ids must be a non-empty list of token ids, got shape "
                            f"{tuple(ids.shape)}")
        if context and len(ids) > context:
            raise UserError(f"prompt {b} has {len(ids)} tokens; the model's context is {context}: shorten it")
        lens.append(len(ids))
    B, S, dev = len(prompts), max(lens), lm.device
    ids = torch.zeros(B, S, dtype=torch.long)
    at = torch.full((B, S), -1, dtype=torch.long)  # original position of each column, -1: left padding
    for b, p in enumerate(prompts):
        ids[b, S - lens[b] :] = torch.as_tensor(list(p))
        at[b, S - lens[b] :] = torch.arange(lens[b])
    ids, at = ids.to(dev), at.to(dev)
    n_total = [L if schedule == "prompt" else L + cfg.max_new_tokens for L in lens]  # what KVPolicy.budget reads
    pick, stop = TokenPicker(cfg), StopCheck(cfg, context)

    cache = DynamicCache(config=lm.config)
    pos: dict[int, torch.Tensor] = {}  # layer -> [B, H_kv, T] original position of each slot, -1: padding
    mask = torch.zeros(B, 0, dtype=torch.long, device=dev)  # [B, T] 1 on real slots (the same in every layer)
    held = [0] * B
    policy.reset()
    want_attn = policy.needs_attentions

    def feed(tokens: torch.Tensor, new_pos: torch.Tensor, seen: list[int]) -> torch.Tensor:
        """Feed ``tokens`` [B, Q] at original positions ``new_pos`` [B, Q] (-1: padding), evict each row
        to its budget after ``seen[b]`` tokens; [B, V] logits of the last column."""
        nonlocal mask, held
        real = new_pos >= 0
        out = lm(input_ids=tokens, attention_mask=torch.cat([mask, real.long()], 1),
                 position_ids=new_pos.clamp(min=0), **cache_kwargs(lm, cache), use_cache=True,
                 output_attentions=want_attn, logits_to_keep=1)
        budget = [policy.budget(n, t, schedule, r) if n else 0 for n, t, r in zip(seen, n_total, ratios)]
        held = evict(cache, pos, policy, new_pos, budget, out.attentions if want_attn else None)
        mask = (pos[0][:, 0] >= 0).long()
        return out.logits[:, -1].float()

    if prefill == "full":
        logits = feed(ids, at, lens)
    else:
        for t in range(S):
            logits = feed(ids[:, t : t + 1], at[:, t : t + 1], [max(0, L - S + t + 1) for L in lens])

    generated: list[list[int]] = [[] for _ in prompts]
    reasons = [stop([], L) for L in lens]  # "context" when the prompt fills it
    prev = ids[:, -1:]
    while not all(reasons):
        y = pick(prev, logits)  # [B]; a finished row's token is a dummy, fed as padding
        y_list, live = y.tolist(), [r is None for r in reasons]
        for b in range(B):
            if live[b]:
                generated[b].append(y_list[b])
                reasons[b] = stop(generated[b], lens[b] + len(generated[b]))
        seen = [L + len(g) for L, g in zip(lens, generated)]
        new_pos = torch.tensor([[n - 1 if v else -1] for n, v in zip(seen, live)], device=dev)
        logits = feed(y[:, None], new_pos, seen)  # the last token is fed too: the cache covers the text
        prev = y[:, None]
    if B > 1 and int(mask.sum()) < mask.numel():  # finished rows left padding behind: gather each row's slots
        compact(cache, pos, policy, held)
    return [PolicyGeneration(generated_ids=g[:-1] if r == "eos" else g, n_prompt=L, n_seen=L + len(g),
                             cache_len=h, stop_reason=r)
            for g, L, h, r in zip(generated, lens, held, reasons)]


@contextlib.contextmanager
def eager_attention(lm, needed: bool = True):
    """Switch ``lm`` to eager attention for the block (only eager returns attention weights, which
    H2O reads), then restore the previous implementation. Eager and fused kernels agree to float
    rounding only, so greedy texts can differ in rare near-ties."""
    old = getattr(lm.config, "_attn_implementation", None)
    switch = needed and old != "eager"
    if switch:
        lm.set_attn_implementation("eager")
    try:
        yield lm
    finally:
        if switch and old is not None:
            lm.set_attn_implementation(old)
