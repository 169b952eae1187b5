"""StreamingLLM (Xiao et al., 2024): attention-sink tokens plus a window of recent tokens.

The cache keeps the first ``n_sink`` (4) tokens of the text, which soak up attention mass that has
nowhere else to go, and the most recent entries that fit in the budget; everything in between is
evicted. The budget never drops below ``n_sink + 1`` entries (the first steps of a text under the
proportional schedule), because an evicted sink could never come back.

Positions: cached keys keep their ORIGINAL positions (with RoPE the rotation is already applied
inside ``layer.keys``; GPT-2 adds absolute positions at the input), and each new query is fed at
its original position, so evicting leaves gaps in the relative distances. The StreamingLLM paper
instead re-assigns contiguous positions inside the cache (it caches pre-RoPE keys and rotates by
slot) so that texts longer than the trained context stay in range. Here texts are within the
context, and keeping original positions makes the policy a pure mask over the uncompressed
sequence: the eviction pattern depends on positions only (``content_free``), so a text is scored
in one forward with a 4-D mask that equals the step-by-step evicting cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from umim_eval.methods.base import KVPolicy, check_ratio


@dataclass
class StreamingLLM(KVPolicy):
    """Keep ``n_sink`` sink tokens and the most recent entries; evict the middle.

    Parameters
    ----------
    ratio : target token reduction (fraction of seen tokens not in the cache).
    n_sink : attention-sink tokens, fixed at the paper's 4 (not a tuning knob).
    """

    ratio: float = 0.0
    n_sink: int = 4
    name: ClassVar[str] = "streaming_llm"
    label: ClassVar[str] = "StreamingLLM"
    content_free: ClassVar[bool] = True

    def __post_init__(self):
        self.ratio = check_ratio(self.ratio)

    @property
    def min_entries(self) -> int:
        # the sinks plus the newest token: a smaller cache would lose a sink for good at the start
        return self.n_sink + 1

    def priority(self, layer: int, pos: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
        # sinks first (earliest first), then the newest: positions stay far below 2**40
        return torch.where((pos >= 0) & (pos < self.n_sink), (1 << 40) - pos, pos)
