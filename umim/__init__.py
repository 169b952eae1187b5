"""UMIM: merge frequent n-gram spans of the input into single surrogate embeddings of a frozen LM.

Folders follow the data flow: ``rules`` (corpus -> mining -> the saved rule set) -> ``merging``
(matcher -> span encoder ``merger`` -> merged batches) -> ``training`` (distillation with Lightning,
export, report) -> ``inference`` (decoding with prompt and online merging); ``ktoken`` is the
K-Token baseline's span encoder. Shared pieces sit at the top: ``lm`` (loading the frozen LM),
``errors``, ``safe_io``, ``module_io``, ``fingerprint``; ``cli`` is the ``umim`` command.
"""

from importlib import import_module

__version__ = "0.1.0"

from umim import _compat

_compat.install()  # old flat import paths (umim.generation, ...) keep working

_LAZY = {
    "MergeRules": "rules.store",
    "SpanMatcher": "merging.matcher",
    "MergeModule": "merging.merger",
    "MergerConfig": "merging.merger",
    "mine_rules": "rules.mining",
    "UMIMDistillation": "training.distillation",
    "UMIMDataModule": "training.datamodule",
    "MergedLM": "inference.generation",
    "SamplingConfig": "inference.generation",
}


def __getattr__(name):  # keep `import umim` cheap: torch/lightning load only when used
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'umim' has no attribute {name!r}")


__all__ = list(_LAZY)
