"""Optional recording of a merging decode, for checking rollback against recompute.

The decode loop calls the same four methods on a :class:`TraceRecorder` (``generate(trace=True)``)
or on a :class:`NoTrace`, whose methods do nothing, so the loop has no ``if trace:`` branches.
A trace (:attr:`umim.inference.generation.GenerationResult.trace`) holds ``logits`` [steps, V]
(each step's next-token logits, prefill first), ``position`` [steps] (the compressed position of
the element whose forward produced them), ``survives`` [steps] bool (that element still sits at
that position in the final sequence, i.e. it was not merged away later) and ``embeds`` [S_final, d]
(the final compressed sequence).
"""

from __future__ import annotations

import torch


class NoTrace:
    """Records nothing (the default)."""

    def start(self, embeds: list[torch.Tensor]) -> None:
        pass

    def record(self, logits: torch.Tensor, positions: list[int], live: list[bool]) -> None:
        pass

    def step(self, embeds: torch.Tensor, merged: list[int], live: list[bool]) -> None:
        pass

    def result(self, b: int) -> dict | None:
        return None


class TraceRecorder(NoTrace):
    """Records every row's logits, positions and compressed sequence.

    Each element of the compressed sequence gets an id when it is fed; an element merged away later
    loses its place, so a recorded position "survives" iff the final sequence holds the same id there.
    """

    def start(self, embeds: list[torch.Tensor]) -> None:
        """The merged prompts: ``embeds[b]`` [S_b, d] for each row b."""
        self.rows = [{"logits": [], "position": [], "element": [], "embeds": list(e), "ids": list(range(len(e))),
                      "next_id": len(e) - 1} for e in embeds]

    def record(self, logits: torch.Tensor, positions: list[int], live: list[bool]) -> None:
        """``logits`` [B, V] of a forward that fed each live row b at ``positions[b]``."""
        for b, t in enumerate(self.rows):
            if live[b]:
                t["logits"].append(logits[b].clone())
                t["position"].append(positions[b])
                t["element"].append(t["ids"][positions[b]])

    def step(self, embeds: torch.Tensor, merged: list[int], live: list[bool]) -> None:
        """Each live row drops its last ``merged[b]`` elements and appends ``embeds[b, 0]`` ([B, 1, d])."""
        for b, t in enumerate(self.rows):
            if live[b]:
                k = merged[b]
                del t["embeds"][len(t["embeds"]) - k :], t["ids"][len(t["ids"]) - k :]
                t["embeds"].append(embeds[b, 0].clone())
                t["next_id"] += 1
                t["ids"].append(t["next_id"])

    def result(self, b: int) -> dict:
        """Row b's trace in the :attr:`GenerationResult.trace` format."""
        t = self.rows[b]
        final = t["ids"]
        survives = [p < len(final) and final[p] == e for p, e in zip(t["position"], t["element"])]
        return {"logits": torch.stack(t["logits"]), "position": torch.tensor(t["position"]),
                "survives": torch.tensor(survives),
                "embeds": torch.stack(t["embeds"])}
