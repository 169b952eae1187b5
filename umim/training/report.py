"""Alignment report: TR and alignment metrics of mergers/rule sets on held-out blocks, as JSON + table.

The teacher's hidden states are computed once per batch and shared by every (rules, merger)
variant, so comparing e.g. trained vs untrained mergers costs one student forward each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric
from tqdm.auto import tqdm

from umim.merging.merger import MergeModule
from umim.rules.store import MergeRules
from umim.safe_io import write_text_atomic
from umim.training.alignment_metrics import TokenReduction, alignment_metrics
from umim.training.datamodule import SegmentCollator
from umim.training.distillation import distill_forward, teacher_hidden

METRIC_KEYS = ("tr", "top1", "top3", "top10", "top_p", "mrr", "kl")


class _Sum(Metric):
    """A sum reduced across ranks (the KL total and the aligned-position count of the report)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("value", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor | float) -> None:
        self.value = self.value + torch.as_tensor(value, dtype=torch.float64, device=self.value.device)

    def compute(self) -> torch.Tensor:
        return self.value


@torch.no_grad()
def evaluate_alignment(
    lm,
    blocks: np.ndarray,
    variants: dict[str, tuple[MergeRules, MergeModule]],
    batch_size: int = 4,
    chunk_size: int = 512,
    top_p: float = 0.7,
    desc: str = "evaluating",
    rank: int = 0,
    world_size: int = 1,
    head_calls=None,
) -> dict[str, dict[str, float]]:
    """Metrics of each variant on ``blocks`` ([n, L] token ids); values in %, KL in nats.

    With ``world_size > 1`` (every rank calls this) rank r evaluates batches r, r + W, ... and the
    metrics are summed across ranks, so the result equals a 1-process run. Every rank runs the same
    number of forwards (a sharded LM needs all ranks in each one): a rank without a batch of its own
    repeats one and does not count it; ``head_calls`` (a sharded head) evens out the output-head calls.
    """
    device = lm.device
    state = {
        name: (SegmentCollator(rules), merger.eval(), alignment_metrics(top_p).to(device),
               TokenReduction().to(device), _Sum().to(device), _Sum().to(device))
        for name, (rules, merger) in variants.items()
    }
    starts = list(range(0, len(blocks), batch_size))
    slots = -(-len(starts) // world_size)
    for j in tqdm(range(slots), desc=desc, leave=False, disable=rank != 0):
        own = j * world_size + rank < len(starts)
        i = starts[j * world_size + rank] if own else starts[0]
        chunk = list(blocks[i : i + batch_size])
        teacher_h = None
        for collate, merger, metrics, tr, kl, n_aligned in state.values():
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(chunk).items()}
            if teacher_h is None:
                teacher_h = teacher_hidden(lm, batch)
            loss, merged = distill_forward(lm, merger, batch, metrics if own else None, chunk_size, teacher_h=teacher_h,
                                           head_calls=head_calls)
            if own:
                n = merged.loss_mask.sum()
                kl.update(loss.double() * n)
                n_aligned.update(n)
                tr.update(merged.num_original, merged.num_compressed)
    out = {}
    for name, (_, _, metrics, tr, kl, n_aligned) in state.items():
        values = {k: 100.0 * float(v) for k, v in metrics.compute().items()}
        n = float(n_aligned.compute())
        out[name] = {"tr": float(tr.compute()), **values, "kl": float(kl.compute()) / max(n, 1.0),
                     "aligned_positions": int(n)}
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
    """Write ``metrics.json`` and ``metrics.md`` into ``out_dir`` (each atomically); return the table."""
    table = markdown_table(results)
    write_text_atomic(Path(out_dir) / "metrics.json", json.dumps({**(extra or {}), "results": results}, indent=2))
    write_text_atomic(Path(out_dir) / "metrics.md", table + "\n")
    return table
