"""Step 1: from a corpus to merge rules. ``corpus`` (documents -> token ids) -> ``mining`` (frequent
n-grams, overlap filters) or ``prob_rules`` (model-probability rules) -> ``store`` (:class:`MergeRules`:
the saved rule set and its longest-match segmentation)."""

from umim.rules.store import (
    FORMAT,
    MAX_N,
    VERSION,
    MergeRules,
    RulesFileError,
    is_rules_dir,
)

__all__ = ["FORMAT", "MAX_N", "VERSION", "MergeRules", "RulesFileError", "is_rules_dir"]
