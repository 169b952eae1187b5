"""Every method at a matched token reduction, scored by the perplexity of a continuation.

Protocol. The test split's token stream (documents joined with EOS) is cut into windows; each gives
``context_tokens`` of context and the next ``target_tokens`` as the target. A method reduces the CONTEXT
(UMIM merges it, prompt compressors drop tokens, prompt
mergers merge groups); the target is always fed and scored unmerged, one position per token, as
in the QA protocol of the paper (App. F.2). Score: perplexity of the target tokens (all methods
score the same tokens). TR = removed context positions / context tokens.

Matching (``targets``):

* ``"umim"`` — per example, every method is driven to the TR UMIM's rules give on THAT context
  (the paper's default: "TR controlled to be the same as our approach");
* a number, e.g. ``0.1`` — every method at that TR; fixed-rule UMIM cannot be set to a TR and is
  skipped there (list ``umim_budget`` among the methods for UMIM at those levels).

KV policies (StreamingLLM, H2O) do not shrink the prompt; they evict while reading. They read
context + target token by token under the ``prompt`` budget schedule: ``round(t * P)`` entries
are evicted while the context is read, and the target then grows the cache by one entry per token,
so every target token sees as many entries as after a context merged to TR ``t``; their TR is
reported on the same scale (evicted entries / context tokens).

A continuation mostly needs the context's LAST tokens, which favours methods that keep a recent
window; :mod:`umim_eval.tasks.recall` (``umim-eval recall``) is the companion comparison whose
answer lies anywhere in the context. Report both.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from umim.errors import UserError
from umim.inference.generation import MergedLM
from umim.rules.corpus import load_documents
from umim_eval.methods.registry import check_methods, label, make_method
from umim_eval.results import Journal, fmt, markdown_table, pct
from umim_eval.tasks.config import TaskConfig


@dataclass
class CompareConfig(TaskConfig):
    """Settings of ``umim-eval compare``."""

    data: str = "hf:Salesforce/wikitext:wikitext-103-raw-v1"
    """Corpus spec of the test documents (``hf:PATH[:CONFIG]``, ``pydoc``, a local file)."""
    split: str = "test"
    """Split of ``data``."""
    n_samples: int = 64
    """Windows of context + target tokens used (the first ones of the split's token stream)."""
    context_tokens: int = 256
    """Context length P (what the methods reduce)."""
    target_tokens: int = 64
    """Target length C (scored, never reduced)."""
    methods: list[str] = field(default_factory=lambda: ["umim", "select_context", "streaming_llm", "h2o"])
    """Method names of :data:`umim_eval.methods.registry.METHODS`; ``base`` (no reduction) is always included."""
    method_options: dict[str, dict] = field(default_factory=dict)
    """Extra constructor options per method, e.g. ``{ktoken: {path: runs/ktoken/ktoken}}``."""
    targets: list = field(default_factory=lambda: ["umim"])
    """TR levels: ``"umim"`` (per-example match to UMIM's TR) and/or numbers in [0, 1)."""


def load_examples(data: str, split: str, tokenizer, n: int, context_tokens: int,
                  target_tokens: int) -> list[tuple[list[int], list[int]]]:
    """``(context ids [P], target ids [C])``: the first ``n`` windows of ``P + C`` tokens of the split's
    token stream (documents joined with EOS, as for perplexity), so short documents still count.

    Raises ``ValueError`` when the split holds fewer than ``n`` windows (no silent shortfall).
    """
    from umim.rules.corpus import tokenize_documents
    from umim.training.datamodule import pack_blocks

    if context_tokens < 1 or target_tokens < 1 or n < 1:
        raise UserError("n_samples, context_tokens and target_tokens must be >= 1")
    need = context_tokens + target_tokens
    ids, offsets = tokenize_documents(load_documents(data, split), tokenizer, progress=False)
    blocks = pack_blocks(ids, offsets, need, tokenizer.eos_token_id)
    if len(blocks) < n:
        raise UserError(f"{data}:{split} holds {len(ids):,} tokens = {len(blocks)} windows of {need}; "
                        f"{n} requested: lower n_samples, context_tokens or target_tokens")
    return [(b[:context_tokens].tolist(), b[context_tokens:].tolist()) for b in blocks[:n]]


def check_targets(targets: list) -> None:
    """Each TR level is ``"umim"`` or a number in [0, 1)."""
    for t in targets:
        if t != "umim" and not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= float(t) < 1):
            raise UserError(f"targets holds {t!r}: use 'umim' or a number in [0, 1)")


def aimed_tr(target, umim_tr: float | None) -> float:
    """The TR a method is aimed at on one example: UMIM's TR on it (``target == "umim"``) or ``target``."""
    return umim_tr if target == "umim" else float(target)


