"""LastCheckpoint: ``last.ckpt`` at epoch ends, throttled in time, and always at the end of training.

Lightning's ``ModelCheckpoint(save_last=True)`` writes at every epoch end. A full-batch run of
a small network finishes an epoch in milliseconds, and a checkpoint costs several (6 ms for a
300-parameter net on a CPU, measured): written every epoch it is a large part of the run.
Checkpoints stay at epoch ends, where a resumed run continues exactly (the loader re-plans the
epoch from the restored epoch and step), but at most one every ``every_n_seconds``, plus one
after the last epoch (``max_epochs``, ``max_steps`` or a callback's stop). A run killed between
two saves resumes from the earlier one and recomputes at most ``every_n_seconds`` of training.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from overparam.errors import check_positive


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(save_last=True)`` that saves at most once every ``every_n_seconds``.

    Args:
        every_n_seconds: the shortest time between two saves at epoch ends (default 30; 0 saves
            at every epoch end, like ``ModelCheckpoint``). The end of training always saves.
        **kwargs: ``ModelCheckpoint`` arguments (``save_last`` is always on).

    Example::

        Trainer(callbacks=[LastCheckpoint(every_n_seconds=60)])
    """

    def __init__(self, every_n_seconds: float = 30.0, **kwargs: Any) -> None:
        check_positive("LastCheckpoint.every_n_seconds", every_n_seconds, allow_zero=True)
        kwargs["save_last"] = True
        super().__init__(**kwargs)
        self.every_n_seconds = every_n_seconds
        self._saved_at = time.monotonic()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._saved_at = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save when ``every_n_seconds`` have passed since the last save, or training ends now."""
        if time.monotonic() - self._saved_at >= self.every_n_seconds or _last_epoch(trainer):
            super().on_train_epoch_end(trainer, pl_module)
            self._saved_at = time.monotonic()


def _last_epoch(trainer: pl.Trainer) -> bool:
    """Whether training ends after this epoch (checkpoint callbacks run after every other hook)."""
    if trainer.should_stop:
        return True
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    return max_steps is not None and 0 <= max_steps <= trainer.global_step
