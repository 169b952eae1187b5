"""Training K-Token Merging with the project's Lightning pipeline (``umim fit --config conf/ktoken.yaml``).

Each training block of ``n`` tokens is treated as a prompt: a leading share ``f`` of it (``f`` drawn
per row from ``ktoken.merge_fraction``, so every prefix length is seen) is merged into
``floor(f n / K)`` K-blocks by the encoder, the rest stays token by token
(:func:`umim.ktoken.encoder.kblock_segments`). The merged batch is built by the shared
:func:`umim.merging.batch.build_merged_batch`, so K-blocks are just segments of length K.

Two objectives:

* :class:`KTokenDistillation` -- the LM stays frozen; only the encoder trains, on the project's
  KL(teacher || student) at aligned positions (teacher = LM on the original ids), as UMIM does.
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

import numpy as np
import torch
import torch.nn.functional as F

from umim.errors import UserError
from umim.fingerprint import tokenizer_fingerprint
from umim.ktoken.encoder import (
    KTokenConfig,
    KTokenEncoder,
    check_k,
    is_ktoken_dir,
    kblock_segments,
)
from umim.lm import LMSpec, load_lm, load_tokenizer
from umim.merging.batch import MergedBatch, build_merged_batch
from umim.safe_io import check_replaceable, check_writable_dir, replace_dir, staging_dir
from umim.training.alignment_metrics import alignment_metrics
from umim.training.datamodule import UMIMDataModule
from umim.training.distillation import distill_forward
from umim.training.frozen_lm_module import STAGES, FrozenLMModule
from umim.training.strategy import load_trainable_state_dict, trainable_state_dict

ADAPTER_DIR = "adapter"


# -- settings --------------------------------------------------------------------------------------
@dataclass
class KTokenSettings:
    """What is merged during training."""

    k: int = 4
    """Tokens per merged block (2, 3 or 4)."""
    merge_fraction: list[float] = field(default_factory=lambda: [0.25, 0.75])
    """[lo, hi]: each training row merges a leading share drawn uniformly from this range (its
    full K-blocks); validation and test use the midpoint. The rest of the row stays unmerged."""


@dataclass
class LoRASettings:
    """LoRA adapters on the LM (``peft.LoraConfig``)."""

    r: int = 8
    """Rank of each adapter."""
    alpha: int = 16
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input during training."""
    target_modules: list[str] | str | None = None
    """Module names to adapt, or "all-linear"; None: peft's default for the architecture (q_proj,
    v_proj for Llama)."""


# -- LoRA adapters ---------------------------------------------------------------------------------
def add_lora(lm, settings: LoRASettings) -> None:
    """Inject fresh LoRA adapters into ``lm`` in place; the base weights stay frozen.

    The model stays a plain Hugging Face model (``lm.base_model``, ``lm.generate`` work as before),
    and only the adapter parameters have ``requires_grad``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, bias="none")
    lm.requires_grad_(False)
    inject_adapter_in_model(config, lm)
    for name, p in lm.named_parameters():
        p.requires_grad_("lora_" in name)


def save_adapter(lm, path: str | Path, lm_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``lm``'s LoRA adapter in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``);
    ``lm_state``: the LM's (gathered) state dict to take the adapter weights from, default its own."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not hasattr(lm, "peft_config"):
        raise UserError("the LM carries no LoRA adapter to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lm.peft_config["default"].save_pretrained(str(path))
    if lm_state is None:
        state = get_peft_model_state_dict(lm)
    else:  # peft's get_peft_model_state_dict(lm, state_dict=...) returns {} once the layers are wrapped for
        # activation checkpointing (peft 0.21): name the adapter weights as peft does (no adapter name)
        state = {k.replace(".default.", "."): v for k, v in lm_state.items() if "lora_" in k}
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(path / "adapter_model.safetensors"))
    return path


def load_adapter(lm, path: str | Path) -> None:
    """Inject the saved LoRA adapter at ``path`` into ``lm`` in place (frozen, inference only)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a saved LoRA adapter")
    if hasattr(lm, "peft_config"):
        raise UserError("the LM already carries a LoRA adapter; load the adapter into a fresh LM")
    inject_adapter_in_model(LoraConfig.from_pretrained(str(path)), lm)
    result = set_peft_model_state_dict(lm, load_file(str(path / "adapter_model.safetensors")))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise UserError(f"adapter in {path} does not match the LM: {len(missing)} adapter weights missing, e.g. {missing[0]}")
    lm.requires_grad_(False)


