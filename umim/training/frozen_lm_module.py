"""What every LightningModule that trains a small module around a frozen LM shares (UMIM's merger,
the K-token encoder): the LM kept in eval mode, one ``_step`` for train/val/test, AdamW with linear
warmup + cosine decay over the trainable parameters only, the TR logged per stage, and checkpoints
without the frozen LM's weights."""

from __future__ import annotations

import lightning as L
import torch

from umim.training.alignment_metrics import PositionMeanLoss, TokenReduction

STAGES = ("train", "val", "test")


class FrozenLMModule(L.LightningModule):
    """Base class: subclasses build ``self.lm`` in ``configure_model`` and define :meth:`_step`
    and :meth:`trainable_parameters`."""

    def __init__(self, lr: float, weight_decay: float, warmup_ratio: float):
        super().__init__()
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.lm = None
        self.tr = torch.nn.ModuleDict({f"{s}_tr": TokenReduction() for s in STAGES})
        self.eval_loss = torch.nn.ModuleDict({f"{s}_loss": PositionMeanLoss() for s in STAGES if s != "train"})
        self.strict_loading = False  # checkpoints hold the trained weights only, not the frozen LM

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lm is not None:
            self.lm.eval()  # the frozen LM never runs dropout while the small module trains
        return self

    # -- steps -------------------------------------------------------------------------------------
    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no step")

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
        raise NotImplementedError(f"{type(self).__name__} names no trainable parameters")

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
        from umim.errors import UserError

        saved = (checkpoint.get("hyper_parameters") or {}).get("lm") or {}
        mine = getattr(getattr(self, "lm_spec", None), "name_or_path", None)
        if saved.get("name_or_path") and mine and saved["name_or_path"] != mine:
            raise UserError(f"the checkpoint was trained for the LM {saved['name_or_path']!r}, this run uses {mine!r}: "
                            "resume with the config it was trained with")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.keeps_in_checkpoint(k)}
