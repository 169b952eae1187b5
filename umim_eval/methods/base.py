"""The one contract every context-reduction method implements, and the one knob they share.

Every method (kvpress-style: one small class per method) carries its ``name`` (the registry key),
``label`` (its row in result tables), ``kind`` and its knob ``ratio``, the target token reduction (TR)
always measured in the target LM's own tokens (``None``: the method's TR is fixed, e.g. UMIM's
rules or the base LM). It is built from a loaded run with :meth:`Method.from_run` and implements the
two operations every runner needs: :meth:`Method.score_continuation` (NLL of a continuation after
the reduced context) and :meth:`Method.generate` (texts from reduced prompts). Three kinds
(paper Sec. 4.4, App. F.2):

* :class:`PromptCompressor` (Select Context, LLMLingua): drops prompt tokens before the LM runs;
  ``TR = 1 - kept / original`` prompt tokens (:attr:`CompressedPrompt.tr`).
* :class:`PromptMerger` (UMIM, K-Token Merging, QuickMerge++): replaces contiguous groups of
  prompt tokens by one embedding each; ``TR = 1 - elements / original`` (:attr:`MergedPrompt.tr`).
* :class:`KVPolicy` (StreamingLLM, H2O): the LM sees every token, but the KV cache evicts entries
  down to a budget after every step; ``TR = 1 - cache entries / tokens seen``, the same ratio as
  UMIM's ``GenerationResult.token_reduction`` (``1 - kv_len_final / kv_len_unmerged``).

Methods whose native knob is not in tokens (an LLMLingua rate, a self-information threshold) are
driven to a target TR with :func:`umim_eval.methods.match_tr.match_tr`. A new method is one file
with one class plus one line in :data:`umim_eval.methods.registry.METHODS`.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from umim.errors import UserError
from umim_eval.scoring.prompt_inputs import (
    PromptInputs,
    continuation_logits,
    generate_from,
)
from umim_eval.scoring.token_nll import token_nll

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
class ContinuationScore:
    """A continuation scored after a reduced context."""

    nll: torch.Tensor
    """[C] float64 NLL (nats) of each continuation token."""
    tr: float
    """Achieved TR on the context (removed positions or evicted entries / context tokens)."""
    n_fed: int
    """Context positions the LM was fed (or cache entries it kept)."""
    greedy: bool | None = None
    """Every continuation token is the argmax (None where the method does not expose logits)."""


@dataclass
class Generated:
    """One generated text and the TR it was generated at."""

    ids: list[int]
    """New token ids (EOS excluded)."""
    tr: float
    """Achieved TR on the prompt scale: removed prompt positions (or evicted entries) / prompt tokens."""


def model_context(lm) -> int:
    """The LM's context in positions (0 when its config does not say)."""
    return int(getattr(lm.config, "max_position_embeddings", 0) or getattr(lm.config, "n_positions", 0) or 0)