# -- data ------------------------------------------------------------------------------------------
class BlockCollator:
    """Stack packed blocks; K-blocks are cut in the LightningModule (K is a model setting)."""

    def __call__(self, blocks: list[np.ndarray]) -> dict[str, torch.Tensor]:
        ids = np.stack(blocks)
        return {"input_ids": torch.from_numpy(ids), "lengths": torch.full((len(ids),), ids.shape[1], dtype=torch.long)}


class KTokenDataModule(UMIMDataModule):
    """Packed blocks of a corpus, without merge rules (nothing is mined)."""

    def __init__(
        self,
        corpus: str = "pydoc",
        lm: LMSpec | None = None,
        block_size: int = 256,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_blocks: int | None = None,
        max_eval_blocks: int | None = None,
        seed: int = 0,
    ):
        """Same settings as :class:`~umim.training.datamodule.UMIMDataModule`, less ``rules`` and ``mining``."""
        super().__init__(corpus=corpus, lm=lm, block_size=block_size, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers,
                         max_train_blocks=max_train_blocks, max_eval_blocks=max_eval_blocks, seed=seed)

    def prepare_data(self) -> None:
        for split in ("train", "validation", "test"):
            self._tokens(split)

    def load_rules(self) -> None:
        return None

    def collator(self) -> BlockCollator:
        return BlockCollator()


