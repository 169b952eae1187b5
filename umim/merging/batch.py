"""Merged batch construction (paper App. C): compressed ``inputs_embeds`` and teacher/student alignment.

Segment ``s`` of a row covers original tokens ``start_s .. start_s + len_s - 1``. The student (LM on
the compressed sequence) at position ``s`` predicts the token after the segment, which is what the
teacher (LM on the original ids) predicts at the segment's last token ``start_s + len_s - 1``. These
pairs are the loss positions; positions before a row's first merge are excluded (teacher and student
are identical there), as are padded segments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from umim.merging.span_encoder import Segmenter, SpanEncoder
from umim.rules.store import MAX_N


class AlignmentError(RuntimeError):
    """Segments do not tile the original sequence, so teacher and student would be misaligned."""


@dataclass
class MergedBatch:
    """A batch after merging. B rows, L original and S compressed positions, d hidden size."""

    inputs_embeds: torch.Tensor
    """[B, S, d] surrogate embeddings at merged segments, token embeddings elsewhere (0 at padding)."""
    attention_mask: torch.Tensor
    """[B, S] long, 1 for real segments, 0 for right padding."""
    seg_start: torch.Tensor
    """[B, S] long, first original position of each segment."""
    seg_len: torch.Tensor
    """[B, S] long, segment length (0 at padding)."""
    orig_to_comp: torch.Tensor
    """[B, L] long, compressed index of the segment holding each original token (-1 at padding)."""
    loss_mask: torch.Tensor
    """[B, S] bool, compressed positions that enter the loss and the metrics."""
    teacher_pos: torch.Tensor
    """[B, S] long, teacher position aligned with each compressed position (its segment's last token)."""
    num_original: int
    num_compressed: int
    position_kl: torch.Tensor | None = None
    """[B, S] float KL(teacher || student) at each loss position, 0 elsewhere (no grad); set by
    :func:`~umim.training.distillation.distill_forward` when asked for it."""


def check_segments(seg_start: np.ndarray, seg_len: np.ndarray, lengths: np.ndarray, max_span: int = MAX_N) -> None:
    """Raise :class:`AlignmentError` unless each row's segments tile ``[0, length)`` in order and none
    is longer than ``max_span`` (the segmenter's largest span; default the rules format's bound)."""
    valid = seg_len > 0
    ends = seg_start + seg_len
    nxt = np.where(valid[:, 1:], seg_start[:, 1:], -1)
    contiguous = (nxt == ends[:, :-1]) | ~valid[:, 1:]
    total = seg_len.sum(axis=1)
    starts_ok = (seg_start[:, 0] == 0) | (lengths == 0)
    # real segments must come first (no gaps of padding between them)
    packed = ~(valid[:, 1:] & ~valid[:, :-1]).any(axis=1) if valid.shape[1] > 1 else np.ones(len(valid), bool)
    in_range = (seg_len >= 0).all() and (seg_len <= max_span).all()
    if not (contiguous.all() and (total == lengths).all() and starts_ok.all() and packed.all() and in_range):
        raise AlignmentError("segments do not tile the sequence; refusing to build a misaligned batch")


def add_segments(batch: dict[str, torch.Tensor], segmenter: Segmenter) -> dict:
    """``batch`` (``input_ids`` [B, L], ``lengths`` [B]) plus its checked segmentation by ``segmenter``:
    ``seg_start``/``seg_len`` [B, S] long (CPU) and ``max_span`` (int, the width spans are padded to)."""
    ids, lengths = batch["input_ids"].cpu().numpy(), batch["lengths"].cpu().numpy()
    starts, lens = segmenter.segment_batch(ids, lengths)
    check_segments(starts, lens, lengths, segmenter.max_span)
    return {**batch, "seg_start": torch.from_numpy(starts), "seg_len": torch.from_numpy(lens),
            "max_span": segmenter.max_span}


def build_merged_batch(
    input_ids: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    embeddings: nn.Module,
    encoder: SpanEncoder | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    lengths: torch.Tensor | None = None,
    max_span: int | None = None,
) -> MergedBatch:
    """Assemble the compressed input of a batch; the span encoder is called once on all its spans.

    Parameters
    ----------
    input_ids : [B, L] long original token ids (right-padded).
    seg_start, seg_len : [B, S] long segmentation from a :class:`~umim.merging.span_encoder.Segmenter`.
    embeddings : the frozen LM's input embedding module (``model.get_input_embeddings()``).
    encoder : the span encoder (``[N, n_max, d]`` + mask ``[N, n_max]`` -> ``[N, d]``); a plain
        function of that signature works too.
    lengths : [B] valid lengths (default: all L).
    max_span : n_max, the width spans are padded to: the segmenter's largest span (default the
        encoder's ``max_span``, for a plain function the batch's longest segment).
    """
    B, L = input_ids.shape
    device = input_ids.device
    if lengths is None:
        lengths = torch.full((B,), L, dtype=torch.long, device=device)
    n_max = max_span or getattr(encoder, "max_span", None) or max(int(seg_len.max()) if seg_len.numel() else 1, 1)
    if seg_start.device.type == "cpu":  # on accelerators the collate step already checked (no sync)
        check_segments(seg_start.numpy(), seg_len.numpy(), lengths.cpu().numpy(), n_max)
    seg_start, seg_len = seg_start.to(device), seg_len.to(device)
    S = seg_start.shape[1]
    valid = seg_len > 0

    embeds = embeddings(input_ids.gather(1, seg_start))  # [B, S, d]
    merged = seg_len > 1
    b_idx, s_idx = merged.nonzero(as_tuple=True)
    offs = torch.arange(n_max, device=device)
    span_mask = offs[None, :] < seg_len[b_idx, s_idx, None]  # [N, n_max] for the N merged spans
    cols = (seg_start[b_idx, s_idx, None] + offs[None, :]).clamp(max=L - 1)
    span_ids = input_ids[b_idx[:, None], cols]  # [N, n_max]
    surrogates = encoder(embeddings(span_ids), span_mask)  # [N, d], one call for the whole batch
    embeds = embeds.index_put((b_idx, s_idx), surrogates)
    embeds = embeds * valid[..., None].to(embeds.dtype)

    # original -> compressed index: running count of segment starts
    is_start = torch.zeros(B, L + 1, dtype=torch.long, device=device)
    is_start.scatter_(1, torch.where(valid, seg_start, L), 1)
    orig_to_comp = is_start[:, :L].cumsum(1) - 1
    orig_to_comp = orig_to_comp.masked_fill(torch.arange(L, device=device)[None] >= lengths[:, None], -1)

    s_range = torch.arange(S, device=device)
    first_merge = torch.where(merged, s_range[None], S).min(dim=1).values  # [B], S if no merge
    loss_mask = valid & (s_range[None] >= first_merge[:, None])
    teacher_pos = (seg_start + seg_len - 1).clamp(min=0)
    return MergedBatch(
        inputs_embeds=embeds,
        attention_mask=valid.long(),
        seg_start=seg_start,
        seg_len=seg_len,
        orig_to_comp=orig_to_comp,
        loss_mask=loss_mask,
        teacher_pos=teacher_pos,
        num_original=int(lengths.sum()),
        num_compressed=int(valid.sum()),
    )


def aligned_hidden(
    teacher_hidden: torch.Tensor, student_hidden: torch.Tensor, batch: MergedBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the hidden states at aligned loss positions.

    Parameters
    ----------
    teacher_hidden : [B, L, d] final hidden states of the LM on the original ids.
    student_hidden : [B, S, d] final hidden states of the LM on the merged embeddings.

    Returns
    -------
    teacher [N, d], student [N, d] with N = ``batch.loss_mask.sum()``; row i of both predicts the
    same next token.
    """
    b_idx, s_idx = batch.loss_mask.nonzero(as_tuple=True)
    t_idx = batch.teacher_pos[b_idx, s_idx]
    # the next target of both sides is the original token right after the segment
    if (batch.orig_to_comp[b_idx, t_idx] != s_idx).any():
        raise AlignmentError("teacher position does not belong to the aligned compressed segment")
    return teacher_hidden[b_idx, t_idx], student_hidden[b_idx, s_idx]
