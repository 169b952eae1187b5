"""LightningModule: distill the frozen LM's token-by-token computation into a span encoder.

Teacher = the LM on the original ids (no grad); student = the same frozen LM on the merged
embeddings (gradient flows through it into the encoder). Loss = mean KL(teacher || student) over
aligned positions (paper Alg. 1). Only the encoder is in the optimizer and in checkpoints.
The teacher's outputs can be kept between steps (:class:`TeacherCache`, opt-in ``teacher_cache_mb``).

:class:`SpanDistillation` trains any :class:`~umim.merging.span_encoder.SpanEncoder` on batches cut
by any :class:`~umim.merging.span_encoder.Segmenter`; :class:`UMIMDistillation` chooses UMIM's merge
module (batches segmented by the merge rules in the data module), and
:class:`umim.ktoken.training.KTokenDistillation` the K-token encoder with its K-block segmenter.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from umim.errors import UserError
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
    span_positions: bool = False
    """Learned embedding of each token's distance from the span's end, added before pooling (ours)."""


def teacher_hidden(lm, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, L, d] final hidden states of the frozen LM on the original ids (no grad)."""
    ids, lengths = batch["input_ids"], batch["lengths"]
    mask = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).long()
    with torch.no_grad():
        # use_cache=False: a KV cache would be appended to again when checkpointed layers recompute
        return lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


