"""K-Token Merging as a :class:`PromptMerger`: the earliest full K-blocks of the prompt each become one
embedding from the trained encoder; the recent tail stays token by token.

``ratio`` (target TR) -> ``m = round(ratio * n / (K - 1))`` blocks of an ``n``-token prompt, so
``TR = m (K - 1) / n``. Why a prompt can miss its target:

* TR moves in steps of ``(K - 1) / n``: the rounding error is at most ``(K - 1) / (2 n)``, within
  2 points for ``n >= 25 (K - 1)`` (75 tokens at K = 4);
* at most the ``n // K`` full blocks merge, so TR never exceeds ``(n // K)(K - 1) / n <= (K - 1) / K``.
  A ratio above ``(K - 1) / K`` is refused; a prompt too short for its ratio is merged as far as it
  goes, with a warning that says so.

Two registered variants, one per training recipe, so a table can list both:

* ``ktoken`` (:class:`KTokenMerge`, "K-Token Merging (frozen LM)"): the encoder trained against the
  frozen LM (``umim fit --config conf/ktoken.yaml``); the LM is used as it is.
* ``ktoken_lora`` (:class:`KTokenLoRAMerge`, "K-Token Merging (LoRA LM)"): K-Token Merging's own
  recipe, encoder + LoRA adapters on the LM (``umim fit --config conf/ktoken_lora.yaml``; the folder
  holds ``adapter/`` beside the encoder). The adapter is injected into the run's LM but switched on
  only while this method scores or generates, so the other methods of the same comparison (the base
  LM included) still run the unadapted LM.

Each refuses the other's folder. :meth:`KTokenMerge.load` (the Python API) takes either and leaves an
adapter switched on; :meth:`merge` then refuses any other LM. Generation stays in the LM's
vocabulary (only the prompt is merged).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
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
    label: ClassVar[str] = "K-Token Merging (frozen LM)"
    with_lora: ClassVar[bool] = False
    """Whether the registered method takes the LoRA recipe's folders (``adapter/`` beside the encoder)."""
    conf: ClassVar[str] = "conf/ktoken.yaml"
    """The config that trains the folders this method takes."""

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
        from umim.ktoken.lora import ADAPTER_DIR

        super().check_options(options)
        path, name = options.get("path"), cls.name
        export = f"runs/{Path(cls.conf).stem}/ktoken"
        if path is None:
            raise UserError(f"method {name!r} needs method_options {{{name}: {{path: FOLDER}}}} (a trained encoder; "
                            f"umim fit --config {cls.conf} writes {export})")
        if not Path(path).is_dir():
            raise UserError(f"method {name!r}: no trained encoder at {path} (run umim fit --config {cls.conf} "
                            f"or drop {name} from methods)")
        has_adapter = (Path(path) / ADAPTER_DIR).is_dir()
        if has_adapter != cls.with_lora:
            other = "ktoken_lora" if has_adapter else "ktoken"
            why = "holds a LoRA adapter (K-Token Merging's own recipe)" if has_adapter else \
                "holds no LoRA adapter/ (trained against the frozen LM)"
            raise UserError(f"method {name!r}: {path} {why}: list it as method {other!r}")

    @classmethod
    def load(cls, path: str | Path, lm, tokenizer=None, ratio: float = 0.0) -> KTokenMerge:
        """Load a trained folder (``config.json`` + ``encoder.safetensors`` [+ ``adapter/``]).

        The encoder must fit ``lm``'s hidden size (and ``tokenizer``'s vocabulary when given). If the
        folder holds a LoRA adapter it is injected into ``lm`` IN PLACE: every later use of ``lm``
        (scoring, generation, ratio 0) runs the adapted model.
        """
        from umim.ktoken.lora import ADAPTER_DIR, load_adapter

        path = Path(path)
        encoder = cls.load_encoder(path, lm, tokenizer)
        adapted = None
        if (path / ADAPTER_DIR).is_dir():
            load_adapter(lm, path / ADAPTER_DIR)
            adapted = lm
        return cls(encoder=encoder, ratio=ratio, adapted_lm=adapted)

    @staticmethod
    def load_encoder(path: str | Path, lm, tokenizer=None) -> KTokenEncoder:
        """The folder's encoder on ``lm``'s device, checked against its hidden size (and ``tokenizer``'s vocabulary)."""
        from umim.fingerprint import tokenizer_fingerprint

        fp = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
        encoder = KTokenEncoder.from_pretrained(Path(path), lm.get_input_embeddings().embedding_dim, fp)
        return encoder.to(device=lm.get_input_embeddings().weight.device).eval()

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


_ADAPTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""LM -> the ``adapter/`` folder :class:`KTokenLoRAMerge` injected into it."""


def switch_lora(lm: torch.nn.Module, on: bool | list[bool]) -> list[bool]:
    """Switch the LoRA adapters injected into ``lm`` on or off (one flag for all, or one per adapted
    layer); returns the previous flags. peft's ``enable_adapters`` also makes adapter weights
    trainable: they are frozen again, evaluation never trains them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in lm.modules() if isinstance(m, BaseTunerLayer)]
    before = [not m.disable_adapters for m in layers]
    for m, flag in zip(layers, on if isinstance(on, list) else [on] * len(layers)):
        m.enable_adapters(flag)
    for n, p in lm.named_parameters():
        if "lora_" in n:
            p.requires_grad_(False)
    return before


@contextlib.contextmanager
def lora_switched(lm: torch.nn.Module, on: bool):
    """:func:`switch_lora` inside the block, the previous flags restored afterwards."""
    before = switch_lora(lm, on)
    try:
        yield
    finally:
        switch_lora(lm, before)


@dataclass
class KTokenLoRAMerge(KTokenMerge):
    """K-Token Merging's own recipe: the encoder of a folder trained with LoRA adapters on the LM.

    :meth:`from_run` injects the folder's adapter into the run's LM switched OFF; it is switched on
    only while this method scores or generates, so one loaded LM serves every method of a comparison.
    """

    name: ClassVar[str] = "ktoken_lora"
    label: ClassVar[str] = "K-Token Merging (LoRA LM)"
    with_lora: ClassVar[bool] = True
    conf: ClassVar[str] = "conf/ktoken_lora.yaml"

    @classmethod
    def from_run(cls, run, ratio: float = 0.0, path: str | Path | None = None) -> KTokenLoRAMerge:
        """The trained folder ``path`` (encoder + ``adapter/``) for the run's LM; the adapter starts switched off."""
        from umim.ktoken.lora import ADAPTER_DIR

        cls.check_options({"path": path})
        adapter = (Path(path) / ADAPTER_DIR).resolve()
        loaded = _ADAPTERS.get(run.lm)
        if loaded is None:
            method = cls.load(path, run.lm, run.tokenizer, ratio=ratio)
            _ADAPTERS[run.lm] = adapter
            switch_lora(run.lm, False)
            return method
        if loaded != adapter:  # peft holds one adapter per LM here: a second folder would mix two recipes
            raise UserError(f"method 'ktoken_lora': the run's LM already carries the adapter of {loaded.parent}; "
                            f"compare {Path(path)} in a separate run")
        # the same folder again (a runner that rebuilds its methods): its adapter is in place, load the encoder
        encoder = cls.load_encoder(path, run.lm, run.tokenizer)
        return cls(encoder=encoder, ratio=ratio, adapted_lm=run.lm)

    def score_continuation(self, run, context, target):
        with lora_switched(self._adapted(run), True):
            return super().score_continuation(run, context, target)

    def generate(self, run, prompts, targets, sampling, n_samples=1, batch_size=1, kv_prefill="full",
                 progress=False):
        with lora_switched(self._adapted(run), True):
            return super().generate(run, prompts, targets, sampling, n_samples, batch_size, kv_prefill, progress)

    def _adapted(self, run) -> torch.nn.Module:
        if self.adapted_lm is None or run.lm is not self.adapted_lm:
            raise UserError("method 'ktoken_lora' runs only the LM its folder's adapter was loaded into "
                            "(build it with make_method for this run)")
        return run.lm
