"""LightningModule: distill the frozen LM's token-by-token computation into the merge module.

Teacher = the LM on the original ids (no grad); student = the same frozen LM on the merged
embeddings (gradient flows through it into the merger). Loss = mean KL(teacher || student) over
aligned positions (paper Alg. 1). Only the merger is in the optimizer and in checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from umim.fingerprint import tokenizer_fingerprint
from umim.lm import LMSpec, load_lm, load_tokenizer
from umim.merging.batch import MergedBatch, aligned_hidden, build_merged_batch
from umim.merging.merger import MergeModule, MergerConfig
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
    lm, merger: MergeModule, batch: dict[str, torch.Tensor], metrics=None, chunk_size: int = 512,
    teacher_h: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MergedBatch]:
    """Teacher and student forwards of one segmented batch; returns (mean KL, merged batch).

    ``batch`` holds ``input_ids`` [B, L], ``lengths`` [B], ``seg_start``/``seg_len`` [B, S] (from
    :class:`~umim.training.datamodule.SegmentCollator`). Only final hidden states are computed by the LM
    (``base_model``); logits exist only per chunk of aligned positions.
    """
    if teacher_h is None:
        teacher_h = teacher_hidden(lm, batch)
    merged = build_merged_batch(
        batch["input_ids"], batch["seg_start"], batch["seg_len"], lm.get_input_embeddings(), merger, batch["lengths"]
    )
    student_h = lm.base_model(
        inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask, use_cache=False
    ).last_hidden_state
    t_h, s_h = aligned_hidden(teacher_h, student_h, merged)
    return distillation_loss(t_h, s_h, lm.get_output_embeddings(), chunk_size, metrics), merged


class UMIMDistillation(FrozenLMModule):
    """Frozen teacher LM + trainable merge module, trained by sequential-computation distillation."""

    def __init__(
        self,
        lm: LMSpec | dict | None = None,
        merger: MergerSettings | dict | None = None,
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
        merger : merge-module architecture.
        lr, weight_decay : AdamW settings (paper: 8e-4, 1e-3).
        warmup_ratio : share of all optimizer steps spent in linear warmup, then cosine decay.
        loss_chunk_size : aligned positions projected to the vocabulary at once.
        top_p : p of the top-p overlap metric (paper: 0.7).
        train_metrics : also compute the alignment metrics on training batches.
        seed : seed of the merger's initialisation.
        """
        super().__init__(lr, weight_decay, warmup_ratio)
        # plain dicts in checkpoints, so they load with torch.load(weights_only=True)
        self.lm_spec = LMSpec(**lm) if isinstance(lm, dict) else (lm or LMSpec())
        self.merger_settings = MergerSettings(**merger) if isinstance(merger, dict) else (merger or MergerSettings())
        self.save_hyperparameters(ignore=["lm", "merger"])
        self.hparams.update(lm=asdict(self.lm_spec), merger=asdict(self.merger_settings))
        self.loss_chunk_size, self.train_metrics, self.seed = loss_chunk_size, train_metrics, seed
        self.merger: MergeModule | None = None
        self.metrics = torch.nn.ModuleDict({f"{s}_align": alignment_metrics(top_p) for s in STAGES})

    # -- model -------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the frozen LM and build the merger (idempotent; Lightning calls it before fitting)."""
        if self.lm is not None:
            return
        self.lm = load_lm(self.lm_spec)
        tok = load_tokenizer(self.lm_spec)
        d = self.lm.get_input_embeddings().embedding_dim
        config = MergerConfig(
            hidden_size=d,
            lm_name=self.lm_spec.name_or_path,
            tokenizer=tokenizer_fingerprint(tok),
            **asdict(self.merger_settings),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.merger = MergeModule(config)

    # -- step --------------------------------------------------------------------------------------
    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        metrics = self.metrics[f"{stage}_align"] if (stage != "train" or self.train_metrics) else None
        loss, merged = distill_forward(self.lm, self.merger, batch, metrics, self.loss_chunk_size)
        self.log_step(loss, merged, batch["input_ids"].shape[0], stage)
        if metrics is not None:
            self.log_dict({f"{stage}/{k}": m for k, m in metrics.items()}, on_step=False, on_epoch=True)
        return loss

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.merger.parameters())
