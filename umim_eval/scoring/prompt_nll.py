"""Score a continuation after a (compressed) prompt: the prompt compressors' counterpart of
:func:`umim_eval.scoring.policy_nll.policy_nll`."""

from __future__ import annotations

import torch

from umim_eval.scoring.token_nll import token_nll


@torch.no_grad()
def continuation_nll(lm, context_ids: list[int], target_ids: list[int]) -> torch.Tensor:
    """[len(target_ids)] float64 NLL (nats) of each target token given the context and the earlier targets.

    The context is fed as the compressor returned it: contiguous positions, dropped tokens simply absent.
    """
    if not context_ids or not target_ids:
        raise ValueError("need a non-empty context and a non-empty target")
    x = torch.tensor([list(context_ids) + list(target_ids)], device=lm.device)
    n = len(context_ids)
    logits = lm(input_ids=x).logits[0, n - 1 : -1].float()
    return token_nll(logits, x[0, n:]).cpu()
