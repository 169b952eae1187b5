"""LightningModule: distill the frozen LM's token-by-token computation into a span encoder.

Teacher = the LM on the original ids (no grad); student = the same frozen LM on the merged
embeddings (gradient flows through it into the encoder). Loss = mean KL(teacher || student) over
aligned positions (paper Alg. 1). Only the encoder is in the optimizer and in checkpoints.

:class:`SpanDistillation` trains any :class:`~umim.merging.span_encoder.SpanEncoder` on batches cut
by any :class:`~umim.merging.span_encoder.Segmenter`; :class:`UMIMDistillation` chooses UMIM's merge
module (batches segmented by the merge rules in the data module), and
:class:`umim.ktoken.training.KTokenDistillation` the K-token encoder with its K-block segmenter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from umim.lm import LMSpec
from umim.merging.batch import MergedBatch, aligned_hidden, build_merged_batch
from umim.merging.merger import MergeModule, MergerConfig
from umim.merging.span_encoder import SpanEncoder
from umim.training.alignment_metrics import alignment_metrics
from umim.training.distill_loss import distillation_loss
from umim.training.frozen_lm_module import STAGES, FrozenLMModule


@dataclass
class MergerSettings:
    """Architecture of the merge module (its hidden size comes from the LM)."""

    num_heads: int = 4
    """Attention heads h (paper: 4)."""
    token_processor: bool = False
    """Per-token MLP + GELU + LayerNorm before pooling (Pseudocode 2)."""


def teacher_hidden(lm, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, L, d] final hidden states of the frozen LM on the original ids (no grad)."""
    ids, lengths = batch["input_ids"], batch["lengths"]
    mask = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).long()
    with torch.no_grad():
        # use_cache=False: a KV cache would be appended to again when checkpointed layers recompute
        return lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def distill_forward(
    lm, encoder: SpanEncoder | Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch: dict,
    metrics=None, chunk_size: int = 512, teacher_h: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MergedBatch]:
    """Teacher and student forwards of one segmented batch; returns (mean KL, merged batch).

    ``batch`` holds ``input_ids`` [B, L], ``lengths`` [B], ``seg_start``/``seg_len`` [B, S] and
    ``max_span`` (:func:`~umim.merging.batch.add_segments`). Only final hidden states are computed
    by the LM (``base_model``); logits exist only per chunk of aligned positions.
    """
    if teacher_h is None:
        teacher_h = teacher_hidden(lm, batch)
    merged = build_merged_batch(batch["input_ids"], batch["seg_start"], batch["seg_len"], lm.get_input_embeddings(),
                                encoder, batch["lengths"], batch.get("max_span"))
    student_h = lm.base_model(
        inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask, use_cache=False
    ).last_hidden_state
    t_h, s_h = aligned_hidden(teacher_h, student_h, merged)
    return distillation_loss(t_h, s_h, lm.get_output_embeddings(), chunk_size, metrics), merged


class SpanDistillation(FrozenLMModule):
    """Frozen teacher LM + a trainable span encoder, trained by sequential-computation distillation.
    Subclasses only choose the encoder (and, if it cuts its own spans, the segmenter)."""

    def __init__(
        self,
        lm: LMSpec | dict | None = None,
        lr: float = 8e-4,
        weight_decay: float = 1e-3,
        warmup_ratio: float = 0.05,
        loss_chunk_size: int = 512,
        top_p: float = 0.7,
        train_metrics: bool = True,
        seed: int = 0,
    ):
        """
        Parameters
        ----------
        lm : the frozen LM (hub id / folder / "embedded").
        lr, weight_decay : AdamW settings (paper: 8e-4, 1e-3).
        warmup_ratio : share of all optimizer steps spent in linear warmup, then cosine decay.
        loss_chunk_size : aligned positions projected to the vocabulary at once.
        top_p : p of the top-p overlap metric (paper: 0.7).
        train_metrics : also compute the alignment metrics on training batches.
        seed : seed of the encoder's initialisation (and of a segmenter's draws).
        """
        super().__init__(lm, lr, weight_decay, warmup_ratio, seed)
        self.loss_chunk_size, self.train_metrics = loss_chunk_size, train_metrics
        self.metrics = torch.nn.ModuleDict({f"{s}_align": alignment_metrics(top_p) for s in STAGES})

    def loss(self, batch: dict, stage: str) -> tuple[torch.Tensor, MergedBatch]:
        metrics = self.metrics[f"{stage}_align"] if (stage != "train" or self.train_metrics) else None
        loss, merged = distill_forward(self.lm, self.span_encoder, batch, metrics, self.loss_chunk_size)
        if metrics is not None:
            self.log_dict({f"{stage}/{k}": m for k, m in metrics.items()}, on_step=False, on_epoch=True)
        return loss, merged


class UMIMDistillation(SpanDistillation):
    """UMIM: the merge module (attention pooling), on batches segmented by the merge rules."""

    encoder_name = "merger"
    settings_args = ("merger",)

    def __init__(self, lm: LMSpec | dict | None = None, merger: MergerSettings | dict | None = None, **kwargs):
        """
        Parameters
        ----------
        lm : the frozen LM (hub id / folder / "embedded").
        merger : merge-module architecture.
        kwargs : the distillation settings of :class:`SpanDistillation` (lr, weight_decay, ...).
        """
        super().__init__(lm=lm, **kwargs)
        self.merger_settings = MergerSettings(**merger) if isinstance(merger, dict) else (merger or MergerSettings())
        self.hparams.update(merger=asdict(self.merger_settings))

    def build_encoder(self, hidden_size: int, tokenizer_fp: dict) -> MergeModule:
        return MergeModule(MergerConfig(hidden_size=hidden_size, lm_name=self.lm_spec.name_or_path,
                                        tokenizer=tokenizer_fp, **asdict(self.merger_settings)))
