"""Language modeling (paper Table 2): perplexity of the base LM and of the LM with UMIM merging
on several test corpora, with the token reduction (TR) of each.

The base row is the plain LM perplexity over the same non-overlapping windows; the merged row is
the two-stage perplexity of :func:`umim_eval.scoring.perplexity.perplexity` (every original token scored
exactly once, so both rows average over the same tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from umim.errors import UserError
from umim.inference.generation import MergedLM
from umim.rules.corpus import load_documents, tokenize_documents
from umim_eval.results import Journal, fmt, markdown_table, pct
from umim_eval.tasks.config import TaskConfig

PAPER_DATASETS = {
    "WikiText-103": "hf:Salesforce/wikitext:wikitext-103-raw-v1",
    "BookCorpus": "hf:bookcorpus/bookcorpus",
    "OpenWebText": "hf:Skylion007/openwebtext",
}


@dataclass
class PPLConfig(TaskConfig):
    """Settings of ``umim-eval ppl``."""

    datasets: dict[str, str] = field(default_factory=lambda: dict(PAPER_DATASETS))
    """Table column name -> corpus spec (``hf:PATH[:CONFIG]``, ``pydoc``, ``fortunes``, a local file)."""
    split: str = "test"
    """Split of every dataset (sources without splits are split by document index)."""
    max_tokens: int = 200_000
    """Tokens per dataset (the head of the split); 0 = all."""
    window: int = 512
    """Tokens per non-overlapping window (the first of each is context only)."""
    batch_size: int = 4
    """Windows per forward."""


def _stream(spec: str, split: str, tokenizer, max_tokens: int):
    ids, _ = tokenize_documents(load_documents(spec, split), tokenizer, progress=False)
    return ids[:max_tokens] if max_tokens else ids


def run_ppl(cfg: PPLConfig, progress: bool = True, merged_lm: MergedLM | None = None,
            journal: Journal | None = None) -> dict:
    """Base and merged perplexity + TR on every dataset of ``cfg``.

    Returns
    -------
    ``{"config", "rows": {"base": {name: {ppl, tr}}, "umim": {...}}, "wall_s"}``; TR of the base
    row is 0 by definition.
    """
    from umim_eval.scoring.perplexity import perplexity

    if not cfg.datasets:
        raise UserError("no datasets given")
    if cfg.max_tokens < 0 or cfg.window < 2 or cfg.batch_size < 1:
        raise UserError(f"need max_tokens >= 0 (0 = all), window >= 2 and batch_size >= 1, got {cfg.max_tokens}, "
                        f"{cfg.window}, {cfg.batch_size}")
    t0 = time.perf_counter()
    m = cfg.load_run(merged_lm, need_merging="umim-eval ppl")
    get = journal.get_or if journal is not None else (lambda key, compute: compute())
    rows: dict[str, dict] = {"base": {}, "umim": {}}
    for name, spec in cfg.datasets.items():
        ids = _stream(spec, cfg.split, m.tokenizer, cfg.max_tokens)
        for row, (merger, rules) in {"base": (None, None), "umim": (m.merger, m.rules)}.items():
            def score():
                r = perplexity(m.lm, merger, rules, ids, window=cfg.window, batch_size=cfg.batch_size,
                               progress=progress)
                return {"ppl": r["ppl"], "nll": r["nll"], "tr": r["tr"], "tokens_scored": r["tokens_scored"]}

            rows[row][name] = get(f"{row}|{name}", score)
    from dataclasses import asdict

    return {"config": asdict(cfg), "rows": rows, "wall_s": time.perf_counter() - t0}


def ppl_table(result: dict) -> str:
    """Markdown shaped like Table 2: per dataset PPL and TR (%), then the PPL average."""
    names = list(result["rows"]["base"])
    headers = ["Methods"] + [h for n in names for h in (f"{n} PPL", f"{n} TR (%)")] + ["PPL Avg."]
    rows = []
    for label, key in (("Base LM", "base"), ("Merge Module", "umim")):
        cells = result["rows"][key]
        row = [label]
        for n in names:
            row += [fmt(cells[n]["ppl"], 3), "–" if key == "base" else pct(cells[n]["tr"])]
        row.append(fmt(sum(cells[n]["ppl"] for n in names) / len(names), 3))
        rows.append(row)
    return markdown_table(headers, rows)


NAME = "ppl"
"""Result file stem: the command writes ``out_dir/ppl.json`` and ``out_dir/ppl.md``."""
Config, run, table = PPLConfig, run_ppl, ppl_table  # the names every runner exposes (umim_eval.cli)
