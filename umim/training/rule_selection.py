"""Rule selection inside one fit: measure every rule's cost with the merger trained so far, then
keep the cheapest rules and train on them.

Merging some spans costs the frozen LM far more than others (``umim score-rules`` measures that in a
separate command, each merge nearly alone). :class:`RuleSelection` measures it inside the fit, at
optimizer step ``at_step``: ``score_blocks`` training blocks (a seeded random subset) run through
teacher and merged student once, every merge at once, without gradients, and each compressed
position's KL(teacher || student) is charged to the latest merge at or before it, if that merge is
at most ``window`` positions back (:func:`attribute_kl`). A rule's cost is its charged KL per saved
position, shrunk toward the mean by ``prior`` pseudo positions (rules seen on few merges keep a cost
near the mean; rules never seen get the mean).

It then keeps the cheapest rules whose longest-match segmentation of the training blocks reaches
``target_tr`` (:func:`umim.rules.cost.select_by_order`, TR re-measured with the subset itself), and
every later batch of the fit is segmented by them; the merger trained so far goes on training.
Validation losses from before the switch were measured with other rules, so the checkpoint and
early-stopping callbacks start their bests afresh there (the pre-switch best checkpoint file is
removed). A validation right at ``at_step`` already sees the selected rules.

Why not charge the training batches' own KL (no extra forward)? Tried on the embedded model: costs
charged over steps 1-60, while the merger was still far from trained, selected rules no better than
the most frequent ones at the same TR (held-out top-1 within a point of count-ranked).

Outputs: the selected rules (a rules folder, ``selection`` metadata with the source rules' digest)
at ``out`` (default ``<default_root_dir>/selected_rules``), which the end-of-fit export copies to
``rules/``; the measured costs of the source rules at ``<default_root_dir>/rule_costs.json`` (the
``umim select-rules --costs`` format), so other TRs can be selected without training again.

Several processes: each rank scores its share of the blocks (the same number of batches on every
rank, as a sharded LM needs), the sums are all-reduced, and every rank selects the same rules.
Checkpoints hold the selection, so a run resumed after the switch keeps it.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from umim.errors import UserError
from umim.rules.cost import (
    RuleCosts,
    RuleIndex,
    cost_order,
    is_costs_file,
    measured_tr,
    rule_list,
    rules_digest,
    select_by_order,
    subset_rules,
)
from umim.rules.store import MergeRules, is_rules_dir
from umim.safe_io import check_replaceable, check_writable_dir
from umim.training.datamodule import SegmentCollator
from umim.training.distillation import distill_forward
from umim.training.export import ExportAndReport

COSTS_NAME = "rule_costs.json"


def attribute_kl(ids: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray, position_kl: np.ndarray,
                 index: RuleIndex, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Charge each compressed position's KL to the latest merge at or before it, ``window`` back at most.

    Parameters
    ----------
    ids : [B, L] token ids of the batch.
    seg_start, seg_len : [B, S] its segmentation (length 0 = padding; > 1 = a merge).
    position_kl : [B, S] KL at each compressed position (0 where none was computed).
    index : the rule index (:func:`~umim.rules.cost.rule_list` order) the merges are looked up in.
    window : positions after a merge's own that are charged to it (while no later merge intervenes).

    Returns
    -------
    rule index [M] and charged KL [M] of the batch's M merges.
    """
    b, s = np.nonzero(seg_len > 1)
    if not len(b):
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    st, ln = seg_start[b, s], seg_len[b, s]
    rid = np.empty(len(b), dtype=np.int64)
    for n in np.unique(ln):  # one vectorized lookup per span length
        m = ln == n
        rid[m] = index.lookup(ids[b[m][:, None], st[m][:, None] + np.arange(n)], int(n))
    if (rid < 0).any():
        raise RuntimeError("a merged span is not one of the fit's rules (a bug: batches segmented by other rules)")
    S = seg_len.shape[1]
    latest = np.maximum.accumulate(np.where(seg_len > 1, np.arange(S)[None], -1), axis=1)  # [B, S]
    charged = np.zeros(len(b))
    for d in range(window + 1):
        p = np.minimum(s + d, S - 1)
        ok = (s + d < S) & (latest[b, p] == s) & (seg_len[b, p] > 0)
        charged += np.where(ok, position_kl[b, p], 0.0)
    return rid, charged