class Method(ABC):
    """A context-reduction method (see the module docstring)."""

    name: ClassVar[str]
    """Registry key, e.g. ``"h2o"``."""
    label: ClassVar[str]
    """Row label in result tables, e.g. ``"H2O"``."""
    kind: ClassVar[str]
    """``"prompt_compressor"``, ``"prompt_merger"`` or ``"kv_policy"``."""
    needs_attentions: ClassVar[bool] = False
    """True: the LM runs with eager attention while the method reads attention weights."""
    fixed_tr: ClassVar[bool] = False
    """True: the method has no TR knob (the base LM, UMIM's fixed rules); runners report the TR it
    achieves as its target."""
    uses_merging: ClassVar[bool] = False
    """True: built on the run's merger and rules (UMIM's own methods)."""
    ratio: float | None
    """The knob: target TR in [0, 1); ``None`` when the method's TR is fixed."""

    @classmethod
    def from_run(cls, run, ratio: float = 0.0, **options) -> Method:
        """Build for a loaded run (:class:`umim.inference.generation.MergedLM`: target LM, tokenizer,
        and merger + rules when it has them) at target TR ``ratio``."""
        return cls(ratio=ratio, **options)

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Refuse unknown options (and missing trained folders) before any model is loaded."""
        taken = sorted(set(options) & {"run", "ratio", "merged_lm"})
        if taken:
            raise UserError(f"method_options of {cls.name!r}: {taken[0]} is set by the runner (its targets, match "
                            "or ratio setting), not per method")
        known = set(inspect.signature(cls.from_run if "from_run" in cls.__dict__ else cls).parameters)
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserError(f"method_options of {cls.name!r}: unknown option(s) {unknown}")

    def aim(self, ratio: float) -> None:
        """Re-aim at target TR ``ratio`` (a method with a fixed TR ignores it)."""
        if self.ratio is not None:
            self.ratio = float(ratio)

    def tr_shortfall(self, n: int, ratio: float) -> float:
        """How far the achieved TR may miss ``ratio`` on an ``n``-token prompt beyond 2 points (0: the
        method hits its target). A method that searches its native knob for the TR (LLMLingua keeps
        or drops whole words, so the TR moves in steps of a word's tokens) states its accepted miss
        as a ``tr_tolerance`` option."""
        return max(getattr(self, "tr_tolerance", 0.02) - 0.02, 0.0)

    @abstractmethod
    def score_continuation(self, run, context: list[int], target: list[int]) -> ContinuationScore:
        """The target tokens' NLL after the reduced ``context`` (targets fed unreduced, one position each)."""

    @abstractmethod
    def generate(self, run, prompts: list[list[int]], targets: list[float], sampling, n_samples: int = 1,
                 batch_size: int = 1, kv_prefill: str = "full", progress: bool = False) -> list[list[Generated]]:
        """``n_samples`` texts per prompt, prompt ``i`` reduced to TR ``targets[i]``; [N][n_samples].

        With ``sampling.do_sample`` and a ``seed``, the RNG is reseeded per batch: batch ``k`` (texts ``k ..``
        in prompt-major order) starts from ``seed + k``, so methods see the same random stream."""


class PromptMethod(Method):
    """A method that changes the prompt (drops or merges tokens); the LM then runs unchanged."""

    @abstractmethod
    def inputs(self, lm, tokenizer, prompt_ids: list[int]) -> PromptInputs:
        """[S, d] embeddings the LM is fed for one prompt, plus its original length."""

    def _inputs(self, run, prompt_ids: list[int]) -> PromptInputs:
        """:meth:`inputs` under eager attention when needed; the last result is kept, because the
        options of one question share their context (the key is the prompt, ``ratio`` and the LM:
        re-aim with :meth:`aim`, not by changing other settings of a built method)."""
        key = (tuple(prompt_ids), self.ratio, id(run.lm))
        if getattr(self, "_last", (None,))[0] != key:
            if not prompt_ids:
                raise UserError("empty prompt: give at least one token")
            from umim_eval.scoring.policy_generate import eager_attention

            with eager_attention(run.lm, self.needs_attentions), torch.no_grad():
                self._last = (key, self.inputs(run.lm, run.tokenizer, list(prompt_ids)))
        return self._last[1]

    def score_continuation(self, run, context: list[int], target: list[int]) -> ContinuationScore:
        inp = self._inputs(run, context)
        logits = continuation_logits(run.lm, inp, target)
        tgt = torch.tensor(list(target), device=logits.device)
        return ContinuationScore(token_nll(logits, tgt).cpu(), inp.tr, inp.n_fed,
                                 bool((logits.argmax(-1) == tgt).all()))

    def generate(self, run, prompts, targets, sampling, n_samples=1, batch_size=1, kv_prefill="full",
                 progress=False):
        from tqdm.auto import tqdm

        G, context, eos = sampling.max_new_tokens, model_context(run.lm), sampling.eos_token_id
        inputs = []
        for i, (p, t) in enumerate(zip(prompts, targets)):
            self.aim(t)
            inp = self._inputs(run, p)
            if context and inp.n_fed + G > context:
                raise UserError(f"prompt {i}: {inp.n_fed} positions + {G} new exceed the model's context {context}")
            inputs.append(inp)
        out: list[list[Generated]] = [[] for _ in prompts]
        items = [(i, s) for i in range(len(prompts)) for s in range(n_samples)]
        tok = run.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if isinstance(eos, int) else None)
        for b in tqdm(range(0, len(items), batch_size), desc=self.name, disable=not progress, leave=False):
            chunk = items[b : b + batch_size]
            if sampling.do_sample and sampling.seed is not None:
                torch.manual_seed(sampling.seed + b)
            texts = generate_from(run.lm, [inputs[i] for i, _ in chunk], G, do_sample=sampling.do_sample,
                                  temperature=sampling.temperature, top_p=sampling.top_p, eos_token_id=eos,
                                  pad_token_id=pad)
            for (i, _), ids in zip(chunk, texts):
                out[i].append(Generated(ids, inputs[i].tr))
        return out


