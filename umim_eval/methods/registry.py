"""Registry of compression methods by name, so runners and YAML configs name methods as strings.

Every entry is built as ``make_method(name, ratio, merged_lm=m, **options)`` where ``ratio`` is
the target token reduction (the one knob). ``base`` is the uncompressed LM (``None``); ``umim``
is the fixed-rule merger (its TR is what the rules give, ``ratio`` is ignored); ``umim_budget``
uses the same merger and rules at a set TR; ``ktoken`` loads a trained encoder folder given as
``options["path"]``. Runners build a method once and re-aim it per example by setting
``method.ratio``. Entries are ``"module:Class"`` strings imported on first use, so listing methods
costs nothing.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from umim.errors import UserError

METHODS: dict[str, str] = {
    "umim": "umim_eval.methods.umim_merge:UMIMMerge",
    "umim_budget": "umim_eval.methods.umim_budget:UMIMBudget",
    "select_context": "umim_eval.methods.select_context:SelectContext",
    "llmlingua1": "umim_eval.methods.llmlingua1:LLMLingua1",
    "llmlingua2": "umim_eval.methods.llmlingua2:LLMLingua2",
    "quickmerge": "umim_eval.methods.quickmerge:QuickMerge",
    "ktoken": "umim_eval.methods.ktoken_merge:KTokenMerge",
    "streaming_llm": "umim_eval.methods.streaming_llm:StreamingLLM",
    "h2o": "umim_eval.methods.h2o:H2O",
}
"""name -> ``"module:Class"``; ``base`` (no compression) is handled by :func:`make_method`."""


def method_class(name: str):
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from {['base', *sorted(METHODS)]}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


LABELS = {"base": "Base LM", "umim": "Merge Module (UMIM)", "umim_budget": "UMIM, adaptive budget",
          "select_context": "Select Context", "llmlingua1": "LLMLingua1", "llmlingua2": "LLMLingua2",
          "quickmerge": "QuickMerge++", "ktoken": "K-Token Merging", "streaming_llm": "StreamingLLM", "h2o": "H2O"}
"""Method name -> its row label in the result tables (unknown names are shown as they are)."""

USES_MERGED_LM = ("umim", "umim_budget")
"""Methods built on the run's merger and rules (``merged_lm=``)."""


def check_methods(names, method_options: dict | None = None) -> None:
    """Refuse unknown method names, unknown options and missing trained folders before any model is loaded."""
    import inspect

    for name in names:
        if name == "base":
            continue
        cls = method_class(name)
        options = dict((method_options or {}).get(name) or {})
        path = options.pop("path", None)
        if name == "ktoken":
            if path is None:
                raise UserError("method 'ktoken' needs method_options {ktoken: {path: FOLDER}} (a trained encoder; "
                                "umim fit --config conf/ktoken.yaml writes runs/ktoken/ktoken)")
            if not Path(path).is_dir():
                raise UserError(f"method 'ktoken': no trained encoder at {path} (run umim fit --config conf/ktoken.yaml "
                                "or drop ktoken from methods)")
        known = set(inspect.signature(cls.load if name == "ktoken" else cls).parameters)
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserError(f"method_options of {name!r}: unknown option(s) {unknown}")


def make_method(name: str, ratio: float | None = None, merged_lm=None, **options):
    """Build method ``name`` at target TR ``ratio`` (``base`` -> ``None``, the plain LM).

    ``merged_lm`` (a :class:`umim.inference.generation.MergedLM`) supplies the merger and rules of the UMIM
    methods and the target LM that ``ktoken`` loads its encoder for; other methods ignore it.
    """
    if name == "base":
        return None
    cls = method_class(name)
    ratio = 0.0 if ratio is None else ratio
    if name in USES_MERGED_LM:
        if merged_lm is None or merged_lm.merger is None or merged_lm.rules is None:
            raise UserError(f"method {name!r} needs a merger and rules (run_dir, or merger + rules)")
        return cls(merged_lm=merged_lm, **options) if name == "umim" else cls(merged_lm=merged_lm, ratio=ratio, **options)
    if name == "ktoken":
        if "path" not in options or merged_lm is None:
            raise UserError("method 'ktoken' needs method_options {ktoken: {path: FOLDER}} (a trained encoder)")
        return cls.load(options.pop("path"), merged_lm.lm, merged_lm.tokenizer, ratio=ratio, **options)
    return cls(ratio=ratio, **options)


def is_kv_policy(method) -> bool:
    from umim_eval.methods.base import KVPolicy

    return isinstance(method, KVPolicy)
