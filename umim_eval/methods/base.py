"""The one interface every context-reduction baseline implements, and the one knob they share.

Two kinds of baselines (paper Sec. 4.4, App. F.2) are compared with UMIM at a matched token
reduction (TR), always measured in the target LM's own tokens:

* :class:`PromptCompressor` (Select Context, LLMLingua): drops prompt tokens before the LM runs;
  ``TR = 1 - kept / original`` prompt tokens (:attr:`CompressedPrompt.tr`).
* :class:`PromptMerger` (UMIM, K-Token Merging, QuickMerge++): replaces contiguous groups of
  prompt tokens by one embedding each; ``TR = 1 - elements / original`` (:attr:`MergedPrompt.tr`).
* :class:`KVPolicy` (StreamingLLM, H2O): the LM sees every token, but the KV cache evicts entries
  down to a budget after every step; ``TR = 1 - cache entries / tokens seen``, the same ratio as
  UMIM's ``GenerationResult.token_reduction`` (``1 - kv_len_final / kv_len_unmerged``).

Both carry the same single knob, ``ratio``: the target TR. Methods whose native knob is not in
tokens (an LLMLingua rate, a self-information threshold) are driven to a target TR with
:func:`umim_eval.methods.match_tr.match_tr`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from umim.errors import UserError

SCHEDULES = ("proportional", "fixed", "prompt")


def check_ratio(ratio: float) -> float:
    """The target TR must lie in [0, 1): 1 would leave nothing to condition on."""
    if not 0.0 <= float(ratio) < 1.0:
        raise UserError(f"ratio (target token reduction) must be in [0, 1), got {ratio}")
    return float(ratio)


def n_removed(ratio: float, n: int) -> int:
    """Tokens to remove from ``n`` for a target TR: ``round(ratio * n)``, at most ``n - 1``.

    Rounding (not flooring) keeps the TR averaged over many lengths unbiased; one token always
    stays so the LM has something to attend to.
    """
    return min(int(math.floor(ratio * n + 0.5)), max(n - 1, 0))


def achieved_tr(n_kept: int, n_original: int) -> float:
    """``1 - n_kept / n_original`` (0 for an empty input)."""
    return 1.0 - n_kept / n_original if n_original else 0.0


@dataclass
class CompressedPrompt:
    """A prompt after token dropping."""

    ids: list[int]
    """The kept token ids, in their original order (what the LM is fed)."""
    kept: list[int] | None
    """[n_kept] original indices of the kept tokens, ascending; ``None`` when the output is not
    index-aligned with the prompt (a method that edits text and re-tokenizes it, e.g. LLMLingua-2)."""
    n_original: int
    """Length of the prompt before compression."""

    @property
    def tr(self) -> float:
        return achieved_tr(len(self.ids), self.n_original)


@dataclass
class Scored:
    """One row of a matched-TR comparison: what was asked, what was achieved, and the score."""

    method: str
    target_tr: float
    achieved_tr: float
    score: float


class PromptCompressor(ABC):
    """Drops prompt tokens; ``ratio`` is the fraction of the prompt's LM tokens to remove."""

    name: ClassVar[str] = "prompt-compressor"
    ratio: float

    @abstractmethod
    def compress(self, lm, tokenizer, prompt_ids: list[int]) -> CompressedPrompt:
        """Compress one prompt (token ids of ``lm``'s tokenizer) to about ``(1 - ratio)`` of its tokens."""


@dataclass
class MergedPrompt:
    """A prompt after merging contiguous token groups into single embeddings."""

    embeds: torch.Tensor
    """[S, d] what the LM is fed (the LM's embedding dtype and device), in sequence order."""
    segments: list[tuple[int, int]]
    """[S] ``(start, length)`` of the original tokens behind each element; they tile the prompt in order."""
    n_original: int
    """Length of the prompt before merging."""

    @property
    def tr(self) -> float:
        return achieved_tr(len(self.segments), self.n_original)