def build_methods(cfg, m: MergedLM) -> dict:
    """``base`` and every method of ``cfg.methods`` built at ratio 0 with its ``cfg.method_options``.

    Every method is built before any scoring (a missing trained compressor fails now, not after
    hours), once (a method may load a model or inject an adapter), then re-aimed through its ratio knob."""
    return {name: make_method(name, 0.0, merged_lm=m, **dict(cfg.method_options.get(name, {})))
            for name in dict.fromkeys(["base", *cfg.methods])}


def _score(method, m: MergedLM, ctx: list[int], tgt: list[int]) -> tuple[float, float]:
    """(summed target NLL, achieved TR on the context) of one example."""
    s = method.score_continuation(m, ctx, tgt)
    return float(s.nll.sum()), s.tr


def run_compare(cfg: CompareConfig, progress: bool = True, merged_lm: MergedLM | None = None,
                journal: Journal | None = None) -> dict:
    """Score every method at every target level; see the module docstring for the protocol.

    Returns
    -------
    ``{"config", "rows": [{target, method, target_tr, achieved_tr, ppl, nll, n}], "base": {...}, "wall_s"}``
    (TRs are means over examples).
    """
    t0 = time.perf_counter()
    check_methods(cfg.methods, cfg.method_options)
    check_targets(cfg.targets)
    if cfg.n_samples < 1 or cfg.context_tokens < 1 or cfg.target_tokens < 1:
        raise UserError("n_samples, context_tokens and target_tokens must be >= 1")
    m = cfg.load_run(merged_lm, need_merging="targets 'umim'" if "umim" in cfg.targets else None)
    examples = load_examples(cfg.data, cfg.split, m.tokenizer, cfg.n_samples, cfg.context_tokens, cfg.target_tokens)
    # UMIM's TR needs only the segmentation, not the surrogates
    umim_tr = [m.token_reduction(c) if "umim" in cfg.targets else None for c, _ in examples]
    n_tgt = sum(len(t) for _, t in examples)

    built = build_methods(cfg, m)
    get = journal.get_or if journal is not None else (lambda key, compute: compute())

    base_nll = sum(get(f"base|{i}", lambda: _score(built["base"], m, c, t))[0] for i, (c, t) in enumerate(examples))
    base = {"method": "base", "ppl": math.exp(base_nll / n_tgt), "nll": base_nll / n_tgt, "achieved_tr": 0.0}
    rows = []
    jobs = [(t, name) for t in cfg.targets for name in cfg.methods if name != "base"]  # base: its own row
    for target, name in tqdm(jobs, desc="compare", disable=not progress):
        method = built[name]
        if target != "umim" and method.fixed_tr:
            continue  # a fixed TR (UMIM's rules) has no knob: the umim_budget method covers fixed levels
        nll, trs, asked = 0.0, [], []
        for i, (ctx, tgt) in enumerate(examples):
            want = aimed_tr(target, umim_tr[i])
            method.aim(want)
            s, tr = get(f"{target}|{name}|{i}", lambda: _score(method, m, ctx, tgt))
            nll, trs, asked = nll + s, trs + [tr], asked + [want]
        rows.append({"target": target, "method": name, "target_tr": sum(asked) / len(asked),
                     "achieved_tr": sum(trs) / len(trs), "max_tr_gap": max(abs(a - b) for a, b in zip(trs, asked)),
                     "ppl": math.exp(nll / n_tgt), "nll": nll / n_tgt, "n": len(examples)})
    return {"config": asdict(cfg), "base": base, "rows": rows, "n_examples": len(examples),
            "tokens_scored": n_tgt, "wall_s": time.perf_counter() - t0}


def compare_table(result: dict) -> str:
    """One block per target level: Method | target TR (%) | achieved TR (%) | PPL | ΔPPL vs base,
    under a line giving the number of examples and target tokens scored."""
    base = result["base"]
    rows = [["Base LM", "–", "–", "–", fmt(base["ppl"], 3), "–"]]
    for r in result["rows"]:
        level = "UMIM's TR" if r["target"] == "umim" else pct(float(r["target"]), 0) + "%"
        rows.append([label(r["method"]), level, pct(r["target_tr"]), pct(r["achieved_tr"]), fmt(r["ppl"], 3),
                     f"{r['ppl'] - base['ppl']:+.3f}"])
    head = f"{result['n_examples']} examples, {result['tokens_scored']} target tokens scored\n\n"
    return head + markdown_table(["Method", "Matched to", "Target TR (%)", "Achieved TR (%)", "PPL", "ΔPPL"], rows)


NAME = "compare"
"""Result file stem: the command writes ``out_dir/compare.json`` and ``out_dir/compare.md``."""
Config, run, table = CompareConfig, run_compare, compare_table  # the names every runner exposes (umim_eval.cli)
