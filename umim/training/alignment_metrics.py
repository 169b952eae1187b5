"""Distribution-alignment metrics (paper App. C, Alg. 2-5) and token reduction, as torchmetrics.

Every metric keeps a sum and a count with ``dist_reduce_fx="sum"``, so values reduce correctly
across DDP/FSDP ranks. ``update`` takes aligned logits ``[N, V]`` of teacher and student (already
restricted to loss positions), so callers can feed chunks and never hold ``B x S x V`` at once.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection


class _MeanMetric(Metric):
    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, values: torch.Tensor) -> None:
        # out of place: states reset under inference mode (validation) must stay usable in training
        self.total = self.total + values.double().sum()
        self.count = self.count + values.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


class Top1Agreement(_MeanMetric):
    """Share of positions where teacher and student argmax agree (Alg. 2)."""

    def update(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> None:
        self._add((teacher_logits.argmax(-1) == student_logits.argmax(-1)).float())


class TopKOverlap(_MeanMetric):
    """|top-k(teacher) ∩ top-k(student)| / k, averaged over positions (Alg. 3)."""

    def __init__(self, k: int, **kwargs):
        super().__init__(**kwargs)
        self.k = k

    def update(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> None:
        t = teacher_logits.topk(self.k, dim=-1).indices
        s = student_logits.topk(self.k, dim=-1).indices
        inter = (t[:, :, None] == s[:, None, :]).any(-1).sum(-1)
        self._add(inter.float() / self.k)


def nucleus_mask(logits: torch.Tensor, p: float, k0: int = 256) -> torch.Tensor:
    """[N, V] bool: the minimal set of most probable tokens whose mass reaches ``p``.

    Sorts only the top ``k0`` candidates of each row, and fully only the rows whose top-``k0``
    mass stays below ``p`` (flat distributions): exact either way.
    """
    probs = logits.float().softmax(-1)
    sorted_p, order = probs.topk(min(k0, probs.shape[-1]), dim=-1)
    keep = (sorted_p.cumsum(-1) - sorted_p) < p  # includes the token that crosses p
    out = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep)
    flat = sorted_p.sum(-1) < p  # rows whose top-k0 mass stays below p: sort those rows fully
    if flat.any():
        full_p, full_order = probs[flat].sort(dim=-1, descending=True)
        out[flat] = torch.zeros_like(full_p, dtype=torch.bool).scatter(-1, full_order, (full_p.cumsum(-1) - full_p) < p)
    return out


class TopPOverlap(_MeanMetric):
    """|P_T ∩ P_S| / min(|P_T|, |P_S|) for the top-p sets (Alg. 4)."""

    def __init__(self, p: float = 0.7, **kwargs):
        super().__init__(**kwargs)
        self.p = p

    def update(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> None:
        mt, ms = nucleus_mask(teacher_logits, self.p), nucleus_mask(student_logits, self.p)
        inter = (mt & ms).sum(-1).float()
        self._add(inter / torch.minimum(mt.sum(-1), ms.sum(-1)).float())


class MeanReciprocalRank(_MeanMetric):
    """1 / (1 + rank of the teacher's argmax in the student's ranking) (Alg. 5)."""

    def update(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> None:
        target = teacher_logits.argmax(-1, keepdim=True)
        rank = (student_logits > student_logits.gather(-1, target)).sum(-1)
        self._add(1.0 / (rank.float() + 1.0))


class PositionMeanLoss(_MeanMetric):
    """A per-batch mean loss averaged over all aligned positions of all batches and ranks (so the
    value does not depend on how the positions were grouped into batches or ranks)."""

    def update(self, loss: torch.Tensor, positions: torch.Tensor | int) -> None:
        n = torch.as_tensor(positions, device=self.count.device)
        self.total = self.total + loss.detach().double() * n
        self.count = self.count + n.long()


class TokenReduction(Metric):
    """TR (%) = 100 * (1 - compressed length / original length), over all tokens seen."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("original", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("compressed", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, num_original: int, num_compressed: int) -> None:
        self.original = self.original + int(num_original)
        self.compressed = self.compressed + int(num_compressed)

    def compute(self) -> torch.Tensor:
        return 100.0 * (1.0 - self.compressed.double() / self.original.clamp(min=1).double())


def alignment_metrics(top_p: float = 0.7) -> MetricCollection:
    """The paper's metric set: top-1, top-3, top-10, top-p overlap and MRR (values in [0, 1])."""
    return MetricCollection(
        {
            "top1": Top1Agreement(),
            "top3": TopKOverlap(3),
            "top10": TopKOverlap(10),
            "top_p": TopPOverlap(top_p),
            "mrr": MeanReciprocalRank(),
        },
        compute_groups=False,
    )
