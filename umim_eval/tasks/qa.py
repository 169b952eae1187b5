"""Zero-shot multiple-choice QA through lm-evaluation-harness at matched TR (paper Table 4).

Each method is the ``umim`` lm-eval model in one configuration: ``base`` (``merge=none``),
``umim`` (``merge=prompt``: merged context, continuation unmerged) or a prompt compressor
(``compressor=NAME``, driven per request to UMIM's TR on that context, or to a fixed ``ratio``).
Tasks run one at a time so that every accuracy gets its own TR. The option with the lowest loss
wins, lm-eval's ``acc`` (App. F.2).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from umim.errors import UserError
from umim_eval.methods.registry import check_methods, label
from umim_eval.results import Journal, fmt, markdown_table, pct
from umim_eval.tasks.config import TaskConfig


@dataclass
class QAConfig(TaskConfig):
    """Settings of ``umim-eval qa``."""

    tasks: list[str] = field(default_factory=lambda: ["piqa", "copa", "openbookqa", "arc_easy", "arc_challenge"])
    """lm-eval task names (paper: PIQA, COPA, OpenBookQA, ARC-Easy, ARC-Challenge)."""
    include_path: str | None = None
    """Folder of extra task YAMLs (e.g. local ``dataset_path: json`` tasks)."""
    local_tasks: list[str] = field(default_factory=list)
    """Corpus specs turned into offline sentence-cloze tasks ``cloze_<name>``
    (:mod:`umim_eval.harness.local_tasks`), written under ``out_dir/tasks`` and appended to ``tasks``."""
    local_examples: int = 200
    """Examples per local cloze task."""
    limit: int | None = None
    """Examples per task (None: all)."""
    methods: list[str] = field(default_factory=lambda: ["base", "umim", "select_context", "llmlingua2"])
    """``base``, ``umim``, or prompt-compressor names of :data:`umim_eval.methods.registry.METHODS`."""
    ratio: str = "umim"
    """``umim`` (per-request match to UMIM's TR) or a fixed TR such as ``0.1`` for the compressors."""
    batch_size: int = 8
    """lm-eval batch size (base and umim; compressors score one request at a time)."""


def _model(cfg: QAConfig, method: str):
    """The lm-eval model of ``method``: the base LM, UMIM's merged prompts (batched), or a prompt
    method reducing each context (one request at a time)."""
    from umim_eval.harness.lm_eval_model import UMIMLM

    kw = {"pretrained": cfg.lm, "gguf_file": cfg.gguf_file, "batch_size": cfg.batch_size, "device": cfg.device,
          "dtype": cfg.dtype}
    if method == "base":
        return UMIMLM(merge="none", **kw)
    if method == "umim" or cfg.ratio == "umim":
        cfg.check_merging(f"method {method!r}" if method == "umim" else "ratio 'umim'")
    merger, rules = cfg.merging_paths()
    if method == "umim":
        return UMIMLM(merger=merger, rules=rules, merge="prompt", **kw)
    return UMIMLM(merger=merger, rules=rules, merge="none", compressor=method, ratio=cfg.ratio, **kw)


def run_qa(cfg: QAConfig, journal: Journal | None = None) -> dict:
    """Accuracy and TR per method and task.

    Returns
    -------
    ``{"config", "rows": {method: {task: {"acc", "acc_stderr", "tr"}}}, "wall_s"}``.
    """
    from pathlib import Path

    import lm_eval
    from lm_eval.tasks import TaskManager

    from umim_eval.harness.local_tasks import write_cloze_task

    if cfg.local_examples < 1 or (cfg.limit is not None and cfg.limit < 1) or cfg.batch_size < 1:
        raise UserError(f"local_examples, limit and batch_size must be >= 1, got {cfg.local_examples}, {cfg.limit}, "
                        f"{cfg.batch_size}")
    check_methods(cfg.methods)
    tasks = list(cfg.tasks)
    include = [cfg.include_path] if cfg.include_path else []
    if cfg.local_tasks:
        folder = Path(cfg.out_dir or "results/qa") / "tasks"
        tasks += [write_cloze_task(folder, spec, n=cfg.local_examples) for spec in cfg.local_tasks]
        include.append(str(folder))
    if not tasks or not cfg.methods:
        raise UserError("give at least one task (tasks or local_tasks) and one method")
    t0 = time.perf_counter()
    manager = TaskManager(include_path=include or None)
    rows: dict[str, dict] = {}
    get = journal.get_or if journal is not None else (lambda key, compute: compute())
    for method in cfg.methods:
        model = None
        rows[method] = {}
        for task in tasks:
            def evaluate():
                nonlocal model
                model = model or _model(cfg, method)
                model._counts = {k: [0, 0] for k in model._counts}  # TR of this task alone
                out = lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=manager, limit=cfg.limit,
                                              num_fewshot=0, log_samples=False)
                res = out["results"][task]
                return {"acc": res.get("acc,none"), "acc_stderr": res.get("acc_stderr,none"),
                        "tr": model.token_reduction if method != "base" else None}

            rows[method][task] = get(f"{method}|{task}", evaluate)
    return {"config": asdict(cfg), "tasks": tasks, "rows": rows, "wall_s": time.perf_counter() - t0}


def qa_table(result: dict) -> str:
    """Markdown shaped like Table 4: Acc.% and TR% per task, then the average accuracy."""
    tasks = result["tasks"]
    headers = ["Methods"] + [h for t in tasks for h in (f"{t} Acc.%", f"{t} TR%")] + ["Avg (%)"]
    rows = []
    for method, cells in result["rows"].items():
        accs = [cells[t]["acc"] for t in tasks]
        row = [label(method)]
        for t in tasks:
            row += [pct(cells[t]["acc"]), pct(cells[t]["tr"])]
        row.append(fmt(100 * sum(accs) / len(accs)) if all(a is not None for a in accs) else "–")
        rows.append(row)
    return markdown_table(headers, rows)


NAME = "qa"
"""Result file stem: the command writes ``out_dir/qa.json`` and ``out_dir/qa.md``."""
Config, run, table = QAConfig, run_qa, qa_table  # the names every runner exposes (umim_eval.cli)
