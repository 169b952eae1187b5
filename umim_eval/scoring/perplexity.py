"""Two-stage perplexity of an LM with span merging (paper App. F.1, Pseudocode 5).

What is scored
--------------
A window ``x_0 .. x_{L-1}`` is segmented by the shared longest-match matcher into segments
``e_0 .. e_{S-1}``; segment ``k`` covers ``x_s .. x_{s+n-1}`` (``s = start_k``, ``n = len_k``) and is
fed to the LM as ONE element (a surrogate embedding from the merger when ``n > 1``, the token
embedding when ``n == 1``) at compressed position ``k``.

* Stage 1 (merged sequence): the LM runs on ``e_0 .. e_{S-1}``. The output at compressed position
  ``k`` scores the FIRST token of the next segment, ``x_{start_{k+1}}`` (``k = 0 .. S-2``). This is
  the only token the merged sequence can score there: the next element is a surrogate whose inner
  tokens are never predicted by the merged sequence.
* Stage 2 (skipped tokens): every non-first token of a merged span, ``x_{s+j}`` with
  ``j = 1 .. n-1``, is scored from the merged prefix ``e_0 .. e_{k-1}`` followed by the span's own
  preceding tokens as plain embeddings ``x_s .. x_{s+j-1}`` at positions ``k .. k+j-1`` (the
  paper's record ``context = merged prefix, current = x_{s+j-1}, target = x_{s+j}``; for ``j > 1``
  we keep the span's earlier tokens unmerged, which is what the model sees while the span is
  still being written).

Stage 1 scores ``S - 1`` tokens and stage 2 ``sum(n - 1) = L - S`` tokens: every token of a window
except its first ``x_0`` is scored exactly once, ``L - 1`` in all, and
``PPL = exp(sum NLL / sum (L - 1))`` over all windows. With no merges stage 2 is empty and this is
the plain LM perplexity of the window.

Design of stage 2 (one batched forward)
---------------------------------------
Stage 1 runs with ``use_cache=True``; stage 2 then feeds, for every skipped token of every row,
one query (the token before it) on top of that cache, with explicit ``position_ids`` and a custom
4-D additive attention mask ``[B, 1, Q, S + Q]``: a query of span ``k`` sees the cached merged
prefix ``< k`` and the earlier queries of its own span, nothing else. Hugging Face models
(transformers 5.x, Llama and GPT-2 alike) pass a 4-D mask through unchanged to every attention
implementation (float, so "eager" adds it correctly too).

Trade-off against the alternative of one pass over ``[merged sequence ; queries]`` with a single
4-D mask: reusing the cache keeps stage 1 a plain forward (standard causal path, identical to what
merged inference computes) and attention costs ``O(S^2 + Q (S + Q))`` instead of ``O((S + Q)^2)``,
at the price of keeping stage 1's KV cache (``B x layers x S`` keys/values) alive until stage 2
ends and of a second launch. Both forms are exact. A model whose layers mix in sliding-window
attention (Mistral, Gemma 2) would receive the same full custom mask in every layer, so for such a
model keep windows shorter than its sliding window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from umim.errors import UserError
from umim.lm import cache_kwargs, output_cache
from umim.merging.batch import build_merged_batch
from umim.merging.merger import MergeModule
from umim.rules.store import MergeRules
from umim_eval.scoring.token_nll import token_nll


@dataclass
class NLLResult:
    """Per-row sums of one batch of windows (B rows)."""

    nll_sum: torch.Tensor
    """[B] float64, summed negative log-likelihood (nats) of the scored tokens."""
    n_scored: torch.Tensor
    """[B] long, tokens scored: ``length - 1``."""
    n_compressed: torch.Tensor
    """[B] long, compressed positions (segments) the LM ran on in stage 1."""
    n_original: torch.Tensor
    """[B] long, original tokens (the valid lengths)."""
    n_skipped: torch.Tensor
    """[B] long, tokens scored in stage 2 (``n_original - n_compressed``)."""
    token_nll: torch.Tensor
    """[B, L] float64, NLL of each original token, NaN where not scored (position 0, padding)."""


# -- input checks and segmentation -------------------------------------------------------------------
def _check_batch(ids: torch.Tensor, lengths) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise UserError("ids must be a 2-D LongTensor [B, L]")
    B, L = ids.shape
    if B == 0 or L == 0:
        raise UserError("empty input: need at least one row with at least one token")
    if lengths is None:
        lengths = torch.full((B,), L, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
    if lengths.shape != (B,) or (lengths < 1).any() or (lengths > L).any():
        raise UserError(f"lengths must be [B] = [{B}] values in [1, {L}], got {lengths.tolist()}")
    return lengths


def _segments(rules: MergeRules | None, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU long ``(seg_start, seg_len)`` [B, S] by the shared matcher (single tokens without rules)."""
    if rules is None:
        B, L = ids.shape
        pos = torch.arange(L).expand(B, L)
        valid = pos < lengths[:, None]
        S = int(lengths.max())
        return (pos * valid)[:, :S].contiguous(), valid[:, :S].long()
    starts, lens = rules.matcher.segment_batch(ids.cpu().numpy(), lengths.numpy())
    return torch.from_numpy(starts), torch.from_numpy(lens)


