"""UMIM: merge frequent n-gram spans of the input into single surrogate embeddings of a frozen LM.

Data flow (one module per step): ``corpus`` -> ``mining`` -> ``rules`` / ``matcher`` -> ``merger`` ->
``batch`` -> ``distill_loss`` + ``alignment_metrics`` -> ``distillation`` (LightningModule) with
``datamodule``; ``export`` / ``report`` at the end; ``generation`` (+ ``kv_cache``) decodes with
prompt and online merging; ``cli`` is the ``umim`` command.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "MergeRules": "rules",
    "SpanMatcher": "matcher",
    "MergeModule": "merger",
    "MergerConfig": "merger",
    "mine_rules": "mining",
    "UMIMDistillation": "distillation",
    "UMIMDataModule": "datamodule",
    "MergedLM": "generation",
    "SamplingConfig": "generation",
}


def __getattr__(name):  # keep `import umim` cheap: torch/lightning load only when used
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'umim' has no attribute {name!r}")


__all__ = list(_LAZY)