class PromptCompressor(PromptMethod):
    """Drops prompt tokens; ``ratio`` is the fraction of the prompt's LM tokens to remove."""

    name: ClassVar[str] = "prompt-compressor"
    kind: ClassVar[str] = "prompt_compressor"
    ratio: float

    @abstractmethod
    def compress(self, lm, tokenizer, prompt_ids: list[int]) -> CompressedPrompt:
        """Compress one prompt (token ids of ``lm``'s tokenizer) to about ``(1 - ratio)`` of its tokens."""

    def inputs(self, lm, tokenizer, prompt_ids: list[int]) -> PromptInputs:
        kept = self.compress(lm, tokenizer, list(prompt_ids)).ids
        with torch.no_grad():
            embeds = lm.get_input_embeddings()(torch.tensor(kept, device=lm.device))
        return PromptInputs(embeds=embeds, n_original=len(prompt_ids))


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


class PromptMerger(PromptMethod):
    """Merges contiguous prompt tokens into single embeddings; ``ratio`` is the target TR
    (``None`` for methods whose TR is fixed by their rules, e.g. UMIM with its mined rules)."""

    name: ClassVar[str] = "prompt-merger"
    kind: ClassVar[str] = "prompt_merger"
    ratio: float | None

    @abstractmethod
    def merge(self, lm, tokenizer, prompt_ids: list[int]) -> MergedPrompt:
        """Merge one prompt (token ids of ``lm``'s tokenizer). Never merges across padding: the
        input is one unpadded prompt."""

    def inputs(self, lm, tokenizer, prompt_ids: list[int]) -> PromptInputs:
        mp = self.merge(lm, tokenizer, list(prompt_ids))
        dtype = lm.get_input_embeddings().weight.dtype
        return PromptInputs(embeds=mp.embeds.to(device=lm.device, dtype=dtype), n_original=len(prompt_ids))


