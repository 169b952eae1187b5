"""What the LM is fed after a prompt method ran, and the two things every runner does with it:
score a continuation, or generate from it.

A prompt method (:class:`~umim_eval.methods.base.PromptMethod`: drops tokens or merges groups into
single embeddings) turns a prompt into :class:`PromptInputs` with its ``inputs``. Either way the prompt
becomes ``[S, d]`` input embeddings at contiguous positions
``0 .. S-1`` plus its achieved TR, so scoring and generation are the same code for all of them.
KV-cache policies do not change the prompt; they act during decoding
(:mod:`umim_eval.scoring.policy_nll`, :mod:`umim_eval.scoring.policy_generate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from umim.errors import UserError
from umim_eval.scoring.token_nll import token_nll


@dataclass
class PromptInputs:
    """One prompt as fed to the LM."""

    embeds: torch.Tensor
    """[S, d] input embeddings (LM dtype and device)."""
    n_original: int
    """Prompt tokens before compression."""

    @property
    def n_fed(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def tr(self) -> float:
        return 1.0 - self.n_fed / self.n_original if self.n_original else 0.0


@torch.no_grad()
def prompt_inputs(method, lm, tokenizer, prompt_ids: list[int]) -> PromptInputs:
    """Run prompt ``method`` on one prompt (``None``: unchanged) and embed the result: [S, d]."""
    ids = list(prompt_ids)
    if not ids:
        raise UserError("empty prompt: give at least one token")
    if method is not None:
        return method.inputs(lm, tokenizer, ids)
    return PromptInputs(embeds=lm.get_input_embeddings()(torch.tensor(ids, device=lm.device)), n_original=len(ids))


@torch.no_grad()
def continuation_logits(lm, prompt: PromptInputs, target_ids: list[int]) -> torch.Tensor:
    """[C, V] logits that predict each target token after the fed prompt (targets unmerged, one
    position each, contiguous with the prompt's compressed positions)."""
    if not target_ids:
        raise UserError("empty target")
    tgt = torch.tensor(list(target_ids), device=lm.device)
    x = torch.cat([prompt.embeds, lm.get_input_embeddings()(tgt[:-1])])[None]
    return lm(inputs_embeds=x,
              position_ids=torch.arange(x.shape[1], device=lm.device)[None]).logits[0, prompt.n_fed - 1 :]


@torch.no_grad()
def continuation_nll_from(lm, prompt: PromptInputs, target_ids: list[int]) -> torch.Tensor:
    """[C] float64 NLL (nats) of each target token after the fed prompt."""
    logits = continuation_logits(lm, prompt, target_ids)
    return token_nll(logits, torch.tensor(list(target_ids), device=logits.device)).cpu()


@torch.no_grad()
def generate_from(lm, prompts: list[PromptInputs], max_new_tokens: int, do_sample: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0, eos_token_id=None,
                  pad_token_id=None) -> list[list[int]]:
    """Decode from fed prompts with Hugging Face ``generate`` (left-padded ``inputs_embeds``).

    Returns the new token ids of each prompt (EOS and what follows it dropped).
    """
    dev, dtype = lm.device, lm.get_input_embeddings().weight.dtype
    B, S = len(prompts), max(p.n_fed for p in prompts)
    d = prompts[0].embeds.shape[-1]
    embeds = torch.zeros(B, S, d, dtype=dtype, device=dev)
    mask = torch.zeros(B, S, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        embeds[b, S - p.n_fed :] = p.embeds
        mask[b, S - p.n_fed :] = 1
    kw = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "eos_token_id": eos_token_id,
              "pad_token_id": pad_token_id if pad_token_id is not None else eos_token_id}
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    out = lm.generate(inputs_embeds=embeds, attention_mask=mask, **kw)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    res = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        res.append(row[:cut])
    return res
