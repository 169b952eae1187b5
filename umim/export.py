"""End of training: export the best merger with its rules and report trained vs untrained alignment.

Writes into ``out_dir``: ``merger/`` (``save_pretrained``), ``rules/`` (the rules it was trained
with), ``metrics.json`` and ``metrics.md``. The report compares, on each evaluation set, the
trained merger with an untrained one (same initialisation seed), under the training rules and under
each extra rule variant (e.g. without the inter-set filter), so both the gain from training and the
effect of the rule filters on TR are visible.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from .corpus import tokenized_corpus
from .datamodule import pack_blocks
from .fingerprint import tokenizer_fingerprint
from .lm import cache_dir, load_lm
from .merger import MergeModule
from .mining import mine_rules
from .report import evaluate_alignment, write_report
from .rules import MergeRules


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


class ExportAndReport(L.Callback):
    """Save the best merger + rules and write the alignment report when fitting ends."""

    def __init__(
        self,
        out_dir: str = "runs/default",
        eval_sets: list[EvalSet] | None = None,
        rule_variants: list[RuleVariant] | None = None,
        max_eval_blocks: int = 32,
        batch_size: int = 4,
    ):
        """
        Parameters
        ----------
        out_dir : where merger/, rules/, metrics.json and metrics.md are written.
        eval_sets : held-out texts (default: the training corpus's test split).
        rule_variants : extra rule sets to report (e.g. filters [intra], i.e. without inter).
        max_eval_blocks : blocks per evaluation set (first ones, deterministic).
        """
        self.out_dir = Path(out_dir)
        self.eval_sets = eval_sets
        self.rule_variants = rule_variants or []
        self.max_eval_blocks, self.batch_size = max_eval_blocks, batch_size
        self.fit_started = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_started = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        train_seconds = time.perf_counter() - self.fit_started
        dm = trainer.datamodule
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        sharded = isinstance(trainer.strategy, FSDPStrategy)
        merger = MergeModule(pl_module.merger.config)
        if best:
            state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
            merger.load_state_dict({k[len("merger.") :]: v for k, v in state.items() if k.startswith("merger.")})
        elif sharded:
            print("ExportAndReport: no best checkpoint under FSDP, nothing to export (add a ModelCheckpoint)")
            return
        else:
            merger.load_state_dict(pl_module.merger.state_dict())
        merger.save_pretrained(self.out_dir / "merger")
        if (self.out_dir / "rules").resolve() != dm.rules_path.resolve():
            shutil.rmtree(self.out_dir / "rules", ignore_errors=True)
            shutil.copytree(dm.rules_path, self.out_dir / "rules")

        # the training LM is sharded under FSDP: evaluate on a full copy on this rank's device
        lm = load_lm(pl_module.lm_spec).to(pl_module.device) if sharded else pl_module.lm
        merger = merger.to(lm.device).eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(pl_module.seed)
            untrained = MergeModule(merger.config).to(lm.device).eval()
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
            results[f"{es.name} ({es.corpus}:{es.split})"] = evaluate_alignment(
                lm, blocks, variants, self.batch_size, pl_module.loss_chunk_size, desc=f"report {es.name}"
            )
        table = write_report(
            results,
            self.out_dir,
            {
                "lm": pl_module.lm_spec.name_or_path,
                "rules": {"num_rules": dm.rules.num_rules(), "min_count": dm.rules.min_count, "filters": dm.rules.filters},
                "train": {"seconds": round(train_seconds, 1), "steps": int(trainer.global_step),
                          "epochs": int(trainer.current_epoch), "best_checkpoint": best,
                          "train_blocks": int(len(dm.blocks["train"])), "block_size": dm.block_size},
            },
        )
        print(f"\nexported merger and rules to {self.out_dir}\n{table}\n")
