"""Alignment report: TR and alignment metrics of mergers/rule sets on held-out blocks, as JSON + table.

The teacher's hidden states are computed once per batch and shared by every (rules, merger)
variant, so comparing e.g. trained vs untrained mergers costs one student forward each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .alignment_metrics import TokenReduction, alignment_metrics
from .datamodule import SegmentCollator
from .distillation import distill_forward, teacher_hidden
from .merger import MergeModule
from .rules import MergeRules

METRIC_KEYS = ("tr", "top1", "top3", "top10", "top_p", "mrr", "kl")


@torch.no_grad()
def evaluate_alignment(
    lm,
    blocks: np.ndarray,
    variants: dict[str, tuple[MergeRules, MergeModule]],
    batch_size: int = 4,
    chunk_size: int = 512,
    top_p: float = 0.7,
    desc: str = "evaluating",
) -> dict[str, dict[str, float]]:
    """Metrics of each variant on ``blocks`` ([n, L] token ids); values in %, KL in nats."""
    state = {
        name: (SegmentCollator(rules), merger.eval(), alignment_metrics(top_p), TokenReduction(), [0.0, 0])
        for name, (rules, merger) in variants.items()
    }
    for i in tqdm(range(0, len(blocks), batch_size), desc=desc, leave=False):
        chunk = list(blocks[i : i + batch_size])
        teacher_h = None
        for collate, merger, metrics, tr, kl in state.values():
            batch = {k: v.to(lm.device) for k, v in collate(chunk).items()}
            if teacher_h is None:
                teacher_h = teacher_hidden(lm, batch)
            loss, merged = distill_forward(lm, merger, batch, metrics, chunk_size, teacher_h=teacher_h)
            n = int(merged.loss_mask.sum())
            kl[0] += float(loss) * n
            kl[1] += n
            tr.update(merged.num_original, merged.num_compressed)
    out = {}
    for name, (_, _, metrics, tr, kl) in state.items():
        values = {k: 100.0 * float(v) for k, v in metrics.compute().items()}
        out[name] = {"tr": float(tr.compute()), **values, "kl": kl[0] / max(kl[1], 1), "aligned_positions": kl[1]}
    return out


def markdown_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """``results[eval_set][variant] -> metrics`` as a markdown table (paper Table 1 columns)."""
    lines = [
        "| eval set | variant | TR (%) | Top-1 | Top-3 | Top-10 | Top-p | MRR | KL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for eval_set, variants in results.items():
        for variant, m in variants.items():
            lines.append(
                f"| {eval_set} | {variant} | {m['tr']:.1f} | {m['top1']:.2f} | {m['top3']:.2f} | "
                f"{m['top10']:.2f} | {m['top_p']:.2f} | {m['mrr']:.2f} | {m['kl']:.3f} |"
            )
    return "\n".join(lines)


def write_report(results: dict, out_dir: Path, extra: dict | None = None) -> str:
    """Write ``metrics.json`` and ``metrics.md`` into ``out_dir``; return the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (out_dir / "metrics.json").write_text(json.dumps({**(extra or {}), "results": results}, indent=2))
    (out_dir / "metrics.md").write_text(table + "\n")
    return table