class TeacherCache:
    """The frozen LM's final hidden states per row, kept on CPU between steps within a byte budget.

    A row is keyed by its content (a hash of its valid token ids and its length), never by its place
    in a batch, so hits are right under shuffling, resume, any rank and any stage. Values are the
    teacher's own output (its dtype, valid positions only), so a hit gives the bits of the forward that
    stored it (a forward in another batch shape may differ by rounding).
    The cache is a plain attribute, never a module state: it is not in state dicts or checkpoints.
    Each process (DDP/FSDP rank) holds its own cache of the rows it saw.
    """

    def __init__(self, budget_mb: float):
        """``budget_mb``: MiB of CPU memory the stored hidden states may take in all."""
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self.rows: dict[tuple[int, bytes], torch.Tensor] = {}  # key -> [n, d] on CPU
        self.forwarded_rows = 0  # rows the teacher ran on (a measure of what the cache saved)
        self._lm_ref, self._lm_state, self._collective = None, None, False

    def clear(self) -> None:
        self.rows.clear()
        self.used = 0

    def __getstate__(self) -> dict:
        return {"budget": self.budget}  # never serialized: a pickled or copied module starts with an empty cache

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["budget"] / 2**20)

    @staticmethod
    def keys(ids: torch.Tensor, lengths: torch.Tensor) -> list[tuple[int, bytes]]:
        """One key per row of ``ids`` [B, L] (``lengths`` [B]): (length, 128-bit hash of its valid ids)."""
        rows, ns = ids.detach().to("cpu", torch.int64).numpy(), lengths.detach().cpu().tolist()
        return [(int(n), hashlib.blake2b(r[: int(n)].tobytes(), digest_size=16).digest()) for r, n in zip(rows, ns)]

    def _follow(self, lm) -> None:
        """Drop everything when the LM is another object, moved, cast, or had a weight changed in place
        (in-place writes bump a tensor's version counter; the frozen LM otherwise never changes)."""
        params = list(lm.parameters())
        state = (str(params[0].device), params[0].dtype, sum(p._version for p in params)) if params else None
        if self._lm_ref is None or self._lm_ref() is not lm or state != self._lm_state:
            self.clear()
            self._lm_ref, self._lm_state = weakref.ref(lm), state
            # a sharded LM (FSDP2, or any other sharding) all-gathers its weights in every forward, so all
            # ranks must run it together; agreeing costs one scalar all-reduce per step, so do it on any
            # multi-process run rather than guess how the LM is sharded
            dist = torch.distributed
            self._collective = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _match_other_ranks(self, lm, batch: dict[str, torch.Tensor], missing: bool) -> None:
        """A sharded LM all-gathers its weights in every forward, so all ranks forward or none does: a rank
        whose rows are all cached runs one row (result unused) when another rank must forward."""
        flag = torch.tensor([int(missing)], device=batch["input_ids"].device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not missing:
            teacher_hidden(lm, {"input_ids": batch["input_ids"][:1], "lengths": batch["lengths"][:1]})

    def hidden(self, lm, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, L, d] teacher hidden states of ``batch`` (``input_ids`` [B, L], ``lengths`` [B]).

        Cached rows are copied in; the missing ones are computed in one forward of only those rows and
        stored while the budget allows. Positions past a cached row's length are 0 (no loss reads them).
        """
        self._follow(lm)
        ids, lengths = batch["input_ids"], batch["lengths"]
        keys = self.keys(ids, lengths)
        miss = [i for i, k in enumerate(keys) if k not in self.rows]
        if self._collective:
            self._match_other_ranks(lm, batch, bool(miss))
        if len(miss) == len(keys):  # nothing cached: exactly the forward of the cache-less path
            out = computed = teacher_hidden(lm, batch)
        else:
            hits = [i for i, k in enumerate(keys) if k in self.rows]
            ref = self.rows[keys[hits[0]]]
            out = torch.zeros((*ids.shape, ref.shape[-1]), dtype=ref.dtype, device=ids.device)
            for i in hits:
                out[i, : keys[i][0]] = self.rows[keys[i]].to(ids.device)
            computed = None
            if miss:
                idx = torch.tensor(miss, device=ids.device)
                computed = teacher_hidden(lm, {"input_ids": ids[idx], "lengths": lengths[idx]})  # [M, L, d]
                out[idx] = computed
        self.forwarded_rows += len(miss)
        if miss and self.used < self.budget:
            host = computed.detach().to("cpu")  # one device-to-host copy per step, not one per row
            for j, i in enumerate(miss):
                self._store(keys[i], host[j, : keys[i][0]])
        return out

    def _store(self, key: tuple[int, bytes], row: torch.Tensor) -> None:
        """Keep ``row`` [n, d] under ``key`` if it fits the budget."""
        size = row.numel() * row.element_size()
        # when full, stop adding rather than evict: blocks come back only once per epoch, in shuffled
        # order, so any eviction order (LRU, FIFO) would drop each row before its next use and never hit
        if key in self.rows or self.used + size > self.budget:
            return
        self.rows[key] = row.clone()  # a copy: a view would keep the whole batch alive
        self.used += size


def distill_forward(
    lm, encoder: SpanEncoder | Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch: dict,
    metrics=None, chunk_size: int = 512, teacher_h: torch.Tensor | None = None, position_kl: bool = False,
    head_calls: Callable[[int], int] | None = None,
) -> tuple[torch.Tensor, MergedBatch]:
    """Teacher and student forwards of one segmented batch; returns (mean KL, merged batch).

    ``batch`` holds ``input_ids`` [B, L], ``lengths`` [B], ``seg_start``/``seg_len`` [B, S] and
    ``max_span`` (:func:`~umim.merging.batch.add_segments`). Only final hidden states are computed
    by the LM (``base_model``); logits exist only per chunk of aligned positions. With
    ``position_kl`` the merged batch also carries each loss position's KL (``merged.position_kl``).
    ``head_calls`` (a sharded LM, :meth:`~umim.training.frozen_lm_module.FrozenLMModule.head_calls`)
    maps this rank's number of output-head calls to the number every rank makes.
    """
    if teacher_h is None:
        teacher_h = teacher_hidden(lm, batch)
    merged = build_merged_batch(batch["input_ids"], batch["seg_start"], batch["seg_len"], lm.get_input_embeddings(),
                                encoder, batch["lengths"], batch.get("max_span"))
    student_h = lm.base_model(
        inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask, use_cache=False
    ).last_hidden_state
    t_h, s_h = aligned_hidden(teacher_h, student_h, merged)
    kl = torch.zeros(t_h.shape[0], device=t_h.device) if position_kl else None
    calls = head_calls(-(-t_h.shape[0] // chunk_size)) if head_calls is not None else 0
    loss = distillation_loss(t_h, s_h, lm.get_output_embeddings(), chunk_size, metrics, kl, calls)
    if kl is not None:
        merged.position_kl = torch.zeros(merged.loss_mask.shape, device=kl.device).masked_scatter_(merged.loss_mask, kl)
    return loss, merged


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
        teacher_cache_mb: float = 0.0,
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
        teacher_cache_mb : MiB of CPU memory (per process) for the teacher's hidden states of the rows
            seen, so a row seen again (validation blocks, later epochs) skips the teacher forward; the
            loss is unchanged. 0: off. A block of L tokens takes L x hidden size x the LM's dtype bytes.
        """
        if not math.isfinite(teacher_cache_mb) or teacher_cache_mb < 0:
            raise UserError(f"teacher_cache_mb must be >= 0 (MiB of CPU memory; 0 turns the cache off), "
                            f"got {teacher_cache_mb}")
        super().__init__(lm, lr, weight_decay, warmup_ratio, seed)
        self.loss_chunk_size, self.train_metrics = loss_chunk_size, train_metrics
        self.metrics = torch.nn.ModuleDict({f"{s}_align": alignment_metrics(top_p) for s in STAGES})
        self.teacher_cache = TeacherCache(teacher_cache_mb) if teacher_cache_mb > 0 else None

    def loss(self, batch: dict, stage: str) -> tuple[torch.Tensor, MergedBatch]:
        metrics = self.metrics[f"{stage}_align"] if (stage != "train" or self.train_metrics) else None
        teacher_h = self.teacher_cache.hidden(self.lm, batch) if self.teacher_cache is not None else None
        loss, merged = distill_forward(self.lm, self.span_encoder, batch, metrics, self.loss_chunk_size, teacher_h,
                                       head_calls=self.head_calls())
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
