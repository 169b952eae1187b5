"""QuickMerge++ (Liu & Yu, ICML 2025) as a :class:`PromptMerger`: attention-entropy saliency,
an entropy-based token budget, and saliency-weighted averaging of contiguous token groups.

The paper compresses frozen-encoder outputs for a small decoder trained on top of them; here the
"encoder" is the target LM itself and what is merged is the LM's own input embeddings, so the
method runs training-free at inference time. Stage by stage (paper Sec. 3, Alg. 1):

1. **Saliency** (Sec. 3.2). One forward over the prompt with eager attention. For every layer
   ``l``, head ``h`` and query token ``i``, the attention entropy
   ``H = -sum_j A_ij log A_ij`` is divided by ``log(i + 1)``, the entropy of a uniform row over
   the ``i + 1`` keys a causal query can see: our ``Normalize``, which puts every token on the
   same [0, 1] scale (raw causal entropy grows with position) and keeps an absolute level for the
   budget threshold. Token 0 sees one key and gets 0. ``Ĥ_i`` is the mean over **all layers and
   all heads** (the paper averages layers; its formula is single-head). The saliency is
   ``s_i = 1 - Ĥ_i``: the paper says the signal "favors sharp attention tokens with low
   uncertainty", and the authors' ``quickmerge.py`` also uses ``1 - entropy``.
2. **Budget.** ``ratio`` (the shared target TR) fixes ``K = n - round(ratio * n)`` elements. With
   ``ratio=None`` the paper's entropy threshold (``alpha = 0.45``, Sec. 4.1) sets it instead:
   token 0 plus every token whose attention is sharper than the threshold
   (``Ĥ_i < alpha``) counts as salient and gets one element, ``K = 1 + #{i >= 1: Ĥ_i < alpha}``.
   Diffuse attention (high entropy) thus means more merging, sharp attention less.
3. **Selection and mass** (Sec. 3.3). The Gumbel-softmax mask exists to make the selection
   differentiable for training; inference here is deterministic, so we take its noiseless
   zero-temperature limit: the ``K`` most salient tokens get ``M_i = 1``, the rest 0, and the
   mass is ``m_i = M_i * s_i + (1 - M_i) * eps`` (``s_i`` floored at ``eps`` so a selected token
   never weighs less than an unselected one).
4. **Grouping** (Sec. 3.3, "agglomerative cosine clustering"). Groups must be contiguous so the
   sequence order survives, so the clustering runs on the token chain: starting from single
   tokens, it repeatedly joins the two adjacent groups linked by the most cosine-similar
   neighbouring pair of input embeddings. On a chain this is exactly cutting the ``K - 1`` least
   similar neighbour links, one ``topk``.
5. **Merging.** Each group becomes ``sum_j m_j x_j / sum_j m_j`` over its input embeddings.

Token 0 is always its own group (the causal LM's attention sink: merging it changes what every
later token attends to most; the paper's bidirectional encoders have no sink). Only when the
budget is a single element does it join the rest.

Skipped: the bidirectional AR prior (Sec. 3.4) is a decoder trained on merged sequences; the
target LM is frozen and nothing is trained here, so the merged embeddings are fed to the LM as
they are. The fidelity bound (Sec. 3.5) is an analysis quantity, not a step, and the NED score
(App. A) is an alternative saliency the pipeline does not use.

Needs attention weights: load the LM with ``attn_implementation="eager"`` (or call
``lm.set_attn_implementation("eager")``); other implementations raise a :class:`ValueError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from umim.errors import UserError
from umim_eval.methods.base import MergedPrompt, PromptMerger, check_ratio, n_removed

ALPHA = 0.45
"""The paper's entropy threshold (Sec. 4.1): a token with normalized attention entropy below it is salient."""
EPSILON = 0.01
"""Mass of an unselected token (the paper's ``eps << 1``; 0.01 in the authors' code)."""


def attention_entropy(attentions) -> torch.Tensor:
    """Normalized attention entropy of every query token, averaged over layers and heads.

    Parameters
    ----------
    attentions : sequence of L tensors [1, H, N, N], the causal attention probabilities of each
        layer (``output_attentions=True`` under eager attention).

    Returns
    -------
    [N] float32 ``Ĥ_i`` in [0, 1]: 0 = all attention on one key, 1 = uniform over the ``i + 1``
    visible keys. Token 0 (one visible key) is 0.
    """
    if not attentions:
        raise UserError("no attention weights: the LM must run with attn_implementation='eager'")
    A = torch.stack([a[0].float() for a in attentions])  # [L, H, N, N]
    H = -torch.special.xlogy(A, A).sum(-1).mean(dim=(0, 1))  # [N]; xlogy: masked zeros add 0, not NaN
    n_keys = torch.arange(1, H.shape[0] + 1, dtype=H.dtype, device=H.device)
    return torch.where(n_keys > 1, H / n_keys.log().clamp_min(1e-12), torch.zeros_like(H)).clamp(0.0, 1.0)


