"""Registry of compression methods by name, so runners and YAML configs name methods as strings.

Every entry is built as ``make_method(name, ratio, **options)`` where ``ratio`` is the target
token reduction (the one knob); ``base`` is the uncompressed LM (``None``) and ``umim`` the
fixed-rule merger (needs ``merged_lm=``; its TR is what the rules give). Entries are
``"module:Class"`` strings imported on first use, so listing methods costs nothing.
"""

from __future__ import annotations

import importlib

METHODS: dict[str, str] = {
    "umim": "umim_eval.baselines.umim_merge:UMIMMerge",
    "umim_budget": "umim_eval.baselines.umim_budget:UMIMBudget",
    "select_context": "umim_eval.baselines.select_context:SelectContext",
    "llmlingua1": "umim_eval.baselines.llmlingua1:LLMLingua1",
    "llmlingua2": "umim_eval.baselines.llmlingua2:LLMLingua2",
    "quickmerge": "umim_eval.baselines.quickmerge:QuickMerge",
    "streaming_llm": "umim_eval.baselines.streaming_llm:StreamingLLM",
    "h2o": "umim_eval.baselines.h2o:H2O",
}
"""name -> ``"module:Class"``; ``base`` (no compression) is handled by :func:`make_method`."""


def method_class(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {['base', *sorted(METHODS)]}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_method(name: str, ratio: float | None = None, **options):
    """Build method ``name`` at target TR ``ratio`` (``base`` -> ``None``, the plain LM)."""
    if name == "base":
        return None
    cls = method_class(name)
    if name == "umim":
        return cls(**options)
    return cls(ratio=ratio if ratio is not None else 0.0, **options)


def is_kv_policy(method) -> bool:
    from .baselines.base import KVPolicy

    return isinstance(method, KVPolicy)
