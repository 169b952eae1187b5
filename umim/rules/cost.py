"""Measured per-rule cost, and rule selection by cost (``umim score-rules``, ``umim select-rules``).

Frequency alone decides which n-grams become rules, but merging some spans hurts the frozen LM far
more than others. A rule's *cost* is the KL(teacher || student) its merges cause, per position they
save, measured with the trained merger on held-out-from-evaluation text:

* **Attribution.** Merging every match at once mixes each merge's damage with its neighbours'. So
  each block's longest-match merges are dealt round-robin into ``P`` passes (after a random offset
  per block): a pass merges every ``P``-th match only, every other token stays single. With
  ``P = 1 + ceil(k / 2)`` two merges of a pass lie at least ``span + k`` tokens apart (every match is
  2+ tokens), so the student positions a merge is charged for, its own (aligned with the teacher's
  position at the span's last token) and the next ``k``, hold no other merge. Over the ``P`` passes
  every occurrence is scored once. The teacher runs once per block, each pass once more (batched);
  logits exist only at the charged positions.
* **Cost** of a rule = sum of its merges' KL / positions they save (``n - 1`` each); a rule that
  never fired on the text has no cost (``None`` in the file).

Selection (:func:`select_by_order` over :func:`cost_order`) then keeps the cheapest rules until the
longest-match segmentation *of the subset* reaches a target TR, re-measured after each adjustment
(removing a rule changes which matches fire: a shorter rule inside a dropped span may fire instead).
``umim select-rules`` measures that TR on every block of the scoring split, not only the scored
ones: rules that happened to fire in the scored blocks would otherwise overstate the TR on new text.

On disk (``costs.json`` beside ``rules.json``, format "umim-rule-costs", version 1): per rule
``ngram``, ``count``, ``fires``, ``saved``, ``kl_sum``, ``cost``, plus the scoring settings, the text
(corpus spec, split, blocks, tokens), the LM, and fingerprints of tokenizer, merger weights and
rule set. Re-saving the rules folder drops it (the folder is replaced), so stale costs never linger.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from umim.errors import UserError, cli_entry
from umim.inference.loading import ModelArgs
from umim.rules.store import MergeRules

FORMAT = "umim-rule-costs"
VERSION = 1
COSTS_FILE = "costs.json"


class RuleCostsError(UserError):
    """A rule-costs file is missing, corrupted, or was scored for another rule set."""


# -- rule identities --------------------------------------------------------------------------------
def rule_list(rules: MergeRules) -> list[tuple[int, ...]]:
    """Every rule as a tuple, in the global order used here: by n ascending, then the file's order."""
    return [g for n in sorted(rules.ngrams) for g in map(tuple, rules.ngrams[n].tolist())]


def rules_digest(rules: MergeRules) -> str:
    """SHA-256 of the rule n-grams (not counts): which rule set a costs file belongs to."""
    h = hashlib.sha256()
    for n in sorted(rules.ngrams):
        h.update(f"{n}:{len(rules.ngrams[n])};".encode())
        h.update(np.ascontiguousarray(rules.ngrams[n], dtype="<i8").tobytes())
    return h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names and float32 bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class RuleIndex:
    """Global rule index (:func:`rule_list` order) of n-gram rows, vectorized per n."""

    def __init__(self, rules: MergeRules):
        self.offset, self.keys, self.order, start = {}, {}, {}, 0
        for n in sorted(rules.ngrams):
            keys = _row_keys(rules.ngrams[n])
            self.order[n] = np.argsort(keys, kind="stable")
            self.keys[n], self.offset[n] = keys[self.order[n]], start
            start += len(keys)
        self.size = start

    def lookup(self, grams: np.ndarray, n: int) -> np.ndarray:
        """[M] global index of each row of ``grams`` [M, n] (-1 where it is not a rule)."""
        if n not in self.keys or not len(self.keys[n]):
            return np.full(len(grams), -1, dtype=np.int64)
        q = _row_keys(grams)
        pos = np.minimum(np.searchsorted(self.keys[n], q), len(self.keys[n]) - 1)
        found = self.keys[n][pos] == q
        return np.where(found, self.order[n][pos] + self.offset[n], -1)


def _row_keys(rows: np.ndarray) -> np.ndarray:
    """One opaque comparable key per row of an int array [M, n] (exact for any vocabulary size)."""
    rows = np.ascontiguousarray(rows, dtype="<i8")
    return rows.view(np.dtype((np.void, 8 * rows.shape[1]))).ravel()


