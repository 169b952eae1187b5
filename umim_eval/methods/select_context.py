"""Select Context (Li et al., 2023): drop the tokens the LM finds least informative.

The self-information of token ``x_t`` is ``I(x_t) = -log p(x_t | x_<t)`` under the target LM (one
forward over the prompt). Predictable tokens carry little information, so removing them should
hurt least. Li et al. sum ``I`` over lexical units (phrases, sentences) and drop units below a
percentile; the UMIM paper ran the baseline at token level (App. F.2), and so do we: units are LM
tokens, which also makes the knob exact in TR — ``round(ratio * n)`` tokens are removed, no
search needed. The first token has no context, hence no self-information, and is always kept.
Ties are broken towards removing the earlier token (stable sort).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from umim_eval.methods.base import (
    CompressedPrompt,
    PromptCompressor,
    check_ratio,
    n_removed,
)
from umim_eval.scoring.token_nll import token_nll


@torch.no_grad()
def self_information(lm, ids: list[int]) -> torch.Tensor:
    """[L] float64 ``-log p(x_t | x_<t)`` in nats; ``NaN`` at t = 0 (no context)."""
    x = torch.tensor([ids], device=lm.device)
    info = token_nll(lm(input_ids=x).logits[0, :-1], x[0, 1:]).cpu()
    return torch.cat([torch.tensor([float("nan")], dtype=torch.float64), info])


@dataclass
class SelectContext(PromptCompressor):
    """Remove the ``round(ratio * n)`` lowest self-information tokens of the prompt.

    Parameters
    ----------
    ratio : target token reduction (fraction of prompt tokens removed).
    """

    ratio: float = 0.0
    name: ClassVar[str] = "select_context"
    label: ClassVar[str] = "Select Context"

    def __post_init__(self):
        self.ratio = check_ratio(self.ratio)

    def compress(self, lm, tokenizer, prompt_ids: list[int]) -> CompressedPrompt:
        ids = list(prompt_ids)
        k = n_removed(self.ratio, len(ids))
        if k == 0:
            return CompressedPrompt(ids=ids, kept=list(range(len(ids))), n_original=len(ids))
        info = self_information(lm, ids)[1:]
        drop = (torch.sort(info, stable=True).indices[:k] + 1).tolist()
        kept = sorted(set(range(len(ids))) - set(drop))
        return CompressedPrompt(ids=[ids[i] for i in kept], kept=kept, n_original=len(ids))
