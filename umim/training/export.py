"""End of training: export the best merger with its rules and report trained vs untrained alignment.

Writes into ``out_dir`` (default the trainer's ``default_root_dir``): ``merger/``
(``save_pretrained``), ``rules/`` (the rules it was trained with), ``metrics.json`` and
``metrics.md``. The report compares, on each evaluation set, the trained merger with an untrained
one (same initialisation seed), under the training rules and under each extra rule variant (e.g.
without the inter-set filter), so both the gain from training and the effect of the rule filters
on TR are visible.

It runs when training ends (``on_train_end``: the module is still on the accelerator and every rank
is still there). Every rank evaluates its share of the blocks (a sharded LM needs all of them) and
the metrics are reduced across ranks; rank 0 then writes everything into a staging folder and swaps
it in, so a failure leaves the previous export whole. Output folders that are not ours are refused
when fitting starts, not after training. An interrupted fit exports nothing (the earlier export
stays). The frozen LM's weights are checksummed at the start and the end: the report says they
did not change.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from umim.errors import UserError
from umim.fingerprint import tokenizer_fingerprint
from umim.lm import cache_dir
from umim.merging.merger import MergeModule, is_merger_dir
from umim.rules.corpus import tokenized_corpus
from umim.rules.mining import mine_rules
from umim.rules.store import MergeRules, is_rules_dir
from umim.safe_io import check_replaceable, check_writable_dir, replace_dir, staging_dir
from umim.training.datamodule import pack_blocks
from umim.training.report import evaluate_alignment, write_report
from umim.training.strategy import trainable_state_dict


@dataclass
class EvalSet:
    """Held-out text to report on."""

    name: str
    corpus: str
    split: str = "test"


@dataclass
class RuleVariant:
    """Extra rule set to report beside the training rules: mined from the training corpus with
    other filter stages, or a saved rules folder (e.g. model-probability rules from
    ``umim mine --model-prob 0.5``)."""

    name: str
    filters: list[str] = field(default_factory=list)
    path: str | None = None
    """A saved rules folder; when given, ``filters`` is ignored."""


def frozen_checksums(lm: torch.nn.Module) -> list[int]:
    """Bitwise hash of each of this rank's (local shards of) frozen LM parameters."""
    from torch.distributed.tensor import DTensor

    return [int(torch.hash_tensor((p.to_local() if isinstance(p, DTensor) else p).detach()).view(torch.int64))
            for p in lm.parameters() if not p.requires_grad]


