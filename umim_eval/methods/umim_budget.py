"""UMIM with a token budget: the target TR is chosen per request instead of being fixed by the rules.

Fixed-rule UMIM (:class:`~umim_eval.methods.umim_merge.UMIMMerge`) applies every match of the
longest-match segmentation, so its TR is whatever the rules give on the prompt (the paper's stated
limitation). :class:`UMIMBudget` starts from the same matches and applies only some of them, so the
prompt loses ``round(ratio * n)`` positions as closely as the matches allow:

1. **Greedy by score.** Matches are visited best score first (ties: longer, then earlier) and each
   is applied if its ``n - 1`` removed positions still fit in the budget. No knapsack: matches are
   2-4 tokens, so what is left after the greedy pass is at most ``max_n - 2`` positions.
2. **Remainder.** While positions are left, an unapplied match is replaced by its best sub-n-gram
   that is itself a rule and fits (a 4-gram match by a 3- or 2-gram inside it, a 3-gram by a
   2-gram): largest fitting sub-n-gram first, then score. At most one sub-match per match.
3. **Shortfall.** When the budget exceeds what the matches can remove (the fixed-rule TR of that
   prompt), all matches are applied; the result records the shortfall and its reason, and a
   warning is raised when it is more than 2 TR points (the interface rule: hit the requested TR
   within 2 points or report why).

Scores: ``"count"`` (rule frequency in the mining corpus; the default), ``"length"`` (longer spans
first, i.e. the most positions per surrogate), ``"alignment"`` (a per-rule score the user
supplies, e.g. how well the merger's surrogate for that span aligns; rules without a score come
last) and ``"cost"`` (the measured KL per saved position that ``umim score-rules`` stores beside the
rules, :mod:`umim.rules.cost`; cheapest first, rules it never saw fire last). Surrogates come from
the trained merger, exactly as in fixed-rule UMIM.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tqdm.auto import tqdm

from umim.errors import UserError
from umim.inference.generation import MergedLM
from umim.inference.loading import merging_missing
from umim_eval.methods.base import MergedPrompt, PromptMerger, check_ratio, n_removed

SCORES = ("count", "length", "alignment", "cost")
TOLERANCE = 0.02
"""TR points (as a fraction) a result may miss its target by before a warning is raised."""


@dataclass
class BudgetMergedPrompt(MergedPrompt):
    """A merged prompt with its budget bookkeeping."""

    target_removed: int = 0
    """``round(ratio * n_original)``: positions the request asked to remove."""
    max_removable: int = 0
    """Positions removed by applying every match (the fixed-rule UMIM TR of this prompt)."""
    reason: str = ""
    """Why fewer positions than asked were removed ("" when the target was hit)."""

    @property
    def removed(self) -> int:
        return self.n_original - len(self.segments)

    @property
    def shortfall(self) -> int:
        """Positions short of the target (0 when hit)."""
        return self.target_removed - self.removed


def load_alignment_scores(source: dict | str | Path) -> dict[tuple[int, ...], float]:
    """Per-rule scores ``{ngram tuple: score}`` from a dict or a JSON file.

    The file holds a list of objects ``{"ngram": [id, ...], "score": float}``.
    """
    if isinstance(source, dict):
        items = source.items()
    else:
        try:
            rows = json.loads(Path(source).read_text())
            items = [(r["ngram"], r["score"]) for r in rows]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{source}: expected a JSON list of {{'ngram': [ids], 'score': x}} objects ({e})") from e
    out = {}
    for g, s in items:
        g = tuple(int(t) for t in g)
        if len(g) < 2:
            raise UserError(f"alignment score given for {g}: rules have at least 2 tokens")
        out[g] = float(s)
    return out


def load_cost_scores(source, rules=None) -> dict[tuple[int, ...], float]:
    """``{ngram tuple: cost}`` of the rules that fired, from a costs file, a rules folder holding
    ``costs.json``, a :class:`~umim.rules.cost.RuleCosts` or a dict. With ``rules``, the costs must
    have been scored on that rule set or on the set it was selected from (``umim select-rules`` and
    the fit's selection record its fingerprint: a fit's ``rule_costs.json`` serves its ``rules/``);
    costs of another rule set are refused."""
    from umim.rules.cost import RuleCosts, RuleCostsError, rules_digest

    if isinstance(source, dict):
        out = {tuple(int(t) for t in g): float(c) for g, c in source.items()}
        if any(len(g) < 2 for g in out):
            raise UserError("rule costs given for an n-gram shorter than 2 tokens: rules have at least 2")
        return out
    costs = source if isinstance(source, RuleCosts) else RuleCosts.load(source)
    if rules is None:
        return costs.table()
    accepted = {rules_digest(rules), rules.selection.get("source_rules_sha256")} - {None}
    if costs.meta.get("rules_sha256") not in accepted:
        where = "these rule costs" if isinstance(source, RuleCosts) else str(source)
        raise RuleCostsError(f"{where} were scored for another rule set: run `umim score-rules` on these rules "
                             "(or on the rules they were selected from)")
    return costs.table()


@dataclass
class UMIMBudget(PromptMerger):
    """UMIM prompt merging with a target TR per request.

    Parameters
    ----------
    merged_lm : :class:`umim.inference.generation.MergedLM` with the merger and rules; its LM is the target LM.
    ratio : default target TR in [0, 1); :meth:`merge` takes a per-request override.
    score : ``"count"``, ``"length"``, ``"alignment"`` or ``"cost"`` (module docstring).
    alignment : per-rule scores (dict ``{ngram tuple: float}`` or JSON file), for ``score="alignment"``.
    costs : per-rule costs for ``score="cost"``: a ``costs.json`` written by ``umim score-rules``, the
        rules folder holding it, a :class:`~umim.rules.cost.RuleCosts`, or a dict ``{ngram tuple: cost}``.
    split_matches : fill the remainder with sub-n-grams of unapplied matches (step 2).
    """

    merged_lm: MergedLM
    ratio: float = 0.1
    score: str = "count"
    alignment: dict | str | Path | None = None
    split_matches: bool = True
    costs: dict | str | Path | None = None
    name: ClassVar[str] = "umim_budget"
    label: ClassVar[str] = "UMIM, adaptive budget"
    uses_merging: ClassVar[bool] = True
    _table: dict = field(default=None, init=False, repr=False)
    _align: dict = field(default=None, init=False, repr=False)
    _costs: dict = field(default=None, init=False, repr=False)

    @classmethod
    def from_run(cls, run: MergedLM, ratio: float = 0.0, score: str = "count",
                 alignment: dict | str | Path | None = None, split_matches: bool = True,
                 costs: dict | str | Path | None = None) -> UMIMBudget:
        """The run's merger and rules at target TR ``ratio``."""
        if run is None:
            raise merging_missing("method 'umim_budget'")
        run.require_merging("method 'umim_budget'")
        return cls(merged_lm=run, ratio=ratio, score=score, alignment=alignment, split_matches=split_matches,
                   costs=costs)

    def __post_init__(self):
        check_ratio(self.ratio)
        if self.score not in SCORES:
            raise UserError(f"unknown score {self.score!r}; choose from {SCORES}")
        self.merged_lm.require_merging("UMIM budget merging")
        if self.score == "alignment":
            if self.alignment is None:
                raise UserError("score='alignment' needs per-rule scores: pass alignment=dict or a JSON file")
            self._align = load_alignment_scores(self.alignment)
        if self.score == "cost":
            if self.costs is None:
                raise UserError("score='cost' needs measured rule costs: pass costs=costs.json (umim score-rules) "
                                "or the rules folder holding it")
            self._costs = load_cost_scores(self.costs, self.merged_lm.rules)

    # -- scoring -----------------------------------------------------------------------------------
    def _rule_counts(self) -> dict[tuple[int, ...], int]:
        """``{ngram: count}`` of every rule (built once; membership for sub-matches, counts for scores)."""
        if self._table is None:
            rules = self.merged_lm.rules
            self._table = {g: c for n in rules.ngrams for g, c in
                           zip(map(tuple, rules.ngrams[n].tolist()), rules.counts[n].tolist())}
        return self._table

    def _key(self, gram: tuple[int, ...]) -> tuple[float, float]:
        """Sort key, larger is better: (score, tie-breaker)."""
        count, n = float(self._rule_counts()[gram]), float(len(gram))
        if self.score == "count":
            return count, n
        if self.score == "length":
            return n, count
        if self.score == "cost":  # cheaper first; unmeasured rules last
            return -self._costs.get(gram, math.inf), n
        return self._align.get(gram, -math.inf), n

    # -- selection ---------------------------------------------------------------------------------
    def select(self, ids: list[int], target: int) -> tuple[list[tuple[int, int]], int]:
        """Spans to merge so that about ``target`` positions are removed.

        Parameters
        ----------
        ids : [n] prompt token ids.
        target : positions to remove.

        Returns
        -------
        spans : ``[(start, length), ...]`` of the merged spans (length >= 2), ascending, disjoint.
        max_removable : positions removed by applying every longest match.
        """
        matches = [(s, n) for s, n in self.merged_lm.rules.segment(ids) if n > 1]
        max_removable = sum(n - 1 for _, n in matches)
        if target <= 0:
            return [], max_removable
        if target >= max_removable:
            return matches, max_removable
        keyed = sorted(matches, key=lambda m: (*(-k for k in self._key(tuple(ids[m[0] : m[0] + m[1]]))), m[0]))
        applied, left = [], target
        for s, n in keyed:
            if n - 1 <= left:
                applied.append((s, n))
                left -= n - 1
        if self.split_matches:
            table, spare = self._rule_counts(), [m for m in keyed if m not in applied]
            while left > 0 and spare:
                best = None  # (sub-length, score key, -start), match index
                for j, (s, n) in enumerate(spare):
                    for m in range(min(n - 1, left + 1), 1, -1):
                        for off in range(n - m + 1):
                            g = tuple(ids[s + off : s + off + m])
                            if g in table:
                                cand = ((m, self._key(g), -(s + off)), j)
                                best = cand if best is None or cand[0] > best[0] else best
                if best is None:
                    break
                (m, _, neg_start), j = best
                applied.append((-neg_start, m))
                left -= m - 1
                spare.pop(j)
        return sorted(applied), max_removable

    def merge(self, lm, tokenizer, prompt_ids: list[int], ratio: float | None = None) -> BudgetMergedPrompt:
        """Merge one prompt to the target TR ``ratio`` (default: ``self.ratio``).

        Returns a :class:`BudgetMergedPrompt`: ``embeds`` [S, d], ``segments`` tiling the prompt,
        the achieved ``tr`` and, when short of the target, ``shortfall`` and ``reason``.
        """
        ratio = check_ratio(self.ratio if ratio is None else ratio)
        if lm is not self.merged_lm.lm:
            raise UserError("lm must be the LM held by merged_lm (the surrogates live in its embedding space)")
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise UserError("empty prompt: give at least one token")
        n, target = len(ids), n_removed(ratio, len(ids))
        spans, max_removable = self.select(ids, target)
        segments, i = [], 0
        for s, m in spans:  # single tokens between the merged spans
            segments.extend((j, 1) for j in range(i, s))
            segments.append((s, m))
            i = s + m
        segments.extend((j, 1) for j in range(i, n))
        out = BudgetMergedPrompt(embeds=self.merged_lm.segment_embeds(ids, segments), segments=segments,
                                 n_original=n, target_removed=target, max_removable=max_removable)
        if out.shortfall > 0:
            out.reason = (f"the rules match only {max_removable} removable positions in this {n}-token prompt "
                          f"(TR {max_removable / n:.1%} < requested {ratio:.1%})" if max_removable < target else
                          f"no combination of the {self.score}-ranked matches and their sub-rules removes exactly "
                          f"{target} positions; removed {out.removed}")
            if out.shortfall / n > TOLERANCE:
                warnings.warn(f"umim_budget: TR {out.tr:.1%} instead of {ratio:.1%}: {out.reason}", stacklevel=2)
        return out


