"""Per-token negative log-likelihood, the one scoring primitive every evaluation shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float64 NLL (nats) of ``targets`` [...] under ``logits`` [..., V] (softmax in float32)."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return flat.reshape(targets.shape).double()
