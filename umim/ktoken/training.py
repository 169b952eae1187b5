"""Training K-Token Merging with the project's Lightning pipeline (``umim fit --config conf/ktoken.yaml``).

Each training block of ``n`` tokens is treated as a prompt: a leading share ``f`` of it (``f`` drawn
per row from ``ktoken.merge_fraction``, so every prefix length is seen) is merged into
``floor(f n / K)`` K-blocks by the encoder, the rest stays token by token
(:class:`umim.ktoken.encoder.KBlockSegmenter`, the model's own segmenter: K is an encoder setting).
The merged batch is built by the shared :func:`umim.merging.batch.build_merged_batch`, so K-blocks
are just segments of length K.

Two objectives:

* :class:`KTokenDistillation` -- the LM stays frozen; only the encoder trains, on the project's
  KL(teacher || student) at aligned positions (teacher = LM on the original ids): UMIM's
  :class:`~umim.training.distillation.SpanDistillation` with the K-token encoder.
* :class:`KTokenLoRA` -- as K-Token Merging describes: LoRA adapters on the LM (``peft``) and the
  encoder train jointly on the task loss, the next-token cross-entropy of the text after the merged
  prefix. Only adapter and encoder weights receive gradients.

When fitting ends, the final encoder (and adapter) is written to ``export_dir``:
``config.json`` + ``encoder.safetensors`` (+ ``adapter/`` for LoRA), the folder that
:class:`umim_eval.methods.ktoken_merge.KTokenMerge` loads.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from umim.errors import UserError
from umim.ktoken.encoder import (
    KBlockSegmenter,
    KTokenConfig,
    KTokenEncoder,
    check_k,
    is_ktoken_dir,
)
from umim.ktoken.lora import (
    ADAPTER_DIR,
    LoRASettings,
    add_lora,
    load_adapter,
    save_adapter,
)
from umim.lm import LMSpec
from umim.merging.batch import MergedBatch, build_merged_batch
from umim.merging.span_encoder import SpanEncoder
from umim.safe_io import check_replaceable, check_writable_dir, replace_dir, staging_dir
from umim.training.datamodule import SpanDataModule
from umim.training.distillation import SpanDistillation
from umim.training.frozen_lm_module import FrozenLMModule
from umim.training.strategy import load_trainable_state_dict, trainable_state_dict

__all__ = ["ADAPTER_DIR", "KTokenDataModule", "KTokenDistillation", "KTokenLoRA", "KTokenModule", "KTokenSettings",
           "LoRASettings", "add_lora", "load_adapter", "save_adapter", "task_loss", "task_targets"]


@dataclass
class KTokenSettings:
    """What is merged during training."""

    k: int = 4
    """Tokens per merged block K."""
    merge_fraction: list[float] = field(default_factory=lambda: [0.25, 0.75])
    """[lo, hi]: each training row merges a leading share drawn uniformly from this range (its
    full K-blocks); validation and test use the midpoint. The rest of the row stays unmerged."""


class KTokenDataModule(SpanDataModule):
    """Packed blocks of a corpus, left whole: the K-token module cuts its own K-blocks, so no merge
    rules are mined (and ``rules``/``mining`` are refused)."""

    uses_rules = False


# -- the task loss ---------------------------------------------------------------------------------
def task_targets(batch: dict[str, torch.Tensor], merged: MergedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and targets of the task loss: the text after the merged prefix.

    The compressed position of a segment predicts the original token right after it; the loss
    covers the last merged block (it predicts the first token after the prefix) and every later
    position whose next token is still in the row (all positions when nothing is merged).

    Returns
    -------
    mask : [B, S] bool, positions in the loss.
    targets : [B, S] long, the next original token of each position (meaningless where ``mask`` is False).
    """
    ids, lengths = batch["input_ids"], batch["lengths"].to(merged.seg_len.device)
    S = merged.seg_len.shape[1]
    nxt = merged.seg_start + merged.seg_len  # [B, S] original index of the predicted token
    s_range = torch.arange(S, device=nxt.device)[None]
    last_merged = torch.where(merged.seg_len > 1, s_range, -1).max(dim=1).values  # [B], -1 if none
    mask = merged.attention_mask.bool() & (nxt < lengths[:, None]) & (s_range >= last_merged.clamp(min=0)[:, None])
    targets = ids.gather(1, nxt.clamp(max=ids.shape[1] - 1))
    return mask, targets