def _no_merger(span_embeds: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
    if span_embeds.shape[0]:
        raise UserError("these windows contain rule n-grams to merge, but no merger was given")
    return span_embeds[:, 0]


def _ready_merger(merger: MergeModule | None, lm) -> MergeModule | None:
    if merger is not None:
        if merger.config.hidden_size != lm.get_input_embeddings().embedding_dim:
            raise UserError(
                f"merger hidden size {merger.config.hidden_size} != LM's {lm.get_input_embeddings().embedding_dim}"
            )
        merger = merger.to(lm.device)
    return merger


# -- the fast path -------------------------------------------------------------------------------------
@torch.no_grad()
def two_stage_nll(lm, merger: MergeModule | None, rules: MergeRules | None, ids: torch.Tensor,
                  lengths=None) -> NLLResult:
    """Two-stage NLL of a batch of windows in at most two forward passes of ``lm``.

    Parameters
    ----------
    lm : a Hugging Face causal LM in eval mode (``inputs_embeds``, ``position_ids``, 4-D masks,
        ``DynamicCache``).
    merger : the merge module (may be None only if nothing in ``ids`` matches a rule).
    rules : the merge rules (None: no merging, plain perplexity).
    ids : [B, L] long token ids, right-padded.
    lengths : [B] valid lengths (default all L), each >= 1.

    Returns
    -------
    :class:`NLLResult`; every token of row b except ``ids[b, 0]`` is scored once
    (``n_scored = lengths - 1``).
    """
    lengths = _check_batch(ids, lengths)
    device = lm.device
    merger = _ready_merger(merger, lm)
    ids_cpu = ids.cpu()
    seg_start, seg_len = _segments(rules, ids_cpu, lengths)
    ids = ids_cpu.to(device)
    B, L = ids.shape
    mb = build_merged_batch(ids, seg_start, seg_len, lm.get_input_embeddings(), merger or _no_merger,
                            lengths.to(device))
    seg_start, seg_len = mb.seg_start, mb.seg_len  # on device now
    S = seg_start.shape[1]
    pos = torch.arange(L, device=device)

    # Stage-2 queries: original positions t that are not the first token of their segment, packed
    # to the left of each row in order (a row's skipped tokens form its queries 0 .. Q_b - 1).
    comp = mb.orig_to_comp.clamp(min=0)  # [B, L]
    skipped = (mb.orig_to_comp >= 0) & (pos[None] != seg_start.gather(1, comp))
    n_skipped = skipped.sum(1)
    Q = int(n_skipped.max())

    # Stage 1: the merged sequence; output at k scores the first token of segment k + 1.
    positions = torch.arange(S, device=device).expand(B, S)
    out = lm(inputs_embeds=mb.inputs_embeds, attention_mask=mb.attention_mask, position_ids=positions,
             use_cache=Q > 0)
    score_a = seg_len[:, 1:] > 0  # [B, S-1]
    rows_a = score_a.nonzero(as_tuple=True)[0]
    tgt_a = seg_start[:, 1:][score_a]
    nll_a = token_nll(out.logits[:, :-1][score_a], ids[rows_a, tgt_a])
    # per-token record; n_scored counts scoring events, so a token scored twice would show up
    per_token = torch.full((B, L), float("nan"), dtype=torch.float64, device=device)
    per_token[rows_a, tgt_a] = nll_a
    n_scored = torch.bincount(rows_a, minlength=B)

    if Q > 0:
        t = torch.sort(torch.where(skipped, pos[None], L), dim=1).values[:, :Q]  # [B, Q] target positions
        q_valid = t < L
        t = t.clamp(max=L - 1)
        k = torch.where(q_valid, comp.gather(1, t), 0)  # [B, Q] segment of each query
        span_start = seg_start.gather(1, k)
        q_pos = torch.where(q_valid, k + (t - span_start - 1), 0)  # compressed prefix + offset in span
        q_embeds = lm.get_input_embeddings()(ids.gather(1, (t - 1).clamp(min=0)))  # [B, Q, d]: x_{t-1}

        # Who each query may see: the cached merged prefix before its span, and the earlier
        # queries of the same span (the span's preceding tokens, unmerged); the diagonal always,
        # so padded queries attend to something and stay finite.
        see_cache = torch.arange(S, device=device)[None, None, :] < k[:, :, None]  # [B, Q, S]
        qi = torch.arange(Q, device=device)
        see_query = (
            (k[:, :, None] == k[:, None, :]) & (qi[None, None, :] <= qi[None, :, None])
            & q_valid[:, :, None] & q_valid[:, None, :]
        ) | torch.eye(Q, dtype=torch.bool, device=device)[None]  # [B, Q, Q]
        allow = torch.cat([see_cache, see_query], dim=2)[:, None]  # [B, 1, Q, S + Q]
        dtype = q_embeds.dtype
        mask = torch.zeros(allow.shape, dtype=dtype, device=device).masked_fill(~allow, torch.finfo(dtype).min)

        out_b = lm(inputs_embeds=q_embeds, attention_mask=mask, position_ids=q_pos,
                   **cache_kwargs(lm, output_cache(out)), use_cache=True)
        rows_b, tgt_b = q_valid.nonzero(as_tuple=True)[0], t[q_valid]
        per_token[rows_b, tgt_b] = token_nll(out_b.logits[q_valid], ids[rows_b, tgt_b])
        n_scored = n_scored + torch.bincount(rows_b, minlength=B)

    nll = torch.nan_to_num(per_token, nan=0.0).sum(1)
    n_comp = (seg_len > 0).sum(1)
    return NLLResult(nll_sum=nll.cpu(), n_scored=n_scored.cpu(), n_compressed=n_comp.cpu(),
                     n_original=lengths, n_skipped=n_skipped.cpu(), token_nll=per_token.cpu())


# -- the literal definition (tests only) -------------------------------------------------------------
@torch.no_grad()
def reference_nll(lm, merger: MergeModule | None, rules: MergeRules | None, ids: torch.Tensor,
                  lengths=None) -> NLLResult:
    """Pseudocode 5 taken literally: row by row, one forward on the merged sequence and one forward
    per skipped token (``1 + L_b - S_b`` forwards per row). Slow; for tests. Same inputs/outputs as
    :func:`two_stage_nll`."""
    lengths = _check_batch(ids, lengths)
    merger = _ready_merger(merger, lm)
    embed = lm.get_input_embeddings()
    dev = lm.device
    B, L = ids.shape
    per_token = torch.full((B, L), float("nan"), dtype=torch.float64)
    n_scored, n_comp, n_skip = (torch.zeros(B, dtype=torch.long) for _ in range(3))
    for b in range(B):
        x = ids[b, : int(lengths[b])].to(dev)
        segs = rules.segment(x.cpu().numpy()) if rules is not None else [(i, 1) for i in range(len(x))]

        def element(s: int, n: int) -> torch.Tensor:
            if n == 1:
                return embed(x[s : s + 1])[0]
            if merger is None:
                raise UserError("these windows contain rule n-grams to merge, but no merger was given")
            return merger(embed(x[s : s + n])[None])[0]

        def score(logits_row: torch.Tensor, t: int) -> None:
            per_token[b, t] = token_nll(logits_row[None], x[t][None])[0].cpu()
            n_scored[b] += 1

        elems = [element(s, n) for s, n in segs]
        logits = lm(inputs_embeds=torch.stack(elems)[None]).logits[0]  # stage 1
        for k in range(len(segs) - 1):
            score(logits[k], segs[k + 1][0])
        for k, (s, n) in enumerate(segs):  # stage 2: one forward per skipped token
            for j in range(1, n):
                ctx = elems[:k] + [embed(x[s + i : s + i + 1])[0] for i in range(j)]
                score(lm(inputs_embeds=torch.stack(ctx)[None]).logits[0, -1], s + j)
                n_skip[b] += 1
        n_comp[b] = len(segs)
    return NLLResult(nll_sum=torch.nan_to_num(per_token, nan=0.0).sum(1), n_scored=n_scored, n_compressed=n_comp,
                     n_original=lengths.clone(), n_skipped=n_skip, token_nll=per_token)


# -- corpus perplexity -----------------------------------------------------------------------------------
def perplexity(lm, merger: MergeModule | None, rules: MergeRules | None, token_ids_1d, window: int = 512,
               batch_size: int = 4, progress: bool = True) -> dict:
    """Two-stage perplexity of a token stream over non-overlapping windows.

    Parameters
    ----------
    token_ids_1d : [N] token ids (tensor, array or list), cut into windows of ``window`` tokens
        (the last may be shorter); the first token of each window is context only.
    batch_size : windows per batch (two forwards per batch).

    Returns
    -------
    ``{"ppl", "nll" (mean per scored token, nats), "tokens_scored", "tr", "windows"}`` where
    ``tr = 1 - compressed / original`` positions over all windows.
    """
    from tqdm.auto import tqdm

    if window < 2:
        raise UserError(f"window must be >= 2 tokens (the first of each window is not scored), got {window}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    ids = torch.as_tensor(np.asarray(token_ids_1d), dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise UserError(f"need at least 2 tokens to score, got {ids.numel()}")
    context = int(getattr(lm.config, "max_position_embeddings", 0) or 0)
    if context and window > context:
        raise UserError(f"window {window} exceeds the model's context of {context} positions")

    windows = list(ids.split(window))
    if len(windows) > 1 and len(windows[-1]) < 2:
        windows.pop()  # a 1-token tail has nothing to score; leave it out of TR too
    nll_sum, scored, comp, orig = 0.0, 0, 0, 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="win", disable=not progress)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        lengths = torch.tensor([len(w) for w in chunk])
        batch = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
        for b, w in enumerate(chunk):
            batch[b, : len(w)] = w
        r = two_stage_nll(lm, merger, rules, batch, lengths)
        nll_sum += float(r.nll_sum.sum())
        scored += int(r.n_scored.sum())
        comp += int(r.n_compressed.sum())
        orig += int(r.n_original.sum())
        bar.update(len(chunk))
        bar.set_postfix(ppl=f"{math.exp(nll_sum / max(scored, 1)):.3f}", tr=f"{1 - comp / orig:.3f}")
    bar.close()
    nll = nll_sum / scored
    return {"ppl": math.exp(nll), "nll": nll, "tokens_scored": scored, "tr": 1.0 - comp / orig, "windows": len(windows)}
