"""What every LightningModule that trains a span encoder around a frozen LM shares (UMIM's merger,
the K-token encoder): the LM loaded and kept in eval mode, the encoder built from a seed, each batch
segmented (by the data module, or by the model's own segmenter), one step for train/val/test, AdamW
with linear warmup + cosine decay over the trainable parameters only, the TR logged per stage, and
checkpoints without the frozen LM's weights."""

from __future__ import annotations

from dataclasses import asdict
from typing import ClassVar

import lightning as L
import torch

from umim.errors import UserError
from umim.fingerprint import tokenizer_fingerprint
from umim.lm import LMSpec, load_lm, load_tokenizer
from umim.merging.batch import MergedBatch, add_segments
from umim.merging.span_encoder import Segmenter, SpanEncoder
from umim.training.alignment_metrics import PositionMeanLoss, TokenReduction

STAGES = ("train", "val", "test")


class FrozenLMModule(L.LightningModule):
    """Base class: a frozen LM (``self.lm``) and a trainable span encoder at ``encoder_name``.

    Subclasses choose the encoder (:meth:`build_encoder`), optionally a segmenter of their own
    (:meth:`segmenter`; otherwise batches come segmented by the data module) and the objective
    (:meth:`loss`).
    """

    encoder_name: ClassVar[str] = "encoder"
    """Attribute the span encoder lives at; its checkpoint keys start with it."""
    settings_args: ClassVar[tuple[str, ...]] = ()
    """Init arguments holding settings dataclasses; the subclass records them as plain dicts."""

    def __init__(self, lm: LMSpec | dict | None, lr: float, weight_decay: float, warmup_ratio: float, seed: int):
        super().__init__()
        self.lm_spec = LMSpec(**lm) if isinstance(lm, dict) else (lm or LMSpec())
        self.lr, self.weight_decay, self.warmup_ratio, self.seed = lr, weight_decay, warmup_ratio, seed
        # every class's init arguments; plain dicts in checkpoints, so they load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["lm", *self.settings_args])
        self.hparams.update(lm=asdict(self.lm_spec))
        self.lm = None
        setattr(self, self.encoder_name, None)
        self.tr = torch.nn.ModuleDict({f"{s}_tr": TokenReduction() for s in STAGES})
        self.eval_loss = torch.nn.ModuleDict({f"{s}_loss": PositionMeanLoss() for s in STAGES if s != "train"})
        self.strict_loading = False  # checkpoints hold the trained weights only, not the frozen LM

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lm is not None:
            self.lm.eval()  # the frozen LM never runs dropout while the small module trains
        return self

    # -- model -------------------------------------------------------------------------------------
    @property
    def span_encoder(self) -> SpanEncoder | None:
        """The trainable span encoder (None until :meth:`configure_model`)."""
        return getattr(self, self.encoder_name)

    def build_encoder(self, hidden_size: int, tokenizer_fp: dict) -> SpanEncoder:
        """A fresh span encoder for an LM of ``hidden_size`` and that tokenizer (seeded by the caller)."""
        raise NotImplementedError(f"{type(self).__name__} builds no span encoder")

    def configure_model(self) -> None:
        """Load the frozen LM and build the encoder (idempotent; Lightning calls it before fitting)."""
        if self.lm is not None:
            return
        self.lm = load_lm(self.lm_spec)
        fp = tokenizer_fingerprint(load_tokenizer(self.lm_spec))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            setattr(self, self.encoder_name, self.build_encoder(self.lm.get_input_embeddings().embedding_dim, fp))

    def head_calls(self):
        """Under the sharded strategy the output head is a collective that every rank must call equally
        often: a function mapping this rank's number of head calls to the largest over ranks (None when
        the head is not sharded)."""
        from umim.training.strategy import DecoderLayerFSDP

        trainer = self._trainer
        if trainer is None or trainer.world_size == 1 or not isinstance(trainer.strategy, DecoderLayerFSDP):
            return None
        strategy = trainer.strategy
        return lambda n: int(strategy.reduce(torch.tensor(n, device=self.device), reduce_op="max"))

    # -- steps -------------------------------------------------------------------------------------
    def segmenter(self, stage: str) -> Segmenter | None:
        """The model's own segmenter for ``stage`` (its encoder merges only those spans); None: batches
        come segmented by the data module."""
        return None

    def segment(self, batch: dict[str, torch.Tensor], stage: str) -> dict:
        """``batch`` with its segmentation: the model's own when it has one, else the data module's."""
        own = self.segmenter(stage)
        if own is not None:
            return add_segments(batch, own)
        if "seg_start" not in batch:
            raise UserError(f"{type(self).__name__} trains on batches segmented by the data module: use "
                            "UMIMDataModule (merge rules), not a data module that leaves blocks whole")
        return batch

    def loss(self, batch: dict, stage: str) -> tuple[torch.Tensor, MergedBatch]:
        """The objective on a segmented batch: (scalar loss, merged batch). Each subclass defines it."""
        raise NotImplementedError(f"{type(self).__name__} defines no training objective")

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        batch = self.segment(batch, stage)
        loss, merged = self.loss(batch, stage)
        self.log_step(loss, merged, batch["input_ids"].shape[0], stage)
        return loss

    def log_step(self, loss: torch.Tensor, merged, batch_size: int, stage: str) -> None:
        """Log the loss and the stage's running TR (``merged``: the step's :class:`MergedBatch`)."""
        self.tr[f"{stage}_tr"].update(merged.num_original, merged.num_compressed)
        if stage == "train":
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size,
                     sync_dist=True)
        else:  # the mean over every aligned position of every rank: checkpointing and early stopping judge all of it
            self.eval_loss[f"{stage}_loss"].update(loss, merged.loss_mask.sum())
            self.log(f"{stage}/loss", self.eval_loss[f"{stage}_loss"], prog_bar=True, on_step=False, on_epoch=True)
        self.log(f"{stage}/tr", self.tr[f"{stage}_tr"], on_step=False, on_epoch=True)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test")

    # -- optimisation ------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.span_encoder.parameters())

    def configure_optimizers(self):
        from transformers import get_cosine_schedule_with_warmup

        opt = torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        # estimating built the train loader before a resumed run restores its loops, so that loader
        # would never receive its saved position (Lightning loads loader state only when it builds the
        # loader while restarting): drop it, and the fit loop builds it again after the restore
        self.trainer.fit_loop._combined_loader = None
        sched = get_cosine_schedule_with_warmup(opt, int(self.warmup_ratio * total), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints: trained weights only ---------------------------------------------------------
    def keeps_lm_weight(self, key: str) -> bool:
        """Whether a ``lm.*`` weight belongs in checkpoints (trained adapters do; the frozen LM does not)."""
        return False

    def keeps_in_checkpoint(self, key: str) -> bool:
        """Whether the state-dict entry ``key`` belongs in checkpoints (everything but the frozen LM)."""
        return not key.startswith("lm.") or self.keeps_lm_weight(key)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint)

    def check_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint trained for another LM (before its weights meet this model's)."""
        saved = (checkpoint.get("hyper_parameters") or {}).get("lm") or {}
        mine = getattr(getattr(self, "lm_spec", None), "name_or_path", None)
        if saved.get("name_or_path") and mine and saved["name_or_path"] != mine:
            raise UserError(f"the checkpoint was trained for the LM {saved['name_or_path']!r}, this run uses {mine!r}: "
                            "resume with the config it was trained with")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.keeps_in_checkpoint(k)}
