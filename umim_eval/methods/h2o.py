"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023): keep the tokens that received the most attention.

Every cached entry accumulates the attention probability it receives from every query, per layer
and per KV head (query heads of a GQA group are summed: they read the same entry). When the cache
is over budget, half of the budget goes to the most recent entries and the other half to the
non-recent entries with the highest accumulated score (the paper's 50/50 heavy/recent split);
the rest is evicted, independently per layer, head and row of a batch, and its score is forgotten.
As published, the cache first grows to its budget and only then evicts: under the ``prompt`` schedule the budget
is the prompt's whole allowance ``P - round(ratio * P)`` from the first token on, so the early
tokens (the attention sink among them) are all read and scored before anything is evicted, and
the cache at the end of the prompt is the size of a prompt reduced to TR ``ratio``.

Needs attention weights, i.e. a model loaded with ``attn_implementation="eager"``
(``lm.set_attn_implementation("eager")``): fused kernels do not return them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from umim_eval.methods.base import KVPolicy, check_ratio, n_removed


@dataclass
class H2O(KVPolicy):
    """Heavy hitters by accumulated attention plus a recent window.

    Parameters
    ----------
    ratio : target token reduction (fraction of seen tokens not in the cache).
    recent_fraction : share of the budget for the recent window, fixed at the paper's 0.5.
    """

    ratio: float = 0.0
    recent_fraction: float = 0.5
    name: ClassVar[str] = "h2o"
    label: ClassVar[str] = "H2O"
    needs_attentions: ClassVar[bool] = True
    scores: dict = field(default_factory=dict, repr=False)
    """layer -> [B, H_kv, T] float accumulated attention of each cached slot."""

    def __post_init__(self):
        self.ratio = check_ratio(self.ratio)

    def reset(self) -> None:
        self.scores = {}

    def budget(self, n_seen: int, n_total: int | None = None, schedule: str = "proportional",
               ratio: float | None = None) -> int:
        ratio = self.ratio if ratio is None else ratio
        if schedule == "prompt" and n_total is not None:  # grow to the prompt's allowance, then evict
            allowance = n_total - n_removed(ratio, n_total)
            return min(n_seen, max(allowance, self.min_entries) + max(0, n_seen - n_total))
        return super().budget(n_seen, n_total, schedule, ratio)

    def observe(self, layer: int, attn: torch.Tensor, pos: torch.Tensor) -> None:
        B, H, Q, T = attn.shape
        h_kv = pos.shape[1]
        if H % h_kv:
            raise ValueError(f"{H} query heads do not split into {h_kv} KV heads")
        received = attn.float().view(B, h_kv, H // h_kv, Q, T).sum(dim=(2, 3))  # [B, H_kv, T]
        old = self.scores.get(layer, received.new_zeros(B, h_kv, 0))
        self.scores[layer] = torch.nn.functional.pad(old, (0, T - old.shape[-1])) + received  # new slots start at 0

    def priority(self, layer: int, pos: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
        real = pos >= 0
        # half of each row's budget (half up, not banker's), at least 1: its newest real slots
        n_recent = torch.floor(self.recent_fraction * n_keep.double() + 0.5).long().clamp(min=1).minimum(n_keep)
        newest = real.flip(-1).cumsum(-1).flip(-1)  # 1 on a row's newest real slot, 2 on the one before, ...
        recent = real & (newest <= n_recent[:, None, None])
        return self.scores[layer].masked_fill(recent, float("inf"))  # the heavy hitters fill the rest

    def keep(self, layer: int, pos: torch.Tensor, n_keep: int | torch.Tensor) -> torch.Tensor:
        index = super().keep(layer, pos, n_keep)
        self.scores[layer] = self.scores[layer].gather(-1, index)  # the kept slots' scores travel with them
        return index
