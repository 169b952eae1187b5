"""Old import paths (the flat layout before the data-flow folders) keep working.

``import umim.generation`` or ``from umim_eval.baselines import H2O`` imports the module at its
new path and registers it under the old name too, so both names are the same module object (a
``monkeypatch`` on either is seen by both). Installed by ``umim/__init__.py``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "umim.alignment_metrics": "umim.training.alignment_metrics",
    "umim.batch": "umim.merging.batch",
    "umim.checkpoint": "umim.training.checkpoint",
    "umim.corpus": "umim.rules.corpus",
    "umim.datamodule": "umim.training.datamodule",
    "umim.distill_loss": "umim.training.distill_loss",
    "umim.distillation": "umim.training.distillation",
    "umim.export": "umim.training.export",
    "umim.frozen_lm_module": "umim.training.frozen_lm_module",
    "umim.generation": "umim.inference.generation",
    "umim.ktoken_training": "umim.ktoken.training",
    "umim.kv_cache": "umim.inference.kv_cache",
    "umim.matcher": "umim.merging.matcher",
    "umim.merger": "umim.merging.merger",
    "umim.mining": "umim.rules.mining",
    "umim.prob_rules": "umim.rules.prob_rules",
    "umim.report": "umim.training.report",
    "umim.strategy": "umim.training.strategy",
    "umim_eval.baselines": "umim_eval.methods",
    "umim_eval.baselines.base": "umim_eval.methods.base",
    "umim_eval.baselines.h2o": "umim_eval.methods.h2o",
    "umim_eval.baselines.ktoken_merge": "umim_eval.methods.ktoken_merge",
    "umim_eval.baselines.llmlingua1": "umim_eval.methods.llmlingua1",
    "umim_eval.baselines.llmlingua2": "umim_eval.methods.llmlingua2",
    "umim_eval.baselines.match_tr": "umim_eval.methods.match_tr",
    "umim_eval.baselines.policy_generate": "umim_eval.scoring.policy_generate",
    "umim_eval.baselines.policy_nll": "umim_eval.scoring.policy_nll",
    "umim_eval.baselines.prompt_nll": "umim_eval.scoring.prompt_nll",
    "umim_eval.baselines.quickmerge": "umim_eval.methods.quickmerge",
    "umim_eval.baselines.select_context": "umim_eval.methods.select_context",
    "umim_eval.baselines.streaming_llm": "umim_eval.methods.streaming_llm",
    "umim_eval.baselines.umim_budget": "umim_eval.methods.umim_budget",
    "umim_eval.baselines.umim_merge": "umim_eval.methods.umim_merge",
    "umim_eval.compare": "umim_eval.tasks.compare",
    "umim_eval.compressed_inputs": "umim_eval.scoring.prompt_inputs",
    "umim_eval.gen_quality": "umim_eval.tasks.gen_quality",
    "umim_eval.generation_metrics": "umim_eval.scoring.generation_metrics",
    "umim_eval.language_modeling": "umim_eval.tasks.ppl",
    "umim_eval.lm_eval_hook": "umim_eval.harness.lm_eval_hook",
    "umim_eval.lm_eval_model": "umim_eval.harness.lm_eval_model",
    "umim_eval.local_tasks": "umim_eval.harness.local_tasks",
    "umim_eval.matched_generation": "umim_eval.scoring.matched_generation",
    "umim_eval.math_reasoning": "umim_eval.tasks.math_reasoning",
    "umim_eval.perplexity": "umim_eval.scoring.perplexity",
    "umim_eval.qa": "umim_eval.tasks.qa",
    "umim_eval.summarization": "umim_eval.tasks.summarize",
    "umim_eval.token_nll": "umim_eval.scoring.token_nll",
}
"""old module name -> new module name."""


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


def install() -> None:
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