def entropy_budget(entropy: torch.Tensor, alpha: float = ALPHA) -> int:
    """Elements to keep when no ratio is given: token 0 plus the tokens with ``Ĥ_i < alpha``.

    Parameters
    ----------
    entropy : [N] normalized attention entropy (:func:`attention_entropy`).
    alpha : threshold in (0, 1].

    Returns
    -------
    ``K`` in ``[min(N, 2), N]``: at least token 0 and one group for the rest, so the TR is < 1.
    """
    if not 0.0 < alpha <= 1.0:
        raise UserError(f"alpha must be in (0, 1], got {alpha}")
    N = int(entropy.shape[0])
    if N == 0:
        raise UserError("empty entropy vector")
    return max(min(N, 2), 1 + int((entropy[1:] < alpha).sum()))


def contiguous_groups(x: torch.Tensor, n_groups: int, keep_first: bool = True) -> torch.Tensor:
    """Split a sequence into ``n_groups`` contiguous groups by cutting its least similar neighbour links.

    Parameters
    ----------
    x : [N, d] the features compared (cosine similarity of neighbours).
    n_groups : K, 1 <= K <= N.
    keep_first : always cut after token 0 (needs K >= 2).

    Returns
    -------
    [N] long group index of every token, 0 .. K-1, non-decreasing.
    """
    N = x.shape[0]
    if not 1 <= n_groups <= N:
        raise UserError(f"n_groups must be in [1, {N}], got {n_groups}")
    link = torch.nn.functional.cosine_similarity(x[:-1].float(), x[1:].float(), dim=-1)  # [N-1] link i joins i, i+1
    cut = torch.zeros(N - 1, dtype=torch.bool, device=x.device)
    n_cuts = n_groups - 1
    if keep_first and n_cuts > 0:
        link[0] = float("-inf")  # the weakest link: always cut first
    if n_cuts > 0:
        cut[torch.topk(link, n_cuts, largest=False).indices] = True
    return torch.cat([cut.new_zeros(1), cut]).long().cumsum(0)


@dataclass
class QuickMerge(PromptMerger):
    """QuickMerge++ saliency merging of contiguous prompt tokens.

    Parameters
    ----------
    ratio : target token reduction in [0, 1); ``None`` lets the entropy budget choose it.
    alpha : entropy threshold of the budget (used only when ``ratio`` is ``None``).
    epsilon : mass of tokens outside the selected top-K.
    """

    ratio: float | None = 0.0
    alpha: float = ALPHA
    epsilon: float = EPSILON
    name: ClassVar[str] = "quickmerge"
    label: ClassVar[str] = "QuickMerge++"
    needs_attentions: ClassVar[bool] = True
    """Runners switch the LM to eager attention around :meth:`merge` (see ``umim_eval.tasks.compare``)."""

    def __post_init__(self):
        if self.ratio is not None:
            self.ratio = check_ratio(self.ratio)
        if not 0.0 < self.alpha <= 1.0:
            raise UserError(f"alpha must be in (0, 1], got {self.alpha}")
        if not 0.0 < self.epsilon < 1.0:
            raise UserError(f"epsilon must be in (0, 1), got {self.epsilon}")

    @torch.no_grad()
    def entropy(self, lm, ids: torch.Tensor) -> torch.Tensor:
        """[N] normalized attention entropy of prompt ``ids`` [N] (one forward, eager attention)."""
        impl = getattr(lm.config, "_attn_implementation", None)
        if impl != "eager":
            raise UserError(f"{self.name} needs attention weights, which {impl!r} attention does not return: "
                            "load the LM with attn_implementation='eager' or call lm.set_attn_implementation('eager')")
        out = lm(input_ids=ids[None], output_attentions=True)
        n_layers = lm.config.get_text_config().num_hidden_layers
        if out.attentions is None or len(out.attentions) != n_layers or any(a is None for a in out.attentions):
            raise UserError(f"{self.name} got no attention weights from every layer: use eager attention")
        return attention_entropy(out.attentions)

    @torch.no_grad()
    def merge(self, lm, tokenizer, prompt_ids: list[int]) -> MergedPrompt:
        ids_list = list(prompt_ids)
        N = len(ids_list)
        if N == 0:
            raise UserError("empty prompt: give at least one token")
        ids = torch.tensor(ids_list, device=lm.device)
        x = lm.get_input_embeddings()(ids)  # [N, d]
        identity = MergedPrompt(embeds=x, segments=[(i, 1) for i in range(N)], n_original=N)
        K = None if self.ratio is None else N - n_removed(self.ratio, N)
        if K == N:  # nothing to merge: the exact token embeddings, no forward needed
            return identity
        ent = self.entropy(lm, ids)
        if K is None:
            K = entropy_budget(ent, self.alpha)
            if K == N:
                return identity
        sal = 1.0 - ent  # sharp attention = salient
        selected = torch.zeros(N, dtype=torch.bool, device=x.device)
        selected[torch.topk(sal, K).indices] = True
        mass = torch.where(selected, sal.clamp_min(self.epsilon), torch.full_like(sal, self.epsilon))  # [N]
        group = contiguous_groups(x, K, keep_first=K >= 2)  # [N]
        num = torch.zeros(K, x.shape[1], dtype=torch.float32, device=x.device).index_add_(
            0, group, mass[:, None] * x.float())
        den = torch.zeros(K, dtype=torch.float32, device=x.device).index_add_(0, group, mass)
        sizes = torch.bincount(group, minlength=K)
        starts = torch.cumsum(sizes, 0) - sizes
        segments = list(zip(starts.tolist(), sizes.tolist()))
        return MergedPrompt(embeds=(num / den[:, None]).to(x.dtype), segments=segments, n_original=N)