class KVPolicy(Method):
    """Evicts KV-cache entries; ``ratio`` is the fraction of seen tokens NOT held in the cache.

    The drivers (:func:`umim_eval.scoring.policy_nll.policy_nll` for scoring,
    :func:`umim_eval.scoring.policy_generate.policy_generate_batch` for decoding) feed tokens, then
    ask the policy which slots to keep whenever a row of the cache is over budget. Slots carry their
    original positions (``pos``), so policies reason in positions, not in slot numbers; a slot with
    position -1 is padding (a batch's rows hold different numbers of entries in one rectangular
    cache). A policy gives each slot a :meth:`priority`; :meth:`keep` keeps each row's top ones.
    Runners use the ``prompt`` budget schedule: only the context is reduced, by
    ``round(ratio * P)`` entries, and every later token adds one entry, so each continuation token
    sees as many entries as after a context reduced to TR ``ratio``.
    """

    name: ClassVar[str] = "kv-policy"
    kind: ClassVar[str] = "kv_policy"
    needs_attentions: ClassVar[bool] = False
    """True: the driver passes each step's attention weights to :meth:`observe` (eager attention)."""
    content_free: ClassVar[bool] = False
    """True: :meth:`priority` looks at positions only, so the whole eviction pattern is known in
    advance and a text can be scored in ONE forward with a 4-D mask."""
    ratio: float

    def budget(self, n_seen: int, n_total: int | None = None, schedule: str = "proportional",
               ratio: float | None = None) -> int:
        """Cache entries allowed after ``n_seen`` tokens, at target TR ``ratio`` (default :attr:`ratio`;
        a batch decodes each row at its own target).

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
        ratio = self.ratio if ratio is None else ratio
        if schedule == "proportional":
            raw = n_seen - n_removed(ratio, n_seen)
        elif schedule == "fixed":
            if n_total is None:
                raise UserError("the fixed schedule needs n_total")
            raw = n_total - n_removed(ratio, n_total)
        elif schedule == "prompt":
            if n_total is None:
                raise UserError("the prompt schedule needs n_total = the prompt length")
            raw = n_seen - n_removed(ratio, min(n_seen, n_total))
        else:
            raise UserError(f"unknown budget schedule {schedule!r}; choose from {SCHEDULES}")
        return min(n_seen, max(raw, self.min_entries))

    def score_continuation(self, run, context: list[int], target: list[int]) -> ContinuationScore:
        from umim_eval.scoring.policy_generate import eager_attention
        from umim_eval.scoring.policy_nll import policy_nll

        if not context or not target:
            raise UserError("need a non-empty context and a non-empty target")
        P, C = len(context), len(target)
        with eager_attention(run.lm, self.needs_attentions):
            r = policy_nll(run.lm, list(context) + list(target), self, schedule="prompt", prompt_len=P)
        evicted = (P + C - 1) - int(r.cache_len[-1])
        return ContinuationScore(r.token_nll[0, P:], evicted / P, P - evicted)

    def generate(self, run, prompts, targets, sampling, n_samples=1, batch_size=8, kv_prefill="full",
                 progress=False):
        """Texts decoded under eviction, ``batch_size`` texts per batched decode
        (:func:`~umim_eval.scoring.policy_generate.policy_generate_batch`, ``prompt`` schedule: the
        prompt reduced by its target, the generation kept), each row at its own target. With
        ``sampling.do_sample`` and a ``seed``, batch ``k`` (texts ``k .. k + batch_size - 1`` in
        prompt-major order) is decoded from ``seed + k``; with ``batch_size=1`` that is one seed per text.
        H2O's ``full`` prefill holds every layer's [B, H, S, S] attention weights at once: lower
        ``batch_size`` for long prompts."""
        from dataclasses import replace

        from tqdm.auto import tqdm

        from umim_eval.scoring.policy_generate import eager_attention, policy_generate_batch

        if type(batch_size) is not int or batch_size < 1:
            raise UserError(f"batch_size {batch_size!r}: give a positive number of texts per batch")
        if len(targets) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(targets)} targets")
        G, context = sampling.max_new_tokens, model_context(run.lm)
        for i, p in enumerate(prompts):
            if not p:
                raise UserError(f"prompt {i} is empty: give at least one token")
            if context and len(p) + G > context:
                raise UserError(f"prompt {i}: {len(p)} tokens + {G} new exceed the model's context {context}")
        targets = [check_ratio(t) for t in targets]
        items = [(i, s) for i in range(len(prompts)) for s in range(n_samples)]
        out: list[list[Generated]] = [[] for _ in prompts]
        with eager_attention(run.lm, self.needs_attentions):
            for k in tqdm(range(0, len(items), batch_size), desc=self.name, disable=not progress, leave=False):
                chunk = items[k : k + batch_size]
                cfg = replace(sampling, seed=None if sampling.seed is None else sampling.seed + k)
                rows = policy_generate_batch(run.lm, [prompts[i] for i, _ in chunk], self, cfg, schedule="prompt",
                                             prefill=kv_prefill, ratios=[targets[i] for i, _ in chunk])
                for (i, _), r in zip(chunk, rows):
                    out[i].append(Generated(r.generated_ids, (r.n_seen - r.cache_len) / len(prompts[i])))
        return out

    @property
    def min_entries(self) -> int:
        """Smallest cache the method is defined for (the budget never goes below it); only the
        first few steps of a text are affected."""
        return 1

    def reset(self) -> None:
        """Forget per-batch state before a new batch of texts."""

    def observe(self, layer: int, attn: torch.Tensor, pos: torch.Tensor) -> None:
        """Attention weights ``attn`` [B, H, Q, T] of ``layer`` over its T slots (the new ones included),
        whose original positions are ``pos`` [B, H_kv, T] (H is a multiple of H_kv under GQA; -1 marks
        padding). The driver zeroes the weights of padding queries and keys, so padding adds nothing."""

    @abstractmethod
    def priority(self, layer: int, pos: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
        """How much each slot of ``layer`` deserves to stay: higher stays first.

        Parameters
        ----------
        layer : decoder layer index.
        pos : [B, H_kv, T] long, original position of each cached slot, ascending along T over a
            row's real slots; -1 for padding slots (they are never kept, whatever their priority).
        n_keep : [B] long, entries row b keeps (a policy may depend on it, e.g. H2O's recent window).

        Returns
        -------
        [B, H_kv, T] priorities (any real or integer dtype); ties between slots must not matter.
        """

    def keep(self, layer: int, pos: torch.Tensor, n_keep: int | torch.Tensor) -> torch.Tensor:
        """Slots of ``layer`` to keep: row b's ``n_keep[b]`` real slots of highest :meth:`priority`.

        Parameters
        ----------
        layer : decoder layer index.
        pos : [B, H_kv, T] long, original positions (-1: padding), see :meth:`priority`.
        n_keep : int, or [B] per row (a list or a long tensor), at most the row's real slots.

        Returns
        -------
        [B, H_kv, K] long slot indices, K = max n_keep. Row b's LAST ``n_keep[b]`` entries are its
        kept slots in ascending (position) order; its first ``K - n_keep[b]`` entries are padding
        (some slot of the row, to be masked out), so a gathered row stays left-padded.
        """
        # K from host values where given: reading it off a device tensor would sync once per layer
        k_max = n_keep if isinstance(n_keep, int) else max(n_keep) if isinstance(n_keep, (list, tuple)) else None
        n_keep = torch.as_tensor(n_keep, dtype=torch.long, device=pos.device).expand(pos.shape[0])
        return keep_top(self.priority(layer, pos, n_keep), pos, n_keep, k_max)


def keep_top(priority: torch.Tensor, pos: torch.Tensor, n_keep: torch.Tensor, K: int | None = None) -> torch.Tensor:
    """Each row's ``n_keep[b]`` real slots of highest ``priority`` [B, H_kv, T], in slot order after
    ``K - n_keep[b]`` padding entries; [B, H_kv, K], K = max n_keep (see :meth:`KVPolicy.keep`; pass
    ``K`` when it is known on the host)."""
    low = -torch.inf if priority.is_floating_point() else torch.iinfo(priority.dtype).min
    K = int(n_keep.max()) if K is None else K
    top = priority.masked_fill(pos < 0, low).topk(K, dim=-1).indices  # [B, H_kv, K], best first
    kept = torch.arange(K, device=pos.device) < n_keep[:, None, None]
    # sort key: -1 for the entries row b does not keep (they go first), the slot index otherwise
    order = torch.where(kept, top, -1).sort(dim=-1).indices
    return top.gather(-1, order)