class PromptMerger(ABC):
    """Merges contiguous prompt tokens into single embeddings; ``ratio`` is the target TR
    (``None`` for methods whose TR is fixed by their rules, e.g. UMIM with its mined rules)."""

    name: ClassVar[str] = "prompt-merger"
    ratio: float | None

    @abstractmethod
    def merge(self, lm, tokenizer, prompt_ids: list[int]) -> MergedPrompt:
        """Merge one prompt (token ids of ``lm``'s tokenizer). Never merges across padding: the
        input is one unpadded prompt."""


class KVPolicy(ABC):
    """Evicts KV-cache entries; ``ratio`` is the fraction of seen tokens NOT held in the cache.

    The driver (:func:`umim_eval.scoring.policy_nll.policy_nll`) feeds one token per step, then
    asks the policy which slots to keep whenever the cache is over budget. Slots carry their
    original positions (``pos``), so policies reason in positions, not in slot numbers.
    """

    name: ClassVar[str] = "kv-policy"
    needs_attentions: ClassVar[bool] = False
    """True: the driver passes each step's attention weights to :meth:`observe` (eager attention)."""
    content_free: ClassVar[bool] = False
    """True: :meth:`keep` looks at positions only, so the whole eviction pattern is known in
    advance and a text can be scored in ONE forward with a 4-D mask."""
    ratio: float

    def budget(self, n_seen: int, n_total: int | None = None, schedule: str = "proportional") -> int:
        """Cache entries allowed after ``n_seen`` tokens.

        ``proportional``: ``n_seen - round(ratio * n_seen)`` at every step, so the cache is always
        about ``(1 - ratio)`` of the text so far, like UMIM's dynamic merging (but never below
        :attr:`min_entries`).
        ``fixed``: one size for the whole text, ``n_total - round(ratio * n_total)``, as in the
        paper's StreamingLLM setup (window sized from prompt + generation length); early steps
        are then uncompressed.
        ``prompt``: ``n_total`` is the PROMPT length P; the prompt is reduced proportionally while
        it is read (``round(ratio * seen)`` entries evicted), and after it the cache keeps that
        deficit of ``round(ratio * P)`` entries while the continuation grows it one entry per
        token — the cache a prompt merged or compressed to TR ``ratio`` would hold, at every step.
        """
        if schedule == "proportional":
            raw = n_seen - n_removed(self.ratio, n_seen)
        elif schedule == "fixed":
            if n_total is None:
                raise UserError("the fixed schedule needs n_total")
            raw = n_total - n_removed(self.ratio, n_total)
        elif schedule == "prompt":
            if n_total is None:
                raise UserError("the prompt schedule needs n_total = the prompt length")
            raw = n_seen - n_removed(self.ratio, min(n_seen, n_total))
        else:
            raise UserError(f"unknown budget schedule {schedule!r}; choose from {SCHEDULES}")
        return min(n_seen, max(raw, self.min_entries))

    @property
    def min_entries(self) -> int:
        """Smallest cache the method is defined for (the budget never goes below it); only the
        first few steps of a text are affected."""
        return 1

    def reset(self) -> None:
        """Forget per-text state before a new text."""

    def observe(self, layer: int, attn: torch.Tensor, pos: torch.Tensor) -> None:
        """Attention weights ``attn`` [B, H, Q, T] of ``layer`` over its T slots (the new ones included),
        whose original positions are ``pos`` [B, H_kv, T] (H is a multiple of H_kv under GQA)."""

    @abstractmethod
    def keep(self, layer: int, pos: torch.Tensor, n_keep: int) -> torch.Tensor:
        """Slots of ``layer`` to keep.

        Parameters
        ----------
        layer : decoder layer index.
        pos : [B, H_kv, T] long, original position of each cached slot (ascending along T).
        n_keep : entries to keep, ``< T``.

        Returns
        -------
        [B, H_kv, n_keep] long slot indices, ascending along the last dim (slot order = position order).
        """