# -- the costs ---------------------------------------------------------------------------------------
@dataclass
class RuleCosts:
    """Measured cost of every rule of a rule set (R rules, :func:`rule_list` order)."""

    ngrams: list[tuple[int, ...]]
    counts: np.ndarray
    """[R] int, mining-corpus frequency (copied from the rules)."""
    fires: np.ndarray
    """[R] int, merges of the rule scored (occurrences in the longest-match segmentation of the text)."""
    kl_sum: np.ndarray
    """[R] float, summed KL(teacher || student) over those merges' charged positions (nats)."""
    tokens: int
    """Tokens of the scored text."""
    meta: dict = field(default_factory=dict)
    """Settings, text, LM and fingerprints (``rules_sha256``, ``tokenizer``, ``merger_sha256``)."""

    @property
    def saved(self) -> np.ndarray:
        """[R] positions the rule's merges save (``fires * (n - 1)``)."""
        return self.fires * (np.array([len(g) for g in self.ngrams], dtype=np.int64) - 1)

    @property
    def cost(self) -> np.ndarray:
        """[R] KL per saved position; NaN for rules that never fired."""
        saved = self.saved
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(saved > 0, self.kl_sum / np.maximum(saved, 1), np.nan)

    def shrunk_cost(self, prior: float = 0.0) -> np.ndarray:
        """[R] cost pulled toward the mean cost of all scored merges by ``prior`` pseudo saved positions,
        ``(kl_sum + prior * mean) / (saved + prior)``; NaN for rules that never fired. A rule seen on a
        few merges only keeps a cost near the mean instead of a lucky (or unlucky) extreme."""
        if prior < 0:
            raise UserError(f"prior {prior}: give 0 (raw costs) or more pseudo saved positions")
        saved = self.saved
        mean = self.kl_sum.sum() / max(saved.sum(), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(saved > 0, (self.kl_sum + prior * mean) / (saved + prior), np.nan)

    def table(self, prior: float = 0.0) -> dict[tuple[int, ...], float]:
        """``{ngram: cost}`` of the rules that fired (costs shrunk by ``prior``, see :meth:`shrunk_cost`)."""
        return {g: float(c) for g, c in zip(self.ngrams, self.shrunk_cost(prior)) if not math.isnan(c)}

    def tr(self) -> float:
        """TR of the full rule set on the scored text (all its matches applied)."""
        return float(self.saved.sum() / max(self.tokens, 1))

    # -- persistence -----------------------------------------------------------------------------
    def to_json(self) -> dict:
        rows = [{"ngram": list(g), "count": int(c), "fires": int(f), "saved": int(s), "kl_sum": float(k),
                 "cost": None if math.isnan(x) else float(x)}
                for g, c, f, s, k, x in zip(self.ngrams, self.counts, self.fires, self.saved, self.kl_sum, self.cost)]
        return {"format": FORMAT, "version": VERSION, **self.meta, "tokens": int(self.tokens),
                "tr_all_rules": self.tr(), "num_scored": int((self.fires > 0).sum()), "rules": rows}

    def save(self, path: str | Path) -> Path:
        """Write the costs as JSON to ``path`` (a file, or a rules folder: its ``costs.json``), atomically."""
        from umim.safe_io import write_text_atomic

        path = Path(path)
        if path.is_dir():
            path = path / COSTS_FILE
        return write_text_atomic(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path, rules: MergeRules | None = None) -> RuleCosts:
        """Read a costs file (or the ``costs.json`` of a rules folder); with ``rules``, refuse costs
        scored for another rule set."""
        path = Path(path)
        if path.is_dir():
            path = path / COSTS_FILE
        if not path.is_file():
            raise RuleCostsError(f"no rule costs at {path}: run `umim score-rules` first (or give --costs FILE)")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RuleCostsError(f"{path} is corrupted: {e}") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise RuleCostsError(f"{path} is not a UMIM rule-costs file (format {FORMAT!r})")
        if type(d.get("version")) is not int or d["version"] != VERSION:
            raise RuleCostsError(f"{path} has format version {d.get('version')!r}, this UMIM reads {VERSION}")
        try:
            rows = d.pop("rules")
            ngrams = [tuple(int(t) for t in r["ngram"]) for r in rows]
            counts = np.array([int(r["count"]) for r in rows], dtype=np.int64)
            fires = np.array([int(r["fires"]) for r in rows], dtype=np.int64)
            kl_sum = np.array([float(r["kl_sum"]) for r in rows], dtype=np.float64)
            tokens = int(d.pop("tokens"))
        except (KeyError, TypeError, ValueError) as e:
            raise RuleCostsError(f"{path} lacks or mangles a per-rule field: {e!r}") from e
        if (fires < 0).any() or tokens < 0 or any(len(g) < 2 for g in ngrams):
            raise RuleCostsError(f"{path}: negative counts or n-grams shorter than 2 tokens")
        for k in ("format", "version", "tr_all_rules", "num_scored"):
            d.pop(k, None)
        costs = cls(ngrams, counts, fires, kl_sum, tokens, d)
        if rules is not None and d.get("rules_sha256") != rules_digest(rules):
            raise RuleCostsError(f"{path} was scored for another rule set: run `umim score-rules` on these rules")
        return costs


def is_costs_file(path: Path) -> bool:
    """Whether ``path`` is a rule-costs file (ours to replace)."""
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


# -- scoring -----------------------------------------------------------------------------------------
def min_passes(window: int) -> int:
    """Passes needed so that merges of one pass never fall in each other's charged window."""
    return 1 + math.ceil(window / 2)


def assign_passes(lens: np.ndarray, passes: int, rng: np.random.Generator) -> np.ndarray:
    """Pass of every merge of a segmented batch: the rows' merges dealt round-robin after a random
    offset per row, so two merges of one pass have ``passes - 1`` merges (2+ tokens each) between them.

    Parameters
    ----------
    lens : int array [B, S] segment lengths (``> 1``: a merge).

    Returns
    -------
    int array [M] in ``[0, passes)``, one per merge in ``np.nonzero(lens > 1)`` order.
    """
    b, s = np.nonzero(lens > 1)
    rank = np.cumsum(lens > 1, axis=1)[b, s] - 1  # k-th merge of its row
    return (rank + rng.integers(0, passes, size=len(lens))[b]) % passes


def _pass_segments(L: int, b: torch.Tensor, st: torch.Tensor, ln: torch.Tensor, B: int):
    """Segments of B full rows of L tokens where only the spans (row ``b``, start ``st``, length ``ln``,
    each [M]) merge. Returns seg_start, seg_len [B, S] long, n_seg [B], comp_idx [B, L]."""
    is_start = torch.ones(B, L, dtype=torch.bool)
    for j in range(1, int(ln.max()) if len(ln) else 1):  # drop the inner tokens of each merged span
        m = ln > j
        is_start[b[m], st[m] + j] = False
    comp_idx = is_start.long().cumsum(1) - 1
    n_seg = is_start.sum(1)
    S = int(n_seg.max())
    rows, cols = is_start.nonzero(as_tuple=True)
    seg_start = torch.zeros(B, S, dtype=torch.long)
    seg_start[rows, comp_idx[rows, cols]] = cols
    nxt = torch.cat([seg_start[:, 1:], torch.zeros(B, 1, dtype=torch.long)], 1)
    s_range = torch.arange(S)[None]
    nxt = torch.where(s_range + 1 < n_seg[:, None], nxt, L)
    seg_len = torch.where(s_range < n_seg[:, None], nxt - seg_start, 0)
    seg_start = torch.where(s_range < n_seg[:, None], seg_start, 0)
    return seg_start, seg_len, n_seg, comp_idx


def position_kl(teacher_h: torch.Tensor, student_h: torch.Tensor, lm_head, chunk: int = 256) -> torch.Tensor:
    """[N] KL(teacher || student) of the next-token distributions of N aligned hidden states [N, d]."""
    out = torch.empty(teacher_h.shape[0], dtype=torch.float32, device=teacher_h.device)
    for i in range(0, len(out), chunk):
        t = F.log_softmax(lm_head(teacher_h[i : i + chunk]).float(), -1)
        s = F.log_softmax(lm_head(student_h[i : i + chunk]).float(), -1)
        out[i : i + chunk] = (t.exp() * (t - s)).sum(-1)
    return out


@torch.no_grad()
def score_rules(lm, merger, rules: MergeRules, blocks: np.ndarray, window: int = 3, passes: int | None = None,
                batch_size: int = 4, seed: int = 0, progress: bool = True) -> RuleCosts:
    """Measure every rule's merges on ``blocks`` (module docstring).

    Parameters
    ----------
    lm : the frozen causal LM (Hugging Face; ``base_model`` + output embeddings are used).
    merger : the trained span encoder ([N, n, d] + mask -> [N, d]).
    rules : the rule set whose longest-match segmentation is scored.
    blocks : int array [N, L] of token ids (full blocks, no padding).
    window : k, student positions after a merge's own that it is charged for.
    passes : subsets per block (default and minimum :func:`min_passes`; more = sparser merges).

    Returns
    -------
    :class:`RuleCosts` with ``meta`` holding the settings and the rule set's digest.
    """
    from tqdm.auto import tqdm

    from umim.merging.batch import build_merged_batch
    from umim.training.distillation import teacher_hidden

    if window < 0:
        raise UserError(f"window {window}: give 0 or more positions after the merge")
    P = min_passes(window) if passes is None else int(passes)
    if P < min_passes(window):
        raise UserError(f"passes {P}: window {window} needs at least {min_passes(window)} so merges stay apart")
    blocks = np.asarray(blocks, dtype=np.int64)
    if blocks.ndim != 2 or not blocks.size:
        raise UserError("no text blocks to score: give a longer text or a smaller block_size")
    dev, embed, head = lm.device, lm.get_input_embeddings(), lm.get_output_embeddings()
    index, rng = RuleIndex(rules), np.random.default_rng(seed)
    fires = np.zeros(index.size, dtype=np.int64)
    kl_sum = np.zeros(index.size, dtype=np.float64)
    max_span = max(rules.matcher.max_n, 2)
    offs = torch.arange(window + 1)
    N, L = blocks.shape
    for i in tqdm(range(0, N, batch_size), desc="scoring rules", disable=not progress, leave=False):
        ids_np = blocks[i : i + batch_size]
        B = len(ids_np)
        starts, lens = rules.matcher.segment_batch(ids_np)
        b_np, s_np = np.nonzero(lens > 1)
        if not len(b_np):
            continue
        st_np, ln_np = starts[b_np, s_np], lens[b_np, s_np]
        rid = np.empty(len(b_np), dtype=np.int64)
        for n in np.unique(ln_np):  # rule id of every match, one vectorized lookup per n
            m = ln_np == n
            rid[m] = index.lookup(ids_np[b_np[m][:, None], st_np[m][:, None] + np.arange(n)], int(n))
        assert (rid >= 0).all(), "a longest match that is not a rule"
        which = assign_passes(lens, P, rng)
        ids = torch.from_numpy(ids_np)
        t_h = teacher_hidden(lm, {"input_ids": ids.to(dev), "lengths": torch.full((B,), L, device=dev)})
        for p in range(P):
            sel = np.flatnonzero(which == p)
            if not len(sel):
                continue
            b, st, ln = (torch.from_numpy(a[sel]) for a in (b_np, st_np, ln_np))
            seg_start, seg_len, n_seg, comp_idx = _pass_segments(L, b, st, ln, B)
            mb = build_merged_batch(ids.to(dev), seg_start, seg_len, embed, merger, max_span=max_span)
            s_h = lm.base_model(inputs_embeds=mb.inputs_embeds, attention_mask=mb.attention_mask,
                                use_cache=False).last_hidden_state
            c = comp_idx[b, st]  # compressed position of each merge
            pos = c[:, None] + offs[None]  # [M, k+1] charged student positions
            ok = pos < n_seg[b][:, None]
            rb, rp = b[:, None].expand_as(pos)[ok].to(dev), pos[ok].to(dev)
            kl = position_kl(t_h[rb, mb.teacher_pos[rb, rp]], s_h[rb, rp], head)
            per_merge = torch.zeros(len(sel), dtype=torch.float64).index_add_(
                0, torch.arange(len(sel))[:, None].expand_as(pos)[ok], kl.double().cpu())
            np.add.at(kl_sum, rid[sel], per_merge.numpy())
            np.add.at(fires, rid[sel], 1)
    counts = np.concatenate([rules.counts[n] for n in sorted(rules.ngrams)]) if rules.ngrams else np.zeros(0, int)
    meta = {"rules_sha256": rules_digest(rules), "tokenizer": rules.tokenizer,
            "settings": {"window": int(window), "passes": P, "seed": int(seed), "kl": "KL(teacher || student)"}}
    return RuleCosts(rule_list(rules), counts.astype(np.int64), fires, kl_sum, int(blocks.size), meta)


# -- token reduction and selection ------------------------------------------------------------------
def measured_tr(rules: MergeRules, blocks: np.ndarray) -> float:
    """TR of the longest-match segmentation of ``rules`` on ``blocks`` [N, L]: 1 - segments / tokens."""
    if not len(rules):
        return 0.0
    segments = int((rules.matcher.segment_batch(blocks)[1] > 0).sum())  # the matcher's own walk
    return 1.0 - segments / blocks.size


def subset_rules(rules: MergeRules, keep: np.ndarray, selection: dict | None = None) -> MergeRules:
    """The rules whose global index (:func:`rule_list` order) is in ``keep`` (bool [R] or indices), in
    the source's order, with the same tokenizer and mining metadata plus ``selection`` provenance."""
    mask = np.zeros(len(rules), dtype=bool)
    mask[keep] = True
    ngrams, counts, start = {}, {}, 0
    for n in sorted(rules.ngrams):
        k = len(rules.ngrams[n])
        m = mask[start : start + k]
        if m.any():
            ngrams[n], counts[n] = rules.ngrams[n][m], rules.counts[n][m]
        start += k
    # every other field (tokenizer, mining settings and filter statistics) is the source's
    return dataclasses.replace(rules, ngrams=ngrams, counts=counts, selection=dict(selection or {}))


def select_by_order(rules: MergeRules, order: np.ndarray, blocks: np.ndarray, target_tr: float,
                    tolerance: float = 0.005, max_adjust: int = 200) -> tuple[np.ndarray, float]:
    """The shortest prefix of ``order`` (global rule indices, best first) whose subset's measured TR on
    ``blocks`` reaches ``target_tr``, then adjusted rule by rule to land within ``tolerance``.

    TR is re-measured with the subset's own longest match every time, since dropping a rule changes
    which matches fire. Returns (global indices kept [m], measured TR). Raises :class:`UserError`
    when even the whole ``order`` stays below the target by more than ``tolerance``.
    """
    order = np.asarray(order, dtype=np.int64)

    def tr_of(idx) -> float:
        return measured_tr(subset_rules(rules, idx), blocks)

    full = tr_of(order)
    if full < target_tr - tolerance:
        raise UserError(f"target TR {target_tr:.1%}: the {len(order)} eligible rules reach only {full:.1%} on this "
                        "text; lower the target")
    lo, hi = 0, len(order)  # invariant: TR(prefix hi) >= target (or hi = all)
    while lo < hi:
        mid = (lo + hi) // 2
        if tr_of(order[:mid]) >= target_tr:
            hi = mid
        else:
            lo = mid + 1
    keep = list(order[:hi])
    tr = tr_of(keep)
    if hi > 1:  # one rule fewer may land closer (never none)
        below = tr_of(keep[:-1])
        if abs(below - target_tr) < abs(tr - target_tr):
            keep, tr = keep[:-1], below
    # a frequent rule can jump past the band: drop it and fill with the next rules that fit
    spare = list(order[hi:])
    tries = 0
    while abs(tr - target_tr) > tolerance and tries < max_adjust and (spare or keep):
        tries += 1
        if tr > target_tr:
            keep.pop()
            tr = tr_of(keep)
            continue
        nxt = spare.pop(0) if spare else None
        if nxt is None:
            break
        t = tr_of(keep + [nxt])
        if t <= target_tr + tolerance:
            keep, tr = keep + [nxt], t
    if not keep:
        raise UserError(f"target TR {target_tr:.1%}: even the cheapest rule alone goes past it; raise the target")
    return np.asarray(keep, dtype=np.int64), tr


def cost_order(costs: RuleCosts, max_cost: float | None = None, prior: float = 0.0,
               unseen_at_mean: bool = False) -> np.ndarray:
    """Global indices of the scored rules, cheapest first (ties: more saved positions, then more frequent,
    first); with ``max_cost``, only those costing at most that; ``prior``: rank by
    :meth:`RuleCosts.shrunk_cost`; ``unseen_at_mean``: rules that never fired are ranked too, at the mean
    cost of all scored merges (a subset of the text was scored), instead of left out."""
    cost, saved = costs.shrunk_cost(prior), costs.saved
    if unseen_at_mean:
        cost = np.where(np.isnan(cost), costs.kl_sum.sum() / max(int(saved.sum()), 1), cost)
    scored = np.flatnonzero(~np.isnan(cost))
    if max_cost is not None:
        scored = scored[cost[scored] <= max_cost]
    return scored[np.lexsort((-costs.counts[scored], -saved[scored], cost[scored]))]


def count_order(rules: MergeRules) -> np.ndarray:
    """Global indices of all rules, most frequent first (ties: longer first)."""
    counts = np.concatenate([rules.counts[n] for n in sorted(rules.ngrams)])
    lens = np.concatenate([np.full(len(rules.ngrams[n]), n) for n in sorted(rules.ngrams)])
    return np.lexsort((-lens, -counts))


# -- text --------------------------------------------------------------------------------------------
def text_blocks(tokenizer, data: str, split: str, block_size: int, max_blocks: int | None, seed: int = 0,
                progress: bool = True) -> np.ndarray:
    """[N, block_size] token blocks of a corpus spec's split (documents joined by EOS, as training
    packs them); a seeded random ``max_blocks`` of them (in corpus order) when there are more."""
    from umim.fingerprint import tokenizer_fingerprint
    from umim.lm import cache_dir
    from umim.rules.corpus import tokenized_corpus
    from umim.training.datamodule import pack_blocks

    if block_size < 2:
        raise UserError(f"block_size {block_size}: give at least 2 tokens")
    if max_blocks is not None and max_blocks < 1:
        raise UserError(f"max_blocks {max_blocks}: give a positive number of blocks (or none for all)")
    ids, offsets = tokenized_corpus(data, split, tokenizer, tokenizer_fingerprint(tokenizer), cache_dir() / "tokens",
                                    progress=progress)
    blocks = pack_blocks(ids, offsets, block_size, tokenizer.eos_token_id)
    if not len(blocks):
        raise UserError(f"{data} {split}: fewer than {block_size} tokens; give more text or a smaller block_size")
    if max_blocks is not None and len(blocks) > max_blocks:
        blocks = blocks[np.sort(np.random.default_rng(seed).choice(len(blocks), max_blocks, replace=False))]
    return blocks


def run_corpus(run_dir: str | None) -> tuple[str, int] | None:
    """(corpus spec, block size) of the newest training config of a local ``umim fit`` run folder."""
    import yaml

    if not run_dir or not Path(run_dir).is_dir():
        return None
    configs = sorted(Path(run_dir).glob("logs/*/config.yaml"), key=lambda p: p.stat().st_mtime)
    for cfg in reversed(configs):
        try:
            data = (yaml.safe_load(cfg.read_text()) or {}).get("data") or {}
        except (OSError, yaml.YAMLError):
            continue
        data = data.get("init_args", data)
        if isinstance(data.get("corpus"), str):
            return data["corpus"], int(data.get("block_size") or 256)
    return None


# -- commands ----------------------------------------------------------------------------------------
@dataclass
class ScoreRulesConfig(ModelArgs):
    """Measure each rule's firing rate and the KL its merges cause (writes costs.json beside the rules)."""

    run_dir: str | None = "runs/default"
    """A ``umim fit`` output folder holding ``merger/`` and ``rules/`` (default: the default run)."""
    data: str | None = None
    """Corpus spec or text file to score on (default: the corpus of the run's training config)."""
    split: str = "train"
    """Split of ``data`` (test is left for evaluation; the held-out splits of small corpora are tiny)."""
    block_size: int | None = None
    """Tokens per block (default: the run's training block size, else 256)."""
    max_blocks: int | None = 128
    """Score a seeded random subset of this many blocks (none: all)."""
    window: int = 3
    """k: positions after a merge's aligned position that are charged to it."""
    passes: int | None = None
    """Sparse subsets per block (default and minimum 1 + ceil(window / 2))."""
    batch_size: int = 4
    """Blocks per forward."""
    seed: int = 0
    threads: int | None = None
    """Torch CPU threads (default: torch's; 1 is fastest on a machine shared with other jobs)."""
    out: str | None = None
    """Output file (default: ``costs.json`` in the rules folder)."""

    def __post_init__(self):
        if self.window < 0 or self.window > 64:
            raise UserError(f"--window {self.window}: give 0..64 positions")
        if self.batch_size < 1:
            raise UserError(f"--batch_size {self.batch_size}: give a positive number of blocks")
        if self.passes is not None and self.passes < min_passes(self.window):
            raise UserError(f"--passes {self.passes}: --window {self.window} needs at least {min_passes(self.window)}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads {self.threads}: give a positive number")


def _score_rules_cmd(argv: list[str]) -> int:
    from umim.hub import is_local
    from umim.settings import parse_settings

    a = parse_settings(ScoreRulesConfig, argv, "umim score-rules")
    merger_path, rules_path = a.merging_paths()
    if merger_path is None or rules_path is None:
        raise UserError("umim score-rules needs a merger and rules: give --run_dir (or --merger and --rules)")
    for what, p in (("merger", merger_path), ("rules", rules_path)):
        if is_local(p) and not Path(p).exists():
            raise UserError(f"no {what} at {p}: train a run with `umim fit` first (or pass --{what})")
    out = a.out or (str(Path(rules_path) / COSTS_FILE) if is_local(rules_path) else None)
    if out is None:
        raise UserError("--out: the rules come from the hub, so name the file to write the costs to")
    if Path(out).is_dir():
        raise UserError(f"--out {out} is a folder: give a file name such as {Path(out) / COSTS_FILE}")
    if Path(out).exists() and not is_costs_file(Path(out)):
        raise UserError(f"--out {out} exists and is not a rule-costs file; refusing to replace it: choose another path")
    found = run_corpus(a.run_dir)
    data = a.data or (found[0] if found else None)
    if data is None:
        raise UserError("--data: the run folder records no training corpus, so give the text to score on")
    block_size = a.block_size or (found[1] if found else 256)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = a.load()
    blocks = text_blocks(model.tokenizer, data, a.split, block_size, a.max_blocks, a.seed)
    t1 = time.perf_counter()
    costs = score_rules(model.lm, model.merger, model.rules, blocks, a.window, a.passes, a.batch_size, a.seed)
    costs.meta.update({"lm": {"name_or_path": a.lm, "gguf_file": a.gguf_file},
                       "merger_sha256": module_digest(model.merger), "rules_path": str(rules_path),
                       "text": {"data": data, "split": a.split, "block_size": block_size,
                                "max_blocks": a.max_blocks, "blocks": len(blocks), "seed": a.seed}})
    path = costs.save(out)
    cost = costs.cost
    print(f"scored {len(blocks)} blocks x {block_size} tokens of {data}:{a.split} in {time.perf_counter() - t1:.0f} s "
          f"(load {t1 - t0:.0f} s); {int((costs.fires > 0).sum())} of {len(costs.ngrams)} rules fired, "
          f"TR of all rules {costs.tr():.1%}")
    if np.isfinite(cost).any():
        q = np.nanpercentile(cost, [10, 50, 90])
        print(f"cost per saved position (KL nats): p10 {q[0]:.3f}, median {q[1]:.3f}, p90 {q[2]:.3f}; wrote {path}")
    return 0


@dataclass
class SelectRulesConfig:
    """Keep the cheapest rules (by measured cost per saved position) up to a target TR or a cost cap."""

    out: str
    """Output folder for the selected rule set (rules.json + rules.safetensors)."""
    rules: str = "runs/default/rules"
    """The scored rule set (a rules folder)."""
    costs: str | None = None
    """The costs file written by ``umim score-rules`` (default: ``costs.json`` in the rules folder)."""
    target_tr: float | None = None
    """Target token reduction as a fraction (0.1 = 10 %), measured on the scoring text."""
    max_cost: float | None = None
    """Keep every scored rule whose cost per saved position is at most this (instead of a target TR)."""
    tolerance: float = 0.005
    """How far the measured TR may miss ``target_tr`` (a fraction: 0.005 = 0.5 points)."""
    data: str | None = None
    """Text to measure TR on (default: the text the costs were scored on)."""
    split: str | None = None
    """Split of ``data`` (default: the scoring split)."""
    tr_blocks: int | None = None
    """Blocks TR is measured on (default: every block of that split; the scored subset alone favours
    rules that happened to fire there, whose TR does not carry over to new text)."""
    prior: float = 0.0
    """Rank by costs shrunk toward the mean by this many pseudo saved positions (0: measured costs)."""
    unseen_at_mean: bool = False
    """Rank rules that never fired at the mean cost instead of leaving them out (as ``umim fit``'s
    ``RuleSelection`` does, with ``--prior 4``)."""

    def __post_init__(self):
        if self.tr_blocks is not None and self.tr_blocks < 1:
            raise UserError(f"--tr_blocks {self.tr_blocks}: give a positive number of blocks (or none for all)")
        if not self.prior >= 0:
            raise UserError(f"--prior {self.prior}: give 0 or more pseudo saved positions")
        if (self.target_tr is None) == (self.max_cost is None):
            raise UserError("give exactly one of --target_tr (a fraction, e.g. 0.1) or --max_cost")
        if self.target_tr is not None and not 0 < self.target_tr < 1:
            raise UserError(f"--target_tr {self.target_tr}: give a fraction in (0, 1), e.g. 0.1 for 10 %")
        if self.max_cost is not None and not (self.max_cost >= 0 and math.isfinite(self.max_cost)):
            raise UserError(f"--max_cost {self.max_cost}: give a finite cost >= 0 (KL nats per saved position)")
        if not 0 < self.tolerance < 1:
            raise UserError(f"--tolerance {self.tolerance}: give a fraction such as 0.005 (0.5 points)")
        if not self.out.strip():
            raise UserError("--out: give the folder to write the selected rules to")


def _select_rules_cmd(argv: list[str]) -> int:
    from umim.lm import LMSpec, load_tokenizer
    from umim.rules.store import is_rules_dir
    from umim.safe_io import check_replaceable
    from umim.settings import parse_settings

    a = parse_settings(SelectRulesConfig, argv, "umim select-rules")
    if Path(a.out).resolve() == Path(a.rules).resolve():
        raise UserError(f"--out {a.out} is the source rules folder: write the selection elsewhere")
    check_replaceable(a.out, is_rules_dir, "rules")
    rules = MergeRules.load(a.rules)
    costs = RuleCosts.load(a.costs or a.rules, rules)
    text = costs.meta.get("text") or {}
    lm = costs.meta.get("lm") or {}
    if not text.get("data") and not a.data:
        raise RuleCostsError("the costs file records no text: give --data to measure TR on")
    tok = load_tokenizer(LMSpec(lm.get("name_or_path", "embedded"), lm.get("gguf_file")))
    rules.check_tokenizer(tok)
    data, split = a.data or text["data"], a.split or text.get("split", "train")
    blocks = text_blocks(tok, data, split, int(text.get("block_size", 256)), a.tr_blocks, int(text.get("seed", 0)))
    order = cost_order(costs, a.max_cost, a.prior, a.unseen_at_mean)
    if not len(order):
        raise UserError(f"no scored rule costs at most {a.max_cost}: raise --max_cost")
    if a.target_tr is not None:
        keep, tr = select_by_order(rules, order, blocks, a.target_tr, a.tolerance)
    else:
        keep = order
        tr = measured_tr(subset_rules(rules, keep), blocks)
    selection = {"method": "cost", "source_rules": str(a.rules), "source_rules_sha256": rules_digest(rules),
                 "costs": str(a.costs or Path(a.rules) / COSTS_FILE), "target_tr": a.target_tr,
                 "max_cost": a.max_cost, "prior": a.prior, "unseen_at_mean": a.unseen_at_mean, "measured_tr": tr,
                 "text": {"data": data, "split": split, "blocks": len(blocks)},
                 "num_source_rules": len(rules)}
    chosen = subset_rules(rules, keep, selection)
    chosen.save(a.out)
    kept_cost = costs.cost[keep]
    per_n = ", ".join(f"{n}-grams {k}" for n, k in chosen.num_rules().items())
    print(f"kept {len(chosen)} of {len(rules)} rules ({per_n}); "
          f"TR on {data}:{split} {tr:.2%} (all rules {measured_tr(rules, blocks):.2%}); "
          f"max cost kept {np.nanmax(kept_cost) if len(keep) else 0:.3f}; saved to {a.out}")
    if a.target_tr is not None and abs(tr - a.target_tr) > a.tolerance:
        print(f"warning: TR {tr:.2%} misses the target {a.target_tr:.2%} by more than {a.tolerance:.2%}: "
              "single rules change it by more than the tolerance")
    return 0


def score_rules_main(argv: list[str]) -> int:
    """``umim score-rules`` (user errors: one line, exit 2)."""
    return cli_entry(_score_rules_cmd, argv)


def select_rules_main(argv: list[str]) -> int:
    """``umim select-rules`` (user errors: one line, exit 2)."""
    return cli_entry(_select_rules_cmd, argv)