class RuleSelection(L.Callback):
    """Select the fit's rules by their cost under the merger trained so far (module docstring)."""

    def __init__(self, target_tr: float, at_step: int, score_blocks: int = 128, window: int = 1,
                 prior: float = 4.0, out: str | None = None, tolerance: float = 0.005):
        """
        Parameters
        ----------
        target_tr : token reduction the selected rules reach on the training blocks (0.25 = 25 %).
        at_step : optimizer step after which the rules are scored and selected.
        score_blocks : training blocks scored (a seeded random subset; all when fewer exist; on N processes
            rounded down to a multiple of N, so every rank scores as many).
        window : positions after a merge's own that are charged to it.
        prior : pseudo saved positions each rule's cost is shrunk toward the mean by.
        out : folder for the selected rules (default ``<trainer.default_root_dir>/selected_rules``).
        tolerance : how far the measured TR may miss ``target_tr`` (a fraction).

        The settings are checked in :meth:`setup`: a config parser that builds callbacks turns an error
        raised here into a traceback of its own.
        """
        self.target_tr, self.at_step, self.score_blocks = target_tr, at_step, score_blocks
        self.window, self.prior, self.out, self.tolerance = window, prior, out, tolerance
        self.out_dir: Path | None = None
        self.selected: np.ndarray | None = None  # global indices of the kept rules, once selected
        self.source_sha256: str | None = None
        self.measured_tr: float | None = None
        self.costs: RuleCosts | None = None  # what the selection was made from (this process)

    def _check_settings(self) -> None:
        target_tr, at_step, score_blocks = self.target_tr, self.at_step, self.score_blocks
        window, prior, tolerance = self.window, self.prior, self.tolerance
        if not 0 < target_tr < 1:
            raise UserError(f"RuleSelection target_tr {target_tr}: give a fraction in (0, 1), e.g. 0.25 for 25 %")
        if at_step < 1:
            raise UserError(f"RuleSelection at_step {at_step}: give the optimizer step to select after (>= 1)")
        if score_blocks < 1:
            raise UserError(f"RuleSelection score_blocks {score_blocks}: give a positive number of blocks")
        if not 0 <= window <= 64:
            raise UserError(f"RuleSelection window {window}: give 0..64 positions")
        if not (prior >= 0 and math.isfinite(prior)):
            raise UserError(f"RuleSelection prior {prior}: give 0 or more pseudo saved positions")
        if not 0 < tolerance < 1:
            raise UserError(f"RuleSelection tolerance {tolerance}: give a fraction such as 0.005")

    # -- set-up: refuse what cannot work before training -------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._check_settings()
        root = Path(trainer.default_root_dir)
        self.out_dir = Path(self.out) if self.out else root / "selected_rules"
        self.costs_path = root / COSTS_NAME
        if stage != "fit":
            return  # validate/test: a checkpoint's selection is applied when they start
        self.selected = self.source_sha256 = self.measured_tr = self.costs = None  # a resume loads its own after this
        dm = trainer.datamodule
        if dm is None or not getattr(dm, "uses_rules", False) or not hasattr(pl_module, "loss_chunk_size"):
            raise UserError("RuleSelection needs UMIM's model and data module (batches segmented by merge rules)")
        if dm.num_workers:
            raise UserError("RuleSelection changes the rules during the fit: set data.num_workers: 0")
        if 0 < trainer.max_steps <= self.at_step:
            raise UserError(f"RuleSelection at_step {self.at_step} must come before trainer.max_steps "
                            f"{trainer.max_steps}")
        exported = [Path(cb.out_dir or root) / "rules" for cb in trainer.callbacks if isinstance(cb, ExportAndReport)]
        if any(dm.rules_path.resolve() == p.resolve() for p in exported):
            raise UserError(f"RuleSelection: the export replaces {dm.rules_path} with the selected rules, so the "
                            f"fit would start from them next time; give data.rules another folder, e.g. "
                            f"{root / 'mined_rules'}")
        if self.out_dir.resolve() == dm.rules_path.resolve():
            raise UserError(f"RuleSelection out {self.out_dir} is the folder of the rules it selects from: "
                            "choose another")
        check_writable_dir(self.out_dir)
        check_replaceable(self.out_dir, is_rules_dir, "rules")
        if self.costs_path.exists() and not is_costs_file(self.costs_path):
            raise UserError(f"{self.costs_path} exists and is not a rule-costs file; refusing to replace it: "
                            "move it away")
        full = measured_tr(dm.rules, dm.blocks["train"])
        if full < self.target_tr - self.tolerance:
            raise UserError(f"RuleSelection target_tr {self.target_tr:.1%}: all {len(dm.rules)} rules reach only "
                            f"{full:.1%} on the training blocks; lower it")

    def _apply_loaded(self, trainer, save: bool) -> None:
        """A checkpoint's selection (loaded after ``setup``) onto the data module, before any batch."""
        dm = trainer.datamodule
        if self.selected is None or dm is None or dm.rules_dir == str(self.out_dir):
            return
        if self.source_sha256 != rules_digest(dm.rules):
            raise UserError("the checkpoint's rule selection was made from another rule set: give the "
                            "data.rules the run started from")
        self._use(trainer, dm, self._subset(dm.rules), save)

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._apply_loaded(trainer, save=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._apply_loaded(trainer, save=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.training and not trainer.sanity_checking:  # `umim validate` with a checkpoint
            self._apply_loaded(trainer, save=False)

    def on_test_start(self, trainer, pl_module) -> None:
        self._apply_loaded(trainer, save=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.selected is None and trainer.global_step >= self.at_step:
            self._select(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.selected is None:
            rank_zero_warn(f"RuleSelection: training ended at step {trainer.global_step}, before at_step "
                           f"{self.at_step}; the fit kept all its rules")

    # -- scoring and the switch --------------------------------------------------------------------
    def score(self, trainer, pl_module) -> RuleCosts:
        """Every rule's charged KL on ``score_blocks`` training blocks under the current merger, summed
        over ranks (each rank scores an equal share)."""
        dm, st = trainer.datamodule, trainer.strategy
        rules, blocks = dm.rules, dm.blocks["train"]
        index = RuleIndex(rules)
        rng = np.random.default_rng(pl_module.seed)
        pick = np.sort(rng.choice(len(blocks), min(self.score_blocks, len(blocks)), replace=False))
        world, rank = trainer.world_size, trainer.global_rank
        share = len(pick) // world  # equal shares (a sharded LM runs its forwards on every rank together)
        counted = share > 0 or rank == 0  # fewer blocks than ranks: all score one, rank 0's counts
        mine = blocks[pick[rank::world][:share]] if share else blocks[pick[:1]]
        kl_sum, fires = np.zeros(index.size), np.zeros(index.size, dtype=np.int64)
        collate, bs = SegmentCollator(rules), dm.eval_batch_size  # not dm.collator(): no loader's, nothing to follow
        was_training = pl_module.span_encoder.training
        pl_module.span_encoder.eval()
        try:
            for i in range(0, len(mine), bs):
                batch = collate(list(mine[i : i + bs]))
                seg = {k: batch[k].numpy() for k in ("input_ids", "seg_start", "seg_len")}
                batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with torch.no_grad(), trainer.precision_plugin.forward_context():
                    _, merged = distill_forward(pl_module.lm, pl_module.span_encoder, batch,
                                                chunk_size=pl_module.loss_chunk_size, position_kl=True,
                                                head_calls=pl_module.head_calls())
                rid, charged = attribute_kl(seg["input_ids"], seg["seg_start"], seg["seg_len"],
                                            merged.position_kl.float().cpu().numpy(), index, self.window)
                if counted:
                    np.add.at(kl_sum, rid, charged)
                    np.add.at(fires, rid, 1)
        finally:
            pl_module.span_encoder.train(was_training)
        if world > 1:  # float64 sums (gloo, NCCL); a single device may not hold float64 (MPS)
            dev = pl_module.device
            kl_sum = st.reduce(torch.from_numpy(kl_sum).to(dev), reduce_op="sum").double().cpu().numpy()
            fires = st.reduce(torch.from_numpy(fires).to(dev), reduce_op="sum").cpu().numpy().astype(np.int64)
        counts = np.concatenate([rules.counts[n] for n in sorted(rules.ngrams)]).astype(np.int64)
        n_scored = share * world if share else 1
        lm = pl_module.lm_spec
        meta = {"rules_sha256": rules_digest(rules), "tokenizer": rules.tokenizer,
                "lm": {"name_or_path": lm.name_or_path, "gguf_file": lm.gguf_file},
                "settings": {"method": "inside umim fit: every merge at once", "window": self.window,
                             "at_step": self.at_step, "kl": "KL(teacher || student)"},
                "text": {"data": dm.corpus, "split": "train", "block_size": dm.block_size, "blocks": n_scored,
                         "seed": pl_module.seed}}
        return RuleCosts(rule_list(rules), counts, fires, kl_sum, n_scored * blocks.shape[1], meta)

    def _select(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        rules = dm.rules
        self.costs = self.score(trainer, pl_module)
        # every rank computes the same selection from the same reduced sums and blocks
        order = cost_order(self.costs, prior=self.prior, unseen_at_mean=True)
        keep, tr = select_by_order(rules, order, dm.blocks["train"], self.target_tr, self.tolerance)
        self.selected, self.source_sha256, self.measured_tr = np.sort(keep), rules_digest(rules), tr
        if trainer.is_global_zero:
            self.costs.save(self.costs_path)
        self._use(trainer, dm, self._subset(rules), save=True)
        self._restart_monitors(trainer)
        if trainer.is_global_zero:
            print(f"step {trainer.global_step}: kept {len(keep)} of {len(rules)} rules by their cost on "
                  f"{self.costs.meta['text']['blocks']} training blocks; TR on the training blocks {tr:.2%} "
                  f"(all rules {measured_tr(rules, dm.blocks['train']):.2%}) -> {self.out_dir}", flush=True)

    def _subset(self, rules: MergeRules) -> MergeRules:
        return subset_rules(rules, self.selected, {
            "method": "cost inside umim fit", "source_rules_sha256": self.source_sha256,
            "target_tr": self.target_tr, "measured_tr": self.measured_tr, "at_step": self.at_step,
            "score_blocks": self.score_blocks, "window": self.window, "prior": self.prior, "unseen_at_mean": True,
            "costs": str(self.costs_path.resolve())})

    def _use(self, trainer, dm, subset: MergeRules, save: bool) -> None:
        if save:
            if trainer.is_global_zero:
                subset.save(self.out_dir)
            trainer.strategy.barrier()
        dm.use_rules(subset, self.out_dir)

    @staticmethod
    def _restart_monitors(trainer) -> None:
        """Bests measured with the rules before the switch do not compare with later validations."""
        for cb in trainer.checkpoint_callbacks:
            if cb.monitor is None:
                continue
            # the files Lightning itself would drop (never the one resumed from, nothing outside dirpath)
            stale = [p for p in cb.best_k_models
                     if p != cb.last_model_path and cb._should_remove_checkpoint(trainer, p, "")]
            cb.best_k_models, cb.kth_best_model_path, cb.best_model_path, cb.best_model_score = {}, "", "", None
            cb.kth_value = torch.tensor(math.inf if cb.mode == "min" else -math.inf)
            for p in stale:
                trainer.strategy.remove_checkpoint(p)
        for cb in trainer.early_stopping_callbacks:
            cb.wait_count = 0
            cb.best_score = torch.tensor(math.inf if cb.mode == "min" else -math.inf)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"selected": self.selected.tolist() if self.selected is not None else None,
                "source_sha256": self.source_sha256, "measured_tr": self.measured_tr}

    def load_state_dict(self, state: dict) -> None:
        self.selected = np.asarray(state["selected"], dtype=np.int64) if state.get("selected") is not None else None
        self.source_sha256, self.measured_tr = state.get("source_sha256"), state.get("measured_tr")