def task_loss(lm, encoder: SpanEncoder, batch: dict) -> tuple[torch.Tensor, MergedBatch]:
    """Mean next-token CE of the text after the merged prefix; returns (loss, merged batch).

    ``batch`` holds ``input_ids`` [B, L], ``lengths`` [B], ``seg_start``/``seg_len`` [B, S] (and
    optionally ``max_span``). The LM (with its adapters) runs on the merged embeddings; logits exist
    only at loss positions.
    """
    merged = build_merged_batch(batch["input_ids"], batch["seg_start"], batch["seg_len"], lm.get_input_embeddings(),
                                encoder, batch["lengths"], batch.get("max_span"))
    h = lm.base_model(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                      use_cache=False).last_hidden_state
    mask, targets = task_targets(batch, merged)
    if not mask.any():
        return h.sum() * 0.0, merged  # keeps the graph when there is nothing to predict
    logits = lm.get_output_embeddings()(h[mask]).float()  # [N, V]
    return F.cross_entropy(logits, targets[mask]), merged


# -- LightningModules ------------------------------------------------------------------------------
class KTokenModule(FrozenLMModule):
    """What both objectives add to :class:`~umim.training.frozen_lm_module.FrozenLMModule`: the
    K-token encoder, its K-block segmenter, and the export when fitting ends."""

    def set_ktoken(self, ktoken: KTokenSettings | dict | None, export_dir: str | None) -> None:
        """Check and keep the K-token settings (the subclass's ``__init__`` calls this)."""
        self.ktoken = KTokenSettings(**ktoken) if isinstance(ktoken, dict) else (ktoken or KTokenSettings())
        check_k(self.ktoken.k)
        lo, hi = self.ktoken.merge_fraction
        if not 0.0 <= lo <= hi <= 1.0:
            raise UserError(f"merge_fraction must be [lo, hi] with 0 <= lo <= hi <= 1, "
                            f"got {self.ktoken.merge_fraction}")
        self.export_dir = export_dir
        self.hparams.update(ktoken=asdict(self.ktoken))

    def build_encoder(self, hidden_size: int, tokenizer_fp: dict) -> KTokenEncoder:
        return KTokenEncoder(KTokenConfig(hidden_size=hidden_size, k=self.ktoken.k, lm_name=self.lm_spec.name_or_path,
                                          tokenizer=tokenizer_fp))

    def segmenter(self, stage: str) -> KBlockSegmenter:
        """K-blocks in a leading share of each row: drawn per row in training (seeded by the step, so a
        resumed run draws the same prefixes), the midpoint share otherwise."""
        lo, hi = self.ktoken.merge_fraction
        if stage == "train":
            return KBlockSegmenter(self.ktoken.k, (lo, hi), seed=self.seed * 1_000_003 + self.global_step)
        return KBlockSegmenter(self.ktoken.k, (lo + hi) / 2)

    def export(self, path: str | Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the encoder into ``path`` (a stale ``adapter/`` there is removed).

        ``weights``: full tensors of the trained state (``encoder.*``, adapters); default this
        module's own, which must then not be sharded."""
        path = Path(path)
        weights = trainable_state_dict(self, self.keeps_in_checkpoint) if weights is None else weights
        check_replaceable(path, is_ktoken_dir, "K-token")
        encoder = KTokenEncoder(self.span_encoder.config)
        prefix = f"{self.encoder_name}."
        encoder.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
        stage = staging_dir(path)  # the whole folder (encoder, adapter) is swapped in at once
        try:
            encoder.save_pretrained(stage)
            self.export_extra(stage, weights)
            return replace_dir(stage, path, is_ktoken_dir, "K-token")
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def export_extra(self, folder: Path, weights: dict[str, torch.Tensor]) -> None:
        """Write what else a trained K-token folder holds (the LoRA variant: its adapter)."""

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.export_dir:  # refuse before training, not after it
            check_writable_dir(self.export_dir)
            check_replaceable(self.export_dir, is_ktoken_dir, "K-token")

    def on_train_end(self) -> None:
        """Export the best checkpoint's weights (the final ones when no checkpoint monitors a metric).

        Every rank takes part (sharded weights are loaded and gathered collectively); rank 0 writes."""
        if not self.export_dir:
            return
        cb = self.trainer.checkpoint_callback
        best = getattr(cb, "best_model_path", "") if cb is not None else ""
        if best:  # the checkpoint holds only the trained weights (encoder, adapters)
            load_trainable_state_dict(self, torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
        weights = trainable_state_dict(self, self.keeps_in_checkpoint)
        if self.trainer.is_global_zero:
            which = f"best checkpoint {best}" if best else "final weights"
            print(f"K-token merging (K={self.ktoken.k}, {which}) exported to {self.export(self.export_dir, weights)}")


class KTokenDistillation(KTokenModule, SpanDistillation):
    """Frozen LM + trainable K-token encoder, trained by KL distillation at aligned positions."""

    settings_args = ("ktoken",)

    def __init__(self, lm: LMSpec | dict | None = None, ktoken: KTokenSettings | dict | None = None,
                 lr: float = 1e-3, export_dir: str | None = None, **kwargs):
        """
        Parameters
        ----------
        lm : the frozen LM (hub id / folder / "embedded").
        ktoken : K and the merged share of each training row.
        lr : AdamW learning rate.
        export_dir : folder the trained encoder is written to when fitting ends (None: not written).
        kwargs : the other distillation settings of :class:`~umim.training.distillation.SpanDistillation`.
        """
        super().__init__(lm=lm, lr=lr, **kwargs)
        self.set_ktoken(ktoken, export_dir)


class KTokenLoRA(KTokenModule):
    """LoRA-adapted LM + K-token encoder, trained jointly on the task loss (K-Token Merging's recipe)."""

    settings_args = ("ktoken", "lora")

    def __init__(
        self,
        lm: LMSpec | dict | None = None,
        ktoken: KTokenSettings | dict | None = None,
        lora: LoRASettings | dict | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        seed: int = 0,
        export_dir: str | None = None,
    ):
        """
        Parameters
        ----------
        lm : the LM to adapt (hub id / folder / "embedded"); its base weights stay frozen.
        ktoken : K and the merged share of each training row.
        lora : adapter rank, scaling, dropout and target modules.
        lr, weight_decay : AdamW settings (shared by adapters and encoder).
        warmup_ratio : share of all optimizer steps spent in linear warmup, then cosine decay.
        seed : seed of the encoder's and adapters' initialisation and of the training prefixes.
        export_dir : folder the encoder and ``adapter/`` are written to when fitting ends.
        """
        super().__init__(lm, lr, weight_decay, warmup_ratio, seed)
        self.set_ktoken(ktoken, export_dir)
        self.lora = LoRASettings(**lora) if isinstance(lora, dict) else (lora or LoRASettings())
        self.hparams.update(lora=asdict(self.lora))

    def configure_model(self) -> None:
        if self.lm is not None:
            return
        super().configure_model()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            add_lora(self.lm, self.lora)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lm is not None:  # adapter dropout follows the module's mode, the base LM stays in eval
            for name, m in self.lm.named_modules():
                if name.endswith("lora_dropout"):
                    m.train(mode)
        return self

    def loss(self, batch, stage):
        return task_loss(self.lm, self.span_encoder, batch)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.span_encoder.parameters()) + [p for p in self.lm.parameters() if p.requires_grad]

    def keeps_lm_weight(self, key: str) -> bool:
        return "lora_" in key  # the adapters are trained; the base LM is not

    def export_extra(self, folder: Path, weights: dict[str, torch.Tensor]) -> None:
        lm_state = {k[len("lm.") :]: v for k, v in weights.items() if k.startswith("lm.")}
        save_adapter(self.lm, folder / ADAPTER_DIR, lm_state)
