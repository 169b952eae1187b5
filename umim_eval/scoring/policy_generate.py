"""Decoding under an evicting KV cache, so KV policies generate text at a controlled TR.

The prompt is prefilled (in one forward, or one token per step), then tokens are decoded one per
step; after every forward the policy evicts the cache down to its budget with the same mechanics
as scoring (:func:`umim_eval.scoring.policy_nll.evict`). Every token keeps its original position,
so at ratio 0 nothing is evicted and the tokens equal Hugging Face ``generate`` (greedy, or sampled
from the same global RNG state).

The last sampled token is fed too (one extra forward, as in :meth:`umim.inference.generation.MergedLM.generate`),
so the final cache covers the whole text and the TR is measured like UMIM's
``1 - kv_len_final / kv_len_unmerged``: ``1 - cache entries / tokens seen`` with
``tokens seen = prompt + generated`` (EOS included when it stopped the text).

Budget schedules (:meth:`~umim_eval.methods.base.KVPolicy.budget`):

* ``fixed`` (default): one cache size, ``(1 - ratio)`` of ``prompt + max_new_tokens``: the paper's
  StreamingLLM setup, where the window is a share of the prompt plus generation length. The TR
  hits the target when the text runs to ``max_new_tokens``; a text that stops early at EOS has seen
  fewer tokens than the budget was sized for, so its TR is lower.
* ``proportional``: ``(1 - ratio)`` of the tokens seen so far, at every step.
* ``prompt``: only the prompt is reduced, by ``round(ratio * L)`` entries; every generated token
  then adds one entry, so the cache always holds what a prompt merged to TR ``ratio`` would
  (the matched-TR runners use this: the generation is never reduced, for any method).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from umim.inference.decoding import StopCheck, TokenPicker
from umim.inference.generation import SamplingConfig
from umim.lm import cache_kwargs
from umim_eval.methods.base import KVPolicy, model_context
from umim_eval.scoring.policy_nll import evict

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


@torch.no_grad()
def policy_generate(lm, prompt_ids: list[int], policy: KVPolicy, sampling: SamplingConfig | None = None,
                    schedule: str = "fixed", prefill: str = "full") -> PolicyGeneration:
    """Decode one prompt while ``policy`` evicts the KV cache.

    Parameters
    ----------
    lm : a Hugging Face causal LM in eval mode with a full-attention ``DynamicCache`` (eager
        attention for policies with ``needs_attentions``, e.g. H2O).
    prompt_ids : [L] token ids of one prompt, L >= 1 (one row: every row would evict differently).
    policy : the KV policy; its ``ratio`` is the target TR.
    sampling : decoding settings (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``seed``, ``eos_token_id``); default greedy, 64 tokens, no EOS.
        ``stop_strings`` are not supported here (they need a tokenizer).
    schedule : ``"fixed"`` (budget from ``L + max_new_tokens``), ``"proportional"`` or ``"prompt"``.
    prefill : ``"full"``: one forward over the prompt with full attention, then one eviction to
        the budget (how the H2O reference implementation prefills; H2O scores the prompt with all
        its queries); ``"step"``: one token per forward with an eviction after each, so later
        prompt tokens already see the evicted cache (exactly :func:`policy_nll`'s pattern, L
        forwards).

    Returns
    -------
    :class:`PolicyGeneration`: the new ids and the achieved TR.
    """
    cfg = sampling or SamplingConfig()
    if cfg.stop_strings:
        raise ValueError("policy_generate does not support stop_strings; cut the decoded text instead")
    if prefill not in PREFILLS:
        raise ValueError(f"unknown prefill {prefill!r}; choose from {PREFILLS}")
    ids = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError(f"prompt_ids must be a non-empty list of token ids, got shape {tuple(ids.shape)}")
    L, dev = len(ids), lm.device
    context = model_context(lm)
    if context and L > context:
        raise ValueError(f"prompt has {L} tokens; the model's context is {context}")
    n_total = L if schedule == "prompt" else L + cfg.max_new_tokens  # what KVPolicy.budget reads
    pick, stop = TokenPicker(cfg), StopCheck(cfg, context)

    cache = DynamicCache(config=lm.config)
    pos: dict[int, torch.Tensor] = {}  # layer -> [1, H_kv, T] original position of each slot
    policy.reset()
    want_attn = policy.needs_attentions

    def feed(chunk: torch.Tensor, start: int) -> torch.Tensor:
        """Feed tokens at original positions ``start ..``, evict; [V] logits of the last one."""
        q = len(chunk)
        T = cache.get_seq_length()
        out = lm(input_ids=chunk[None].to(dev), attention_mask=torch.ones(1, T + q, dtype=torch.long, device=dev),
                 position_ids=torch.arange(start, start + q, device=dev)[None], **cache_kwargs(lm, cache),
                 use_cache=True, output_attentions=want_attn, logits_to_keep=1)
        evict(cache, pos, policy, torch.arange(start, start + q), policy.budget(start + q, n_total, schedule),
              out.attentions if want_attn else None)
        return out.logits[0, -1].float()

    if prefill == "full":
        logits = feed(ids, 0)
    else:
        for t in range(L):
            logits = feed(ids[t : t + 1], t)

    generated: list[int] = []
    prev = ids[-1:].to(dev)
    reason = stop(generated, L)  # "context" when the prompt fills it
    while reason is None:
        y = int(pick(prev[None], logits[None])[0])
        generated.append(y)
        t = L + len(generated) - 1  # y's position
        logits = feed(torch.tensor([y]), t)  # the last token is fed too: the cache covers the text
        prev = torch.tensor([y], device=dev)
        reason = stop(generated, t + 1)
    n_seen = L + len(generated)
    kept = generated[:-1] if reason == "eos" else generated
    return PolicyGeneration(generated_ids=kept, n_prompt=L, n_seen=n_seen, cache_len=cache.get_seq_length(),
                            stop_reason=reason)


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
