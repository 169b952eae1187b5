"""The base LM as a method: the prompt is fed unchanged (TR 0), so every runner treats the base
row like any other method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from umim_eval.methods.base import CompressedPrompt, PromptCompressor


@dataclass
class NoReduction(PromptCompressor):
    """Keep every token (``ratio`` is ``None``: the TR is 0 whatever a runner aims at)."""

    ratio: float | None = None
    name: ClassVar[str] = "base"
    label: ClassVar[str] = "Base LM"
    fixed_tr: ClassVar[bool] = True

    @classmethod
    def from_run(cls, run, ratio: float = 0.0) -> NoReduction:
        return cls()

    def compress(self, lm, tokenizer, prompt_ids: list[int]) -> CompressedPrompt:
        ids = list(prompt_ids)
        return CompressedPrompt(ids=ids, kept=list(range(len(ids))), n_original=len(ids))
