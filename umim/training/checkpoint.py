"""Checkpoints that make ``--ckpt_path last`` resume where the run stopped.

Lightning's ``ModelCheckpoint`` rewrites ``last.ckpt`` only when a top-k checkpoint is saved in the
same step, so with ``monitor: val/loss, save_top_k: 1`` a run that stopped after the loss last
improved resumed from an old step. :class:`ResumableCheckpoint` also rewrites it at every validation
and when the run is interrupted by SIGTERM or SIGINT (Ctrl+C). The data position is saved with it
(:class:`~umim.training.datamodule.ResumableLoader`).

Interruption: the signal handler only sets a flag; before each training batch the ranks agree
(one all-reduce of a flag) whether any of them was signalled, and then all save ``last.ckpt`` at
the same step and stop. Lightning's own SIGTERM handler is replaced while training because it
runs a collective inside the handler, which deadlocks when ranks are at different points.
"""

from __future__ import annotations

import signal
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (best by ``monitor``) whose ``last.ckpt`` follows every validation and every
    interruption; ``dirpath`` defaults to ``<trainer.default_root_dir>/checkpoints``."""

    def __init__(self, *args, save_last: bool = True, **kwargs):
        super().__init__(*args, save_last=save_last, **kwargs)
        self._handlers: dict | None = None
        self._stop_requested, self._trainer = False, None

    def _default_dirpath(self, trainer) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")

    def _find_last_checkpoints(self, trainer):
        self._default_dirpath(trainer)  # `--ckpt_path last` is resolved before setup()
        return super()._find_last_checkpoints(trainer)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    # -- interruption ------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.save_last:  # after Lightning has installed its handlers (which these replace)
            self._stop_requested, self._trainer = False, trainer
            self._handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            for s in self._handlers:
                signal.signal(s, self._request_stop)

    def _request_stop(self, signum, frame) -> None:
        if self._trainer.fit_loop.done:  # no batch follows (the end-of-fit report runs): stop now
            self._restore_handlers()
            raise KeyboardInterrupt if signum == signal.SIGINT else SIGTERMException()
        if self._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C stops at once
        self._stop_requested = True
        print(f"\n{signal.Signals(signum).name}: saving last.ckpt before the next batch "
              "(Ctrl+C again stops at once)", flush=True)

    def _restore_handlers(self) -> None:
        for s, handler in (self._handlers or {}).items():
            signal.signal(s, handler)
        self._handlers = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._handlers is None or batch_idx % trainer.accumulate_grad_batches:
            return  # stop only between optimizer steps: accumulated gradients are not checkpointed
        if trainer.strategy.reduce_boolean_decision(self._stop_requested, all=False):  # any rank signalled
            if self._last_global_step_saved != trainer.global_step:
                # Lightning adds 1 to the logger step on restore, assuming a save at validation end,
                # where the step counter has not yet moved past the batch; match that here
                loop = trainer.fit_loop.epoch_loop
                loop._batches_that_stepped -= 1
                try:
                    self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
                finally:
                    loop._batches_that_stepped += 1
            rank_zero_info(f"saved {self.last_model_path} at step {trainer.global_step}; resume with --ckpt_path last")
            self._restore_handlers()
            raise SIGTERMException()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)

    # -- last.ckpt at every validation -------------------------------------------------------------
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        skip = self._should_skip_saving_checkpoint(trainer) or not self._should_save_on_train_epoch_end(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        if not skip and self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        skip = self._should_skip_saving_checkpoint(trainer) or self._should_save_on_train_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)
        if not skip and self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