def budget_curve(lm, tokenizer, merged_lm: MergedLM, texts: list[str], ratios: list[float], context_tokens: int,
                 target_tokens: int, score: str = "count", alignment: dict | str | Path | None = None,
                 progress: bool = True, costs: dict | str | Path | None = None) -> list[dict]:
    """Continuation quality against achieved TR, for a TR-quality curve.

    Every text long enough gives a prompt (its first ``context_tokens`` tokens) and a target (the
    next ``target_tokens``). The prompt is merged, the target is scored unmerged after it
    (:func:`~umim_eval.scoring.prompt_inputs.continuation_nll_from`).

    Returns
    -------
    One dict per point: ``method`` (``"none"``: unmerged prompt; ``"umim"``: fixed rules;
    ``"umim_budget"``: one per ratio), ``target_tr`` (None for fixed rules), ``achieved_tr`` (mean
    over prompts), ``nll`` (nats per target token, pooled), ``ppl`` (``exp(nll)``), ``n_texts``,
    ``n_short`` (prompts more than 2 TR points short of the target, with rules too sparse).
    """
    from umim_eval.methods.umim_merge import UMIMMerge
    from umim_eval.scoring.prompt_inputs import (
        PromptInputs,
        continuation_nll_from,
        prompt_inputs,
    )

    if context_tokens < 1 or target_tokens < 1:
        raise UserError(f"need context_tokens >= 1 and target_tokens >= 1, got {context_tokens}, {target_tokens}")
    pairs = []
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=False)["input_ids"])
        if len(ids) >= context_tokens + target_tokens:
            pairs.append((ids[:context_tokens], ids[context_tokens : context_tokens + target_tokens]))
    if not pairs:
        raise UserError(f"no text has {context_tokens} + {target_tokens} tokens: give longer texts or shorter lengths")
    points = [("none", None, None), ("umim", None, UMIMMerge(merged_lm))]
    points += [("umim_budget", r, UMIMBudget(merged_lm, r, score, alignment, costs=costs)) for r in ratios]
    rows = []
    for method, ratio, merger in tqdm(points, desc="budget curve", disable=not progress, leave=False):
        nll, n_tok, trs, short = 0.0, 0, [], 0
        for prompt, target in pairs:
            if isinstance(merger, UMIMBudget):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # shortfalls are counted in n_short instead
                    mp = merger.merge(lm, tokenizer, prompt)
                short += int(mp.shortfall / mp.n_original > TOLERANCE)
                fed = PromptInputs(embeds=mp.embeds, n_original=mp.n_original)
            else:
                fed = prompt_inputs(merger, lm, tokenizer, prompt)
            nll += float(continuation_nll_from(lm, fed, target).sum())
            n_tok += len(target)
            trs.append(fed.tr)
        rows.append({"method": method, "target_tr": ratio, "achieved_tr": sum(trs) / len(trs), "nll": nll / n_tok,
                     "ppl": math.exp(nll / n_tok), "n_texts": len(pairs), "n_short": short})
    return rows
