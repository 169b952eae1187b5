"""Wall time in the training logs, so held-out loss can be read against time spent, not only steps.

At every validation during ``fit``, :class:`WallTime` logs ``time/train_s`` (seconds of training so
far, validation excluded) and ``time/total_s`` (seconds since training started, validation
included) into the same log row as ``val/loss``. Both carry over a resume (they are saved in
checkpoints). The sanity-check validation before training is not timed.
"""

from __future__ import annotations

import time

import lightning as L


class WallTime(L.Callback):
    """Log ``time/train_s`` and ``time/total_s`` at every validation of a fit."""

    def __init__(self):
        self.train_s = 0.0  # training seconds of finished segments (between validations)
        self.total_s = 0.0  # seconds before this process's training started (a resumed run's earlier part)
        self._train_from: float | None = None  # start of the running training segment
        self._total_from: float | None = None  # start of this process's training

    def _now(self) -> tuple[float, float]:
        """(training seconds, total seconds) up to now."""
        now = time.perf_counter()
        train = self.train_s + (now - self._train_from if self._train_from is not None else 0.0)
        total = self.total_s + (now - self._total_from if self._total_from is not None else 0.0)
        return train, total

    def on_train_start(self, trainer, pl_module) -> None:
        self._train_from = self._total_from = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._train_from is not None:  # None: sanity check, or a validate-only run
            self.train_s, _ = self._now()
            self._train_from = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._total_from is None:
            return
        train, total = self._now()
        # rank 0's clock: every rank waits for the others at each step, so they agree to within a step
        pl_module.log_dict({"time/train_s": train, "time/total_s": total}, on_step=False, on_epoch=True,
                           rank_zero_only=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._total_from is not None and not trainer.sanity_checking:
            self._train_from = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_s, self.total_s = self._now()
        self._train_from = self._total_from = None

    def state_dict(self) -> dict[str, float]:
        train, total = self._now()
        return {"train_s": train, "total_s": total}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.train_s, self.total_s = float(state_dict["train_s"]), float(state_dict["total_s"])
