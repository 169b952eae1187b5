"""UMIM itself as a :class:`PromptMerger`: the mined rules pick the spans (longest match), the
trained merger turns each span into one surrogate embedding. Its TR is whatever the rules give on
the prompt (``ratio`` is ``None``); the baselines are then matched to that TR."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from umim.inference.generation import MergedLM
from umim.inference.loading import merging_missing
from umim_eval.methods.base import MergedPrompt, PromptMerger


@dataclass
class UMIMMerge(PromptMerger):
    """Fixed-rule UMIM prompt merging.

    Parameters
    ----------
    merged_lm : a :class:`umim.inference.generation.MergedLM` holding the merger and rules (its LM is the
        target LM; the ``lm`` argument of :meth:`merge` must be the same model).
    """

    merged_lm: MergedLM
    ratio: float | None = None
    name: ClassVar[str] = "umim"
    label: ClassVar[str] = "Merge Module (UMIM)"
    uses_merging: ClassVar[bool] = True
    fixed_tr: ClassVar[bool] = True

    @classmethod
    def from_run(cls, run: MergedLM, ratio: float = 0.0) -> UMIMMerge:
        """The run's merger and rules; ``ratio`` is ignored (the rules fix the TR)."""
        if run is None:
            raise merging_missing("method 'umim'")
        run.require_merging("method 'umim'")
        return cls(merged_lm=run)

    def merge(self, lm, tokenizer, prompt_ids: list[int]) -> MergedPrompt:
        self.merged_lm.require_merging("UMIM merging")
        ids = list(prompt_ids)
        segments = self.merged_lm.rules.segment(ids)
        return MergedPrompt(embeds=self.merged_lm.segment_embeds(ids, segments), segments=segments, n_original=len(ids))
