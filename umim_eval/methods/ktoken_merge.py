"""K-Token Merging as a :class:`PromptMerger`: the earliest full K-blocks of the prompt each become one
embedding from the trained encoder; the recent tail stays token by token.

``ratio`` (target TR) -> ``m = round(ratio * n / (K - 1))`` blocks of an ``n``-token prompt, so
``TR = m (K - 1) / n``. Why a prompt can miss its target:

* TR moves in steps of ``(K - 1) / n``: the rounding error is at most ``(K - 1) / (2 n)``, within
  2 points for ``n >= 25 (K - 1)`` (75 tokens at K = 4);
* at most the ``n // K`` full blocks merge, so TR never exceeds ``(n // K)(K - 1) / n <= (K - 1) / K``.
  A ratio above ``(K - 1) / K`` is refused; a prompt too short for its ratio is merged as far as it
  goes, with a warning that says so.

A folder trained with LoRA (``adapter/`` beside the encoder) changes the LM itself: :meth:`KTokenMerge.load`
injects the adapter into the given LM in place, and :meth:`merge` refuses any other LM. Generation
stays in the LM's vocabulary (only the prompt is merged).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from umim.errors import UserError
from umim.ktoken.encoder import KTokenEncoder, blocks_for_ratio, kblock_segments, max_tr
from umim_eval.methods.base import MergedPrompt, PromptMerger, check_ratio

TOLERANCE = 0.02  # the TR error the interface promises (2 points); larger misses are warned about


@dataclass
class KTokenMerge(PromptMerger):
    """Merge the earliest ``round(ratio * n / (K - 1))`` K-blocks of each prompt.

    Parameters
    ----------
    encoder : the trained K-token encoder (its ``config.k`` is K).
    ratio : target token reduction in ``[0, (K - 1) / K]``; 0 is the identity.
    adapted_lm : the LM the folder's LoRA adapter was injected into (None: no adapter; any LM).
    """

    encoder: KTokenEncoder
    ratio: float = 0.0
    adapted_lm: torch.nn.Module | None = None
    name: ClassVar[str] = "ktoken"
    label: ClassVar[str] = "K-Token Merging"

    def __post_init__(self):
        check_ratio(self.ratio)
        k = self.encoder.config.k
        if self.ratio > (k - 1) / k:
            raise UserError(
                f"K-token merging with K={k} removes at most (K-1)/K = {(k - 1) / k:.3f} of a prompt "
                f"(every token in a full block); ratio {self.ratio} is out of reach"
            )

    @property
    def k(self) -> int:
        return self.encoder.config.k

    @classmethod
    def from_run(cls, run, ratio: float = 0.0, path: str | Path | None = None) -> KTokenMerge:
        """The trained encoder folder ``path`` for the run's LM (see :meth:`load`)."""
        cls.check_options({"path": path})
        return cls.load(path, run.lm, run.tokenizer, ratio=ratio)

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        path = options.get("path")
        if path is None:
            raise UserError("method 'ktoken' needs method_options {ktoken: {path: FOLDER}} (a trained encoder; "
                            "umim fit --config conf/ktoken.yaml writes runs/ktoken/ktoken)")
        if not Path(path).is_dir():
            raise UserError(f"method 'ktoken': no trained encoder at {path} (run umim fit --config conf/ktoken.yaml "
                            "or drop ktoken from methods)")

    @classmethod
    def load(cls, path: str | Path, lm, tokenizer=None, ratio: float = 0.0) -> KTokenMerge:
        """Load a trained folder (``config.json`` + ``encoder.safetensors`` [+ ``adapter/``]).

        The encoder must fit ``lm``'s hidden size (and ``tokenizer``'s vocabulary when given). If the
        folder holds a LoRA adapter it is injected into ``lm`` IN PLACE: every later use of ``lm``
        (scoring, generation, ratio 0) runs the adapted model.
        """
        from umim.fingerprint import tokenizer_fingerprint
        from umim.ktoken.lora import ADAPTER_DIR, load_adapter

        path = Path(path)
        fp = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
        encoder = KTokenEncoder.from_pretrained(path, lm.get_input_embeddings().embedding_dim, fp)
        w = lm.get_input_embeddings().weight
        encoder.to(device=w.device).eval()
        adapted = None
        if (path / ADAPTER_DIR).is_dir():
            load_adapter(lm, path / ADAPTER_DIR)
            adapted = lm
        return cls(encoder=encoder, ratio=ratio, adapted_lm=adapted)

    def segments(self, n: int) -> list[tuple[int, int]]:
        """``(start, length)`` of the elements of an ``n``-token prompt at this ratio."""
        m = blocks_for_ratio(self.ratio, n, self.k)
        starts, lens = kblock_segments(torch.tensor([n]), self.k, m)
        return list(zip(starts[0].tolist(), lens[0].tolist()))

    @torch.no_grad()
    def merge(self, lm, tokenizer, prompt_ids: list[int]) -> MergedPrompt:
        if self.adapted_lm is not None and lm is not self.adapted_lm:
            raise UserError("this K-token folder carries a LoRA adapter: merge for the LM it was loaded into")
        ids = list(prompt_ids)
        n = len(ids)
        segments = self.segments(n)
        tr = 1.0 - len(segments) / n if n else 0.0
        if n and abs(tr - self.ratio) > TOLERANCE:
            why = (f"at most {n // self.k} full blocks fit (max TR {max_tr(self.k, n):.3f})"
                   if tr < self.ratio and blocks_for_ratio(self.ratio, n, self.k) == n // self.k
                   else f"TR moves in steps of (K-1)/n = {(self.k - 1) / n:.3f}")
            warnings.warn(f"K-token merging (K={self.k}) reaches TR {tr:.3f} instead of {self.ratio} on a "
                          f"{n}-token prompt: {why}", stacklevel=2)
        embed = lm.get_input_embeddings()
        x = embed(torch.tensor(ids, dtype=torch.long, device=embed.weight.device))  # [n, d]
        out = x[torch.tensor([s for s, _ in segments], device=x.device)]  # [S, d], single tokens as is
        blocks = [i for i, (_, length) in enumerate(segments) if length > 1]
        if blocks:
            m, k = len(blocks), self.k
            # the merged blocks are the first m elements and cover tokens 0 .. mK-1 in order
            out[:m] = self.encoder(x[: m * k].reshape(m, k, -1)).to(out.dtype)
        return MergedPrompt(embeds=out, segments=segments, n_original=n)
