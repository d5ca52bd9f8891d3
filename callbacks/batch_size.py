"""Batch-size switching: large batch then small batch (Sagun et al. 2017), GD, chunked GD.

The batch size is a pure function of where training is: ``size(epoch)`` for an epoch schedule,
``size(step)`` for a step schedule (step = optimizer steps done, Lightning's ``global_step``).
The callback installs that function with the DataModule's ``schedule_batches``; the resident
loader reads it when it plans an epoch, so

* an epoch switch lands exactly on the first batch of that epoch, and a step switch exactly on
  that optimizer step, even in the middle of an epoch: the loader cuts the rest of the epoch's
  permutation at the new size, and its length (Lightning's ``num_training_batches``) is known
  when the epoch starts (the data fetcher prefetches one batch ahead, so flipping
  ``datamodule.batch_size`` in a batch hook would land one step late);
* a run resumed from any checkpoint, before or after the switch, recomputes the same sizes
  from the restored epoch and step: a run killed after the switch resumes with the small batch.

What is stateful is the learning-rate rule and the optimizer reset, which must happen once:
they fire at the first step trained with a new size (``on_train_step``, before its update) and
the size trained with last (``current``) and the list of switches are kept in the checkpoint,
so a resumed run neither repeats them nor skips them. The learning rate itself is in the
optimizer state, which Lightning restores.

Chunked full-batch GD: with ``chunk_size`` a global batch larger than ``chunk_size`` points is
trained as chunks whose gradients accumulate into one optimizer step (``TrainStep.chunks``),
so ``batch_size: full`` gives the exact full-batch gradient however large P is.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from overparam.data import FULL_BATCH, BatchSize, resolve_batch_size
from overparam.errors import ConfigError, check_choice

if TYPE_CHECKING:
    from overparam.task import StepRecord

LR_RULES = ("none", "linear", "sqrt")
Schedule = dict[int, Union[int, str]]


def _check_schedule(option: str, schedule: Optional[Schedule]) -> dict[int, BatchSize]:
    out: dict[int, BatchSize] = {}
    for key, size in (schedule or {}).items():
        try:
            at = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"BatchSizeSwitch.{option} keys must be non-negative integers, got {key!r}") from None
        if at < 0:
            raise ConfigError(f"BatchSizeSwitch.{option} keys must be non-negative integers, got {key!r}")
        if size != FULL_BATCH:
            if isinstance(size, str) and size.isdigit():
                size = int(size)
            resolve_batch_size(size, 1, option=f"BatchSizeSwitch.{option}[{at}]")
        out[at] = size
    return dict(sorted(out.items()))


class BatchSizeSwitch(pl.Callback):
    """Change the global training batch size at given epochs or steps.

    Args:
        schedule: ``{epoch: batch_size}``; from each epoch on (0-based) the given global batch
            size, an int or ``"full"`` (the whole training set: gradient descent). Before the
            first key the DataModule's own ``batch_size`` is used.
        step_schedule: ``{step: batch_size}`` instead, ``step`` counting optimizer steps done
            (0-based: ``{100: 64}`` makes the 101st update the first with 64 points). Use one
            of the two schedules, not both.
        lr_rule: what the learning rate does at a switch from size b to b': ``none``,
            ``linear`` (lr * b'/b, Goyal et al. 2017) or ``sqrt`` (lr * sqrt(b'/b), Krizhevsky
            2014; Hoffer et al. 2017). Default ``none``: the LB -> SB protocol of Sagun et al.
            2017 keeps the learning rate.
        reset_optimizer: clear the optimizer state (momentum buffers) at a switch.
        chunk_size: optional global chunk size: larger global batches are computed in chunks
            of at most this many points that accumulate into one optimizer step (exact
            full-batch gradient in bounded memory).
        log: log ``batch_size`` (the global size trained with) at the end of each epoch.

    Raises:
        ConfigError: a bad key or size, both schedules given, an unknown ``lr_rule`` or a bad
            ``chunk_size``.

    Example::

        Trainer(callbacks=[BatchSizeSwitch(schedule={0: 4096, 30: 64}, lr_rule="none")])

    YAML::

        trainer:
          callbacks:
            - class_path: BatchSizeSwitch
              init_args: {schedule: {0: 4096, 30: 64}}
    """

    def __init__(
        self,
        schedule: Optional[Schedule] = None,
        step_schedule: Optional[Schedule] = None,
        lr_rule: str = "none",
        reset_optimizer: bool = False,
        chunk_size: Optional[int] = None,
        log: bool = True,
    ) -> None:
        self.schedule = _check_schedule("schedule", schedule)
        self.step_schedule = _check_schedule("step_schedule", step_schedule)
        if self.schedule and self.step_schedule:
            raise ConfigError("BatchSizeSwitch: give schedule (epochs) or step_schedule (steps), not both")
        check_choice("BatchSizeSwitch.lr_rule", lr_rule, LR_RULES)
        if chunk_size is not None:
            if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
                raise ConfigError(f"BatchSizeSwitch.chunk_size must be a positive integer or null, got {chunk_size!r}")
        self.lr_rule = lr_rule
        self.reset_optimizer = reset_optimizer
        self.chunk_size = chunk_size
        self.log = log
        # Checkpointed: the global size trained with last, and every switch made.
        self.current: Optional[int] = None
        self.switches: list[dict[str, Any]] = []
        self._default: BatchSize = FULL_BATCH
        self._num_train = 1

    # --- the schedule: a pure function of (epoch, step) ----------------------------------------
    def size_at(self, epoch: int, step: int) -> int:
        """The global batch size of a batch trained at (0-based) ``epoch`` and ``step``."""
        keyed, at = (self.step_schedule, step) if self.step_schedule else (self.schedule, epoch)
        size = self._default
        for key, value in keyed.items():
            if key <= at:
                size = value
        return resolve_batch_size(size, self._num_train)

    # --- hooks ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Install the schedule in the DataModule before the first loader is built."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "schedule_batches"):
            raise ConfigError("BatchSizeSwitch needs an overparam DataModule (a subclass of OverparamDataModule)")
        self._default = datamodule.batch_size
        self._num_train = datamodule.split("train")[0].shape[0]
        # The epoch's first global step is read when the loader plans the epoch (after a resume
        # Lightning has restored global_step and current_epoch by then).
        datamodule.schedule_batches(lambda i: self.size_at(trainer.current_epoch, trainer.global_step + i), self.chunk_size)
        if trainer.reload_dataloaders_every_n_epochs != 1:
            rank_zero_info("BatchSizeSwitch: setting reload_dataloaders_every_n_epochs = 1 so each epoch is re-planned")
            trainer.reload_dataloaders_every_n_epochs = 1

    def on_train_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: "StepRecord") -> None:
        """At the first step of a new size, before its update: learning-rate rule and optimizer reset, once."""
        size = self.size_at(record.epoch, record.index)
        if self.current is None:
            self.current = size  # the configured learning rate belongs to the first size
        elif size != self.current:
            self._switch(trainer, self.current, size)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the global batch size trained with (the last one, for a mid-epoch switch)."""
        if self.log and self.current is not None:
            pl_module.log("batch_size", float(self.current), on_step=False, on_epoch=True, sync_dist=False)

    def _switch(self, trainer: pl.Trainer, old: int, new: int) -> None:
        factor = {"none": 1.0, "linear": new / old, "sqrt": math.sqrt(new / old)}[self.lr_rule]
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= factor
            if self.reset_optimizer:
                optimizer.state.clear()
        self.switches.append(
            {"epoch": trainer.current_epoch, "step": trainer.global_step, "from": old, "to": new, "lr_factor": factor}
        )
        self.current = new
        rank_zero_info(
            f"BatchSizeSwitch: global batch size {old} -> {new} at epoch {trainer.current_epoch}, "
            f"step {trainer.global_step} (lr x {factor:.4g}{', optimizer state reset' if self.reset_optimizer else ''})"
        )

    # --- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "switches": list(self.switches)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current = state_dict.get("current")
        self.switches = list(state_dict.get("switches", []))
