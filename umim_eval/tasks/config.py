"""The settings every runner shares: the run to load (:class:`umim.inference.loading.ModelArgs`) and
where the command writes its results."""

from __future__ import annotations

from dataclasses import dataclass

from umim.inference.loading import ModelArgs


@dataclass
class TaskConfig(ModelArgs):
    """A runner's settings: the model arguments plus ``out_dir``."""

    out_dir: str | None = None
    """Where the command writes ``NAME.json`` and ``NAME.md`` (default ``results/NAME``)."""

    def load_run(self, merged_lm=None, need_merging: str | None = None):
        """The loaded run (``merged_lm`` when given, as it is); ``need_merging`` names what needs the
        merger and rules, checked before any model is loaded."""
        if merged_lm is not None:
            return merged_lm
        if need_merging:
            self.check_merging(need_merging)
        return self.load()
