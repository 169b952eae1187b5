"""Distillation loss: KL(teacher || student) at aligned positions, chunked over positions.

Only hidden states of the aligned positions ``[N, d]`` are projected to the vocabulary, a chunk at a
time, and the student's projection is checkpointed, so peak memory is ``chunk x V`` instead of
``B x S x V`` (which is several GB for 128k-token vocabularies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchmetrics import MetricCollection


def _student_kl(lm_head: nn.Module, student_h: torch.Tensor, teacher_logp: torch.Tensor):
    student_logits = lm_head(student_h).float()
    logp = F.log_softmax(student_logits, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1)  # [n] per position
    return kl.sum(), kl.detach(), student_logits.detach()


def distillation_loss(
    teacher_h: torch.Tensor,
    student_h: torch.Tensor,
    lm_head: nn.Module,
    chunk_size: int = 512,
    metrics: MetricCollection | None = None,
    position_kl: torch.Tensor | None = None,
    min_chunks: int = 0,
) -> torch.Tensor:
    """Mean KL(teacher || student) over N aligned positions.

    Parameters
    ----------
    teacher_h : [N, d] teacher final hidden states (no grad needed).
    student_h : [N, d] student final hidden states (grad flows to the merger).
    lm_head : the frozen LM's output projection.
    metrics : alignment metrics updated with each chunk's logits (optional).
    position_kl : [N] float buffer, filled with each position's KL (no grad; optional).
    min_chunks : calls of ``lm_head`` to make at least (empty chunks after the last); a sharded head
        is a collective, so every rank must call it equally often whatever its N.

    Returns
    -------
    Scalar loss; 0 (with grad) when N == 0.
    """
    n = teacher_h.shape[0]
    total = student_h.sum() * 0.0  # keeps the graph when there is nothing to align
    for c in range(max(-(-n // chunk_size), min_chunks)):
        i = c * chunk_size
        with torch.no_grad():
            teacher_logits = lm_head(teacher_h[i : i + chunk_size]).float()
            teacher_logp = F.log_softmax(teacher_logits, dim=-1)
        if torch.is_grad_enabled():
            kl, per_pos, student_logits = checkpoint(
                _student_kl, lm_head, student_h[i : i + chunk_size], teacher_logp, use_reentrant=False
            )
        else:
            kl, per_pos, student_logits = _student_kl(lm_head, student_h[i : i + chunk_size], teacher_logp)
        total = total + kl
        if position_kl is not None:
            position_kl[i : i + chunk_size] = per_pos
        if metrics is not None and len(student_logits):
            metrics.update(teacher_logits, student_logits)
    return total / max(n, 1)
