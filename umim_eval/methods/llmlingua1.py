"""LLMLingua (Jiang et al., 2023): drop the tokens a small LM finds predictable, segment by segment.

The method, as in the paper (Sec. 3, Alg. 1-2) and the ``llmlingua`` package defaults
(``compress_prompt``: ``iterative_size=200``, ``context_budget="+100"``, ranking by perplexity):

1. *Budget controller* (coarse, demonstration level). When the prompt is a list of
   demonstrations, each is scored by its perplexity under the small LM, and demonstrations are
   kept in decreasing perplexity until the token budget (``rate * n`` plus ``context_budget``
   slack tokens) is spent; they stay in their original order. The package applies this step only
   when it is given more than one context, which a single token sequence is not, so here it runs
   only when ``demo_sep`` names the separator between demonstrations.
2. *Iterative token-level compression* (fine). What is left is cut into segments of
   ``iterative_size`` small-LM tokens. Each segment is scored by the small LM *conditioned on the
   already compressed prefix* (``-log p(x_t | compressed x_<t)``), and the segment keeps its
   ``round(tau * |segment|)`` highest-loss tokens, ``tau`` = the remaining budget / the remaining
   length (the paper's per-segment threshold ``gamma_j`` picked from the segment's loss
   distribution is this top-k). The first token has no context and is always kept.

Where this differs from the package (whose LLMLingua-1 path does not run on transformers 5: it
indexes ``past_key_values`` as nested tuples, which ``DynamicCache`` no longer supports, and its
constructor downloads a tiktoken vocabulary):

* the package's keep mask is shifted by one position (token ``i`` is kept when the loss of token
  ``i + 1`` is above the threshold, and the last token is always kept); we keep token ``i`` on its
  own loss, as the paper describes;
* the package computes the threshold over the losses of the whole compressed prefix plus the
  current segment; we use the current segment's losses, so every segment gets exactly its share;
* the sentence-level filter and the question-aware (LongLLMLingua) options are off by default in
  the package and are not implemented; prompts longer than the small LM's context raise instead
  of using the package's KV-cache eviction.

The native knob, ``rate`` (kept fraction), is driven to the requested TR in the TARGET LM's
tokens by bisection (:func:`~umim_eval.methods.match_tr.match_tr`). With the default small LM
(the target LM itself) the kept tokens are index-aligned with the prompt and the count is an exact
function of ``rate``, so the bisection needs no LM call and one compression run follows. With
another small LM, the prompt is decoded, compressed in the small LM's tokens, decoded and
re-encoded by the target tokenizer; every bisection step then runs the compression.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from umim.errors import UserError
from umim.lm import cache_kwargs, output_cache
from umim_eval.methods.base import CompressedPrompt, PromptCompressor, check_ratio
from umim_eval.methods.match_tr import match_tr
from umim_eval.scoring.token_nll import token_nll


def segment_budgets(n: int, rate: float, iterative_size: int) -> list[int]:
    """Tokens kept by each ``iterative_size`` segment of an ``n``-token sequence at keep ``rate``.

    ``round(rate * |segment|)``, at least 1 in the first segment (its first token is always kept).
    """
    sizes = [min(iterative_size, n - s) for s in range(0, n, iterative_size)]
    keep = [min(sz, math.floor(rate * sz + 0.5)) for sz in sizes]
    if keep:
        keep[0] = max(keep[0], 1)
    return keep


@torch.no_grad()
def iterative_compress(lm, ids: list[int], rate: float, iterative_size: int = 200,
                       use_cache: bool = True) -> list[int]:
    """LLMLingua's iterative token-level compression of one sequence.

    Parameters
    ----------
    lm : the small causal LM whose tokens ``ids`` are.
    ids : [n] token ids.
    rate : fraction of each segment's tokens to keep, in [0, 1].
    iterative_size : segment length in tokens.
    use_cache : score each segment with the KV cache of the compressed prefix (the package's way);
        ``False`` recomputes the whole compressed prefix every segment (same result, slower).

    Returns
    -------
    [n_kept] indices into ``ids`` of the kept tokens, ascending.
    """
    n = len(ids)
    budgets = segment_budgets(n, rate, iterative_size)
    if sum(budgets) == n:
        return list(range(n))
    dev = lm.device
    kept: list[int] = []
    cache, n_cached = None, 0  # n_cached: leading entries of `kept` whose KV is in `cache`
    for s, k in zip(range(0, n, iterative_size), budgets):
        seg = list(range(s, min(n, s + iterative_size)))
        pending = kept[n_cached:] if use_cache else kept  # kept, but not yet run through the LM
        feed = torch.tensor([[ids[i] for i in pending + seg]], device=dev)
        out = lm(input_ids=feed, **cache_kwargs(lm, cache if use_cache else None), use_cache=use_cache)
        p = len(pending)
        # logits at feed position q predict position q + 1; the first token of all has no context
        loss = torch.full((len(seg),), float("inf"), dtype=torch.float64)
        lo = 1 if p == 0 else 0
        loss[lo:] = token_nll(out.logits[0, p + lo - 1 : p + len(seg) - 1], feed[0, p + lo :]).cpu()
        order = torch.sort(-loss, stable=True).indices[:k]  # highest loss first, earlier on ties
        new = sorted(seg[int(j)] for j in order)
        if use_cache:
            # keep the KV of the committed prefix; at least one kept token must stay pending so the
            # next segment's first token has a logit to be scored by
            n_cached = min(len(kept), len(kept) + len(new) - 1)
            cache = output_cache(out) if n_cached else None
            if cache is not None and cache.get_seq_length() > n_cached:
                cache.crop(n_cached - cache.get_seq_length())  # transformers 5: negative = tokens to drop
        kept += new
    return kept


def demonstration_spans(tokenizer, ids: list[int], sep: str) -> list[tuple[int, int]]:
    """Split ``ids`` into demonstrations at each occurrence of ``sep`` in the text.

    The text is the concatenation of the tokens' own decodings (so a separator may span several
    tokens); a demonstration ends after the token holding the separator's last character.

    Returns ``[(start, end)]`` half-open spans that tile ``ids`` in order.
    """
    pieces = [tokenizer.decode([t]) for t in ids]
    ends = torch.tensor([len(p) for p in pieces]).cumsum(0).tolist()  # char end of each token
    text = "".join(pieces)
    spans, start, at = [], 0, text.find(sep)
    while at >= 0 and sep:
        last = next(i for i, e in enumerate(ends) if e >= at + len(sep))
        if last + 1 > start:
            spans.append((start, last + 1))
            start = last + 1
        at = text.find(sep, at + len(sep))
    if start < len(ids):
        spans.append((start, len(ids)))
    return spans


@torch.no_grad()
def budget_controller(lm, ids: list[int], spans: list[tuple[int, int]], target_tokens: float,
                      slack: int = 100) -> list[int]:
    """LLMLingua's demonstration-level budget controller.

    Demonstrations are visited in decreasing perplexity (mean NLL of the demonstration alone under
    ``lm``) and kept until ``target_tokens + slack`` tokens are used up; the one that crosses the
    budget is kept too (as in the package).

    Returns
    -------
    Indices of the kept spans, ascending (original order).
    """
    ppl = []
    for a, b in spans:
        x = torch.tensor([ids[a:b]], device=lm.device)
        ppl.append(float(token_nll(lm(input_ids=x).logits[0, :-1], x[0, 1:]).mean()) if b - a > 1 else 0.0)
    budget, used = target_tokens + slack, []
    for i in sorted(range(len(spans)), key=lambda i: -ppl[i]):
        budget -= spans[i][1] - spans[i][0]
        used.append(i)
        if budget < 0:
            break
    return sorted(used)


@lru_cache(maxsize=2)
def _load_small_lm(name_or_path: str):
    from umim.lm import LMSpec, load_lm, load_tokenizer

    spec = LMSpec(name_or_path)
    return load_lm(spec), load_tokenizer(spec)


def leading_specials(tokenizer, ids: list[int]) -> int:
    """Number of leading special tokens (BOS, ...) of ``ids``: kept verbatim by text-level methods."""
    special = set(tokenizer.all_special_ids)
    i = 0
    while i < len(ids) and ids[i] in special:
        i += 1
    return i


@dataclass
class LLMLingua1(PromptCompressor):
    """LLMLingua-1 at a target token reduction.

    Parameters
    ----------
    ratio : target token reduction, in the target LM's tokens.
    small_lm : the small LM that scores tokens: ``None`` = the target LM itself (index-aligned
        output), else a hub id, a local folder or ``"embedded"`` (loaded once and cached).
    iterative_size : segment length of the token-level step, in small-LM tokens (package default 200).
    demo_sep : separator between demonstrations (e.g. ``"\\n\\n"``); ``None`` = one context, no
        demonstration-level step (the package's behaviour for a single context).
    context_budget : slack tokens the demonstration-level step may keep beyond the budget ("+100").
    tr_tolerance : largest accepted ``|achieved TR - ratio|``; beyond it ``compress`` raises (or, with
        ``strict=False``, warns and returns the closest compression found).
    max_iter : bisection steps on ``rate`` when each step must run the small LM.
    """

    ratio: float = 0.0
    small_lm: str | None = None
    iterative_size: int = 200
    demo_sep: str | None = None
    context_budget: int = 100
    tr_tolerance: float = 0.02
    strict: bool = True
    max_iter: int = 16
    name: ClassVar[str] = "llmlingua1"
    label: ClassVar[str] = "LLMLingua1"

    def __post_init__(self):
        self.ratio = check_ratio(self.ratio)
        if self.iterative_size < 1:
            raise UserError(f"iterative_size must be >= 1, got {self.iterative_size}")

    def keep_indices(self, lm, tokenizer, ids: list[int], rate: float) -> list[int]:
        """[n_kept] indices of ``ids`` (tokens of ``lm``) kept at native keep ``rate``."""
        n = len(ids)
        max_pos = getattr(lm.config, "max_position_embeddings", None)
        if max_pos is not None and n > max_pos:
            raise UserError(f"prompt of {n} small-LM tokens exceeds the small LM's context ({max_pos})")
        if self.demo_sep is None:
            return iterative_compress(lm, ids, rate, self.iterative_size)
        spans = demonstration_spans(tokenizer, ids, self.demo_sep)
        if len(spans) < 2:
            return iterative_compress(lm, ids, rate, self.iterative_size)
        target = rate * n
        used = budget_controller(lm, ids, spans, target, self.context_budget)
        sub = [i for s in used for i in range(*spans[s])]
        tau = min(1.0, target / len(sub))  # the token-level step spends what the coarse step left
        return [sub[j] for j in iterative_compress(lm, [ids[i] for i in sub], tau, self.iterative_size)]

    def compress(self, lm, tokenizer, prompt_ids: list[int]) -> CompressedPrompt:
        ids = list(prompt_ids)
        n = len(ids)
        if n == 0:
            raise UserError("empty prompt: LLMLingua needs at least one token")
        if self.ratio == 0.0:
            return CompressedPrompt(ids=ids, kept=list(range(n)), n_original=n)

        if self.small_lm is None:
            def run(rate: float) -> CompressedPrompt:
                kept = self.keep_indices(lm, tokenizer, ids, rate)
                return CompressedPrompt(ids=[ids[i] for i in kept], kept=kept, n_original=n)

            if self.demo_sep is None:
                # the kept count depends on `rate` only: bisect on it without the LM, then run once
                def dry_tr(rate: float) -> float:
                    return 1.0 - sum(segment_budgets(n, rate, self.iterative_size)) / n

                rate, _, _ = match_tr(lambda r: r, self.ratio, dry_tr, tol=0.25 / n, max_iter=60)
                return self._check(run(rate))
            _, out, _ = match_tr(run, self.ratio, lambda c: c.tr, max_iter=self.max_iter)
            return self._check(out)

        small, small_tok = _load_small_lm(self.small_lm)
        h = leading_specials(tokenizer, ids)
        small_ids = small_tok(tokenizer.decode(ids[h:]), add_special_tokens=False)["input_ids"]
        if not small_ids:
            raise UserError("the prompt has no text besides special tokens: nothing to compress")

        def run_text(rate: float) -> CompressedPrompt:
            kept = self.keep_indices(small, small_tok, small_ids, rate)
            text = small_tok.decode([small_ids[i] for i in kept])
            out = ids[:h] + tokenizer(text, add_special_tokens=False)["input_ids"]
            return CompressedPrompt(ids=out, kept=None, n_original=n)

        _, out, _ = match_tr(run_text, self.ratio, lambda c: c.tr, max_iter=self.max_iter)
        return self._check(out)

    def _check(self, out: CompressedPrompt) -> CompressedPrompt:
        miss = abs(out.tr - self.ratio)
        if miss > self.tr_tolerance:
            msg = (f"{self.name}: achieved TR {out.tr:.4f} is {miss:.4f} from the requested {self.ratio} on a "
                   f"{out.n_original}-token prompt (the kept count moves in steps; short prompts or "
                   f"re-tokenization make some TRs unreachable)")
            if self.strict:
                raise RuntimeError(msg)
            warnings.warn(msg, stacklevel=3)
        return out
