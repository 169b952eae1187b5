"""The one way to load a run: the frozen LM, and the merger + rules a ``umim fit`` run exported.

:class:`ModelArgs` is the argument group every entry point shares (``umim generate``, every
``umim-eval`` runner's ``Config``, the lm-eval model's ``model_args``); :func:`load_merging` loads
the merger and rules for an LM that is already loaded (the lm-eval model lets lm-eval load it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from umim.errors import UserError, one_line
from umim.lm import LMSpec


@dataclass
class ModelArgs:
    """Which LM, on which device, with which merger and rules."""

    lm: str = "embedded"
    """Target LM: hub id, local folder, or "embedded" (the offline SmolLM2-135M)."""
    gguf_file: str | None = None
    """GGUF file inside ``lm`` (quantized checkpoints)."""
    dtype: str = "float32"
    """LM weights dtype: float32, bfloat16 or float16."""
    device: str | None = None
    """Torch device of the LM and merger; default CUDA when available, else CPU."""
    run_dir: str | None = None
    """A ``umim fit`` output folder holding ``merger/`` and ``rules/``."""
    merger: str | None = None
    """Merger folder or hub id (overrides ``run_dir/merger``)."""
    rules: str | None = None
    """Rules folder or hub id (overrides ``run_dir/rules``)."""

    def spec(self) -> LMSpec:
        return LMSpec(self.lm, self.gguf_file, self.dtype)

    def merging_paths(self) -> tuple[str | None, str | None]:
        """(merger, rules) as given, or ``run_dir/merger`` and ``run_dir/rules`` (``run_dir`` may be a
        hub repo id, fetched into the hub cache)."""
        run = None
        if self.run_dir and not (self.merger and self.rules):  # a local folder, or a hub repo (umim.hub)
            from umim.hub import is_local, resolve_run

            run = Path(self.run_dir) if is_local(self.run_dir) else resolve_run(self.run_dir)
        return (self.merger or (str(run / "merger") if run else None),
                self.rules or (str(run / "rules") if run else None))

    def has_merging(self) -> bool:
        return all(self.merging_paths())

    def check_merging(self, what: str) -> None:
        """Before loading: refuse when no merger or no rules are named."""
        if not self.has_merging():
            raise merging_missing(what)

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def load(self, merging: bool = True):
        """The :class:`~umim.inference.generation.MergedLM` of these arguments (``merging=False``:
        the LM alone, whatever merger and rules are named)."""
        from umim.inference.generation import MergedLM
        from umim.lm import load_lm, load_tokenizer

        merger, rules = self.merging_paths() if merging else (None, None)  # a hub run is fetched first
        spec, device = self.spec(), self.torch_device()
        model, tok = load_lm(spec), load_tokenizer(spec)
        model.to(device)
        return MergedLM(model, tok, *load_merging(model, tok, merger, rules))


def merging_missing(what: str) -> UserError:
    """The one message for "this needs UMIM's merger and rules"."""
    return UserError(f"{what} needs a merger and rules (run_dir, or merger + rules)")


def resolve_device(device: str | None) -> torch.device:
    """``device`` as a torch device (None: CUDA when available, else CPU); a bad name is a user error."""
    from umim.inference.generation import GenerationError

    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise GenerationError(f"device {device!r}: {one_line(e)}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError(f"device {str(dev)!r}: no CUDA device here (use cpu)")
    return dev


def load_merging(lm, tokenizer, merger: str | Path | None, rules: str | Path | None):
    """(merger, rules) loaded for ``lm`` and ``tokenizer`` (each None when not given); both are
    checked against the tokenizer's fingerprint and the merger against the LM's hidden size."""
    from umim.fingerprint import tokenizer_fingerprint
    from umim.merging.merger import MergeModule
    from umim.rules.store import MergeRules

    loaded_rules = MergeRules.load(rules, tokenizer=tokenizer) if rules else None
    loaded_merger = (MergeModule.from_pretrained(merger, hidden_size=lm.get_input_embeddings().embedding_dim,
                                                 tokenizer_fp=tokenizer_fingerprint(tokenizer)) if merger else None)
    return loaded_merger, loaded_rules