class ExportAndReport(L.Callback):
    """Save the best merger + rules and write the alignment report when training ends."""

    def __init__(
        self,
        out_dir: str | None = None,
        eval_sets: list[EvalSet] | None = None,
        rule_variants: list[RuleVariant] | None = None,
        max_eval_blocks: int = 32,
        batch_size: int = 4,
    ):
        """
        Parameters
        ----------
        out_dir : where merger/, rules/, metrics.json and metrics.md go (default: trainer.default_root_dir).
        eval_sets : held-out texts (default: the training corpus's test split).
        rule_variants : extra rule sets to report (e.g. filters [intra], i.e. without inter).
        max_eval_blocks : blocks per evaluation set (first ones, deterministic).
        batch_size : blocks per forward on each rank.
        """
        self.out_dir = Path(out_dir) if out_dir else None
        self.eval_sets = eval_sets
        self.rule_variants = rule_variants or []
        self.max_eval_blocks, self.batch_size = max_eval_blocks, batch_size
        self.fit_started = 0.0
        self.teacher_checksums: list[int] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.out_dir is None:
            self.out_dir = Path(trainer.default_root_dir)
        if getattr(pl_module, "encoder_name", None) != "merger":
            raise UserError(f"ExportAndReport exports UMIM's merger and rules, {type(pl_module).__name__} trains "
                            "another encoder: drop the callback (K-token modules export to their export_dir)")
        if stage == "fit":  # refuse before training, not after it
            check_writable_dir(self.out_dir)
            self._check_outputs()
            for v in self.rule_variants:
                if v.path is not None and not is_rules_dir(Path(v.path)):
                    raise UserError(f"rule_variants {v.name!r}: {v.path} is not a rules folder (umim mine --out)")

    def _check_outputs(self) -> None:
        check_replaceable(self.out_dir / "merger", is_merger_dir, "merger")
        check_replaceable(self.out_dir / "rules", is_rules_dir, "rules")

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_started = time.perf_counter()
        self.teacher_checksums = frozen_checksums(pl_module.lm)

    def on_train_end(self, trainer, pl_module) -> None:
        train_seconds = time.perf_counter() - self.fit_started
        changed = frozen_checksums(pl_module.lm) != self.teacher_checksums  # this rank's shards
        if trainer.strategy.reduce_boolean_decision(changed, all=False):  # every rank stops together
            raise RuntimeError("the frozen LM's weights changed during training (a bug): nothing exported")
        dm = trainer.datamodule
        cb = trainer.checkpoint_callback
        best = getattr(cb, "best_model_path", "") if cb is not None else ""
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            weights = {k[len("merger.") :]: v for k, v in state.items() if k.startswith("merger.")}
        else:
            weights = trainable_state_dict(pl_module.merger, lambda k: True)  # gathers a sharded merger
        device = pl_module.device
        merger = MergeModule(pl_module.merger.config)
        merger.load_state_dict(weights)
        merger = merger.to(device).eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(pl_module.seed)
            untrained = MergeModule(merger.config).to(device).eval()
        variants = {"trained": (dm.rules, merger), "untrained": (dm.rules, untrained)}
        tok = dm.get_tokenizer()
        fp = tokenizer_fingerprint(tok)
        for v in self.rule_variants:
            if v.path is not None:
                rules_v = MergeRules.load(v.path, tokenizer=tok)
            else:
                m = dm.mining
                ids, offsets = tokenized_corpus(m.corpus or dm.corpus, "train", tok, fp, cache_dir() / "tokens")
                rules_v = mine_rules(ids, offsets, fp, m.min_count, m.min_n, m.max_n, v.filters, progress=False)
            variants[f"trained, rules {v.name}"] = (rules_v, merger)
            variants[f"untrained, rules {v.name}"] = (rules_v, untrained)

        eval_sets = self.eval_sets or [EvalSet("held-out", dm.corpus, "test")]
        results = {}
        for es in eval_sets:
            ids, offsets = tokenized_corpus(es.corpus, es.split, tok, fp, cache_dir() / "tokens")
            blocks = pack_blocks(ids, offsets, dm.block_size, tok.eos_token_id)[: self.max_eval_blocks]
            with trainer.precision_plugin.forward_context():
                results[f"{es.name} ({es.corpus}:{es.split})"] = evaluate_alignment(
                    pl_module.lm, blocks, variants, self.batch_size, pl_module.loss_chunk_size,
                    desc=f"report {es.name}", rank=trainer.global_rank, world_size=trainer.world_size,
                    head_calls=pl_module.head_calls(),
                )
        val_loss = trainer.callback_metrics.get("val/loss")
        best_score = getattr(cb, "best_model_score", None) if cb is not None else None
        extra = {
            "lm": pl_module.lm_spec.name_or_path,
            "rules": {"num_rules": dm.rules.num_rules(), "min_count": dm.rules.min_count, "filters": dm.rules.filters,
                      **({"selection": dm.rules.selection} if dm.rules.selection else {})},
            "train": {"seconds": round(train_seconds, 1), "steps": int(trainer.global_step),
                      "epochs": int(trainer.current_epoch), "best_checkpoint": best,
                      "best_val_loss": None if best_score is None else float(best_score),
                      "val_loss": None if val_loss is None else float(val_loss),
                      "train_blocks": int(len(dm.blocks["train"])), "block_size": dm.block_size,
                      "world_size": int(trainer.world_size), "strategy": type(trainer.strategy).__name__,
                      "precision": str(trainer.precision)},
            "teacher_unchanged": True,
        }
        error = None
        if trainer.is_global_zero:
            try:
                self._publish(merger, dm.rules_path, results, extra)
            except Exception as e:  # the other ranks must not wait for rank 0 forever
                error = f"{type(e).__name__}: {e}"
                raise
            finally:
                trainer.strategy.broadcast(error)
        elif (error := trainer.strategy.broadcast(error)) is not None:
            raise RuntimeError(f"rank 0 failed to write the export: {error}")

    def _publish(self, merger: MergeModule, rules_path: Path, results: dict, extra: dict) -> None:
        """Write merger/, rules/, metrics.json and metrics.md into a staging folder, then swap each in."""
        out = self.out_dir
        stage = staging_dir(out / "export")
        try:
            merger.save_pretrained(stage / "merger")
            same_rules = (out / "rules").resolve() == Path(rules_path).resolve()
            if not same_rules:
                shutil.copytree(rules_path, stage / "rules")
            table = write_report(results, stage, extra)
            self._check_outputs()  # all destinations, before the first swap
            replace_dir(stage / "merger", out / "merger", is_merger_dir, "merger")
            if not same_rules:
                replace_dir(stage / "rules", out / "rules", is_rules_dir, "rules")
            for name in ("metrics.json", "metrics.md"):
                os.replace(stage / name, out / name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        print(f"\nexported merger and rules to {out}\n{table}\n")