# -- segmentation and losses -----------------------------------------------------------------------
def prefix_blocks(lengths: torch.Tensor, k: int, fraction: torch.Tensor | float) -> torch.Tensor:
    """[B] long, full K-blocks in the leading ``fraction`` ([B] or scalar) of each row's valid tokens."""
    frac = torch.as_tensor(fraction, dtype=torch.float64, device=lengths.device)
    return torch.floor(frac * lengths.double() / k).long().clamp(min=0).minimum(lengths // k)


def segmented(batch: dict[str, torch.Tensor], k: int, n_blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """``batch`` plus the ``seg_start``/``seg_len`` [B, S] of ``n_blocks`` [B] leading K-blocks per row."""
    seg_start, seg_len = kblock_segments(batch["lengths"].cpu(), k, n_blocks.cpu())
    return {**batch, "seg_start": seg_start, "seg_len": seg_len}


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


def task_loss(lm, encoder: KTokenEncoder, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, MergedBatch]:
    """Mean next-token CE of the text after the merged prefix; returns (loss, merged batch).

    ``batch`` holds ``input_ids`` [B, L], ``lengths`` [B], ``seg_start``/``seg_len`` [B, S]. The LM
    (with its adapters) runs on the merged embeddings; logits exist only at loss positions.
    """
    merged = build_merged_batch(batch["input_ids"], batch["seg_start"], batch["seg_len"], lm.get_input_embeddings(),
                                encoder, batch["lengths"])
    h = lm.base_model(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                      use_cache=False).last_hidden_state
    mask, targets = task_targets(batch, merged)
    if not mask.any():
        return h.sum() * 0.0, merged  # keeps the graph when there is nothing to predict
    logits = lm.get_output_embeddings()(h[mask]).float()  # [N, V]
    return F.cross_entropy(logits, targets[mask]), merged


# -- LightningModules ------------------------------------------------------------------------------
class KTokenModule(FrozenLMModule):
    """What both objectives share beyond :class:`~umim.training.frozen_lm_module.FrozenLMModule`: the
    encoder, the K-block segmentation of each batch, and the export when fitting ends."""

    def __init__(self, lm, ktoken, lr, weight_decay, warmup_ratio, seed, export_dir):
        super().__init__(lr, weight_decay, warmup_ratio)
        # plain dicts in checkpoints, so they load with torch.load(weights_only=True)
        self.lm_spec = LMSpec(**lm) if isinstance(lm, dict) else (lm or LMSpec())
        self.ktoken = KTokenSettings(**ktoken) if isinstance(ktoken, dict) else (ktoken or KTokenSettings())
        check_k(self.ktoken.k)
        lo, hi = self.ktoken.merge_fraction
        if not 0.0 <= lo <= hi <= 1.0:
            raise UserError(f"merge_fraction must be [lo, hi] with 0 <= lo <= hi <= 1, got {self.ktoken.merge_fraction}")
        self.seed, self.export_dir = seed, export_dir
        self.encoder: KTokenEncoder | None = None

    def configure_model(self) -> None:
        """Load the frozen LM and build the encoder (idempotent; Lightning calls it before fitting)."""
        if self.lm is not None:
            return
        self.lm = load_lm(self.lm_spec)
        config = KTokenConfig(
            hidden_size=self.lm.get_input_embeddings().embedding_dim,
            k=self.ktoken.k,
            lm_name=self.lm_spec.name_or_path,
            tokenizer=tokenizer_fingerprint(load_tokenizer(self.lm_spec)),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.encoder = KTokenEncoder(config)

    def n_blocks(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """[B] K-blocks to merge per row: a random share of the row in training, the midpoint otherwise."""
        lo, hi = self.ktoken.merge_fraction
        lengths = batch["lengths"].cpu()
        if stage == "train":
            # seeded by the step, so a resumed run draws the same prefixes
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step)
            frac = lo + (hi - lo) * torch.rand(len(lengths), generator=g, dtype=torch.float64)
        else:
            frac = (lo + hi) / 2
        return prefix_blocks(lengths, self.ktoken.k, frac)

    def loss(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, MergedBatch]:
        """The objective on a segmented batch: (scalar loss, merged batch). Each subclass defines it."""
        raise NotImplementedError(f"{type(self).__name__} defines no training objective")

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        batch = segmented(batch, self.ktoken.k, self.n_blocks(batch, stage))
        loss, merged = self.loss(batch, stage)
        self.log_step(loss, merged, batch["input_ids"].shape[0], stage)
        return loss

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.encoder.parameters())

    def export(self, path: str | Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the encoder into ``path`` (a stale ``adapter/`` there is removed).

        ``weights``: full tensors of the trained state (``encoder.*``, adapters); default this
        module's own, which must then not be sharded."""
        path = Path(path)
        weights = trainable_state_dict(self, self.keeps_in_checkpoint) if weights is None else weights
        check_replaceable(path, is_ktoken_dir, "K-token")
        encoder = KTokenEncoder(self.encoder.config)
        encoder.load_state_dict({k[len("encoder.") :]: v for k, v in weights.items() if k.startswith("encoder.")})
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


class KTokenDistillation(KTokenModule):
    """Frozen LM + trainable K-token encoder, trained by KL distillation at aligned positions."""

    def __init__(
        self,
        lm: LMSpec | dict | None = None,
        ktoken: KTokenSettings | dict | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        warmup_ratio: float = 0.05,
        loss_chunk_size: int = 512,
        top_p: float = 0.7,
        train_metrics: bool = True,
        seed: int = 0,
        export_dir: str | None = None,
    ):
        """
        Parameters
        ----------
        lm : the frozen LM (hub id / folder / "embedded").
        ktoken : K and the merged share of each training row.
        lr, weight_decay : AdamW settings.
        warmup_ratio : share of all optimizer steps spent in linear warmup, then cosine decay.
        loss_chunk_size : aligned positions projected to the vocabulary at once.
        top_p : p of the top-p overlap metric.
        train_metrics : also compute the alignment metrics on training batches.
        seed : seed of the encoder's initialisation and of the training prefixes.
        export_dir : folder the trained encoder is written to when fitting ends (None: not written).
        """
        super().__init__(lm, ktoken, lr, weight_decay, warmup_ratio, seed, export_dir)
        self.save_hyperparameters(ignore=["lm", "ktoken"])
        self.hparams.update(lm=asdict(self.lm_spec), ktoken=asdict(self.ktoken))
        self.loss_chunk_size, self.train_metrics = loss_chunk_size, train_metrics
        self.metrics = torch.nn.ModuleDict({f"{s}_align": alignment_metrics(top_p) for s in STAGES})

    def loss(self, batch, stage):
        metrics = self.metrics[f"{stage}_align"] if (stage != "train" or self.train_metrics) else None
        loss, merged = distill_forward(self.lm, self.encoder, batch, metrics, self.loss_chunk_size)
        if metrics is not None:
            self.log_dict({f"{stage}/{k}": m for k, m in metrics.items()}, on_step=False, on_epoch=True)
        return loss, merged


class KTokenLoRA(KTokenModule):
    """LoRA-adapted LM + K-token encoder, trained jointly on the task loss (K-Token Merging's recipe)."""

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
        super().__init__(lm, ktoken, lr, weight_decay, warmup_ratio, seed, export_dir)
        self.lora = LoRASettings(**lora) if isinstance(lora, dict) else (lora or LoRASettings())
        self.save_hyperparameters(ignore=["lm", "ktoken", "lora"])
        self.hparams.update(lm=asdict(self.lm_spec), ktoken=asdict(self.ktoken), lora=asdict(self.lora))

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
        return task_loss(self.lm, self.encoder, batch)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.encoder.parameters()) + [p for p in self.lm.parameters() if p.requires_grad]

    def keeps_lm_weight(self, key: str) -> bool:
        return "lora_" in key  # the adapters are trained; the base LM is not

    def export_extra(self, folder: Path, weights: dict[str, torch.Tensor]) -> None:
        lm_state = {k[len("lm.") :]: v for k, v in weights.items() if k.startswith("lm.")}
        save_adapter(self.lm, folder / ADAPTER_DIR, lm_state)
