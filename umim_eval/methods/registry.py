"""The one registry of methods by name, so runners and YAML configs name methods as strings.

Every entry is built as ``make_method(name, ratio, merged_lm=run, **options)``, which calls the
class's :meth:`~umim_eval.methods.base.Method.from_run`; ``ratio`` is the target token reduction
(the one knob). ``base`` is the uncompressed LM; ``umim`` is the fixed-rule merger (its TR is what
the rules give, ``ratio`` is ignored); ``umim_budget`` uses the same merger and rules at a set TR;
``ktoken`` (K-Token Merging, encoder trained against the frozen LM) and ``ktoken_lora`` (K-Token
Merging's own recipe: encoder + LoRA adapters on the LM) each load a trained folder given as
``options["path"]``. Runners build a method once
and re-aim it per example with ``method.aim(ratio)``. Entries are ``"module:Class"`` strings
imported on first use, so listing methods costs nothing.

A new method is one file (a :class:`~umim_eval.methods.base.Method` subclass with its ``name``,
``label`` and ``kind``) plus one line here.
"""

from __future__ import annotations

import importlib

from umim.errors import UserError

METHODS: dict[str, str] = {
    "base": "umim_eval.methods.no_reduction:NoReduction",
    "umim": "umim_eval.methods.umim_merge:UMIMMerge",
    "umim_budget": "umim_eval.methods.umim_budget:UMIMBudget",
    "select_context": "umim_eval.methods.select_context:SelectContext",
    "llmlingua1": "umim_eval.methods.llmlingua1:LLMLingua1",
    "llmlingua2": "umim_eval.methods.llmlingua2:LLMLingua2",
    "quickmerge": "umim_eval.methods.quickmerge:QuickMerge",
    "ktoken": "umim_eval.methods.ktoken_merge:KTokenMerge",
    "ktoken_lora": "umim_eval.methods.ktoken_merge:KTokenLoRAMerge",
    "streaming_llm": "umim_eval.methods.streaming_llm:StreamingLLM",
    "h2o": "umim_eval.methods.h2o:H2O",
}
"""name -> ``"module:Class"``."""


def method_class(name: str):
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def label(name: str) -> str:
    """Row label of method ``name`` in result tables (unknown names are shown as they are)."""
    return method_class(name).label if name in METHODS else name


def check_methods(names, method_options: dict | None = None) -> None:
    """Refuse unknown method names, unknown options and missing trained folders before any model is loaded."""
    for name in names:
        method_class(name).check_options(dict((method_options or {}).get(name) or {}))


def make_method(name: str, ratio: float | None = None, merged_lm=None, **options):
    """Build method ``name`` at target TR ``ratio`` for the run ``merged_lm`` (a
    :class:`umim.inference.generation.MergedLM`: the target LM, and the merger + rules when it has them)."""
    cls = method_class(name)
    cls.check_options(options)
    return cls.from_run(merged_lm, ratio=0.0 if ratio is None else ratio, **options)
