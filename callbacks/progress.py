"""Training progress for a terminal or a log file: Lightning's bar, or plain lines.

``overparam fit`` chooses with ``--progress`` (``auto``: the bar when stderr is a terminal and
the config leaves ``trainer.enable_progress_bar`` on, lines otherwise; ``bar``, ``lines``,
``none``):

* ``ProgressLines`` writes one line per epoch with the key metrics, and within a long epoch
  one line every ``every_n_seconds`` with the step, the epoch's running loss and the speed.
  Epochs are blocks of optimizer steps (``overparam.data.TrainSteps``); a full-batch run with
  ``passes_per_epoch: 1000`` spends minutes in one epoch, and a tiny one finishes hundreds of
  epochs a second, so epoch lines closer than ``EPOCH_LINE_SECONDS`` are skipped (the first
  and the last epoch of a fit always get theirs)::

      epoch 1/20, step 32: train loss 0.5512 error 21.40% | val loss 0.4012 error 14.00% (0.3 s, 107 steps/s)
      epoch 7/20, step 150 (47%): train loss 0.1803 error 5.12% so far (2,310 steps/s)

* ``MetricsProgressBar`` is Lightning's TQDM bar with the same key metrics beside it (its count is
  blocks of steps, Lightning's batches).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

from overparam.errors import check_positive
from overparam.progress import format_seconds
from overparam.task import Task

#: What an epoch line shows, when logged (ensemble runs add the ensemble's error).
KEY_METRICS = ("train/loss", "train/error", "train/ensemble_error", "val/loss", "val/error", "val/ensemble_error")
#: Epoch lines closer together than this are skipped, so fast epochs cannot flood a log.
EPOCH_LINE_SECONDS = 1.0


def format_metrics(metrics: dict[str, float]) -> str:
    """``train loss 0.1234 error 5.12% | val ...``: grouped by the prefix, errors in percent."""
    groups: dict[str, list[str]] = {}
    for name, value in metrics.items():
        prefix, _, rest = name.partition("/")
        if not rest:
            prefix, rest = "", name
        text = f"{value:.2%}" if rest.endswith("error") else f"{value:.4g}"
        groups.setdefault(prefix, []).append(f"{rest} {text}")
    return " | ".join(f"{prefix} {' '.join(items)}".strip() for prefix, items in groups.items())


class ProgressLines(pl.Callback):
    """Plain progress lines on stderr (rank 0): one per epoch, and within long epochs.

    Args:
        every_n_seconds: within an epoch, a line (step, running loss, steps/s) when this long
            has passed since the last line (default 10).
        metrics: logged metrics to show on epoch lines besides ``KEY_METRICS`` (e.g.
            ``constraints/N_delta``).

    Example::

        Trainer(enable_progress_bar=False, callbacks=[ProgressLines(every_n_seconds=30)])

    In YAML (``--progress lines`` adds it with the defaults)::

        trainer:
          callbacks:
            - class_path: ProgressLines
              init_args: {every_n_seconds: 30}
    """

    def __init__(self, every_n_seconds: float = 10.0, metrics: Optional[list[str]] = None) -> None:
        check_positive("ProgressLines.every_n_seconds", every_n_seconds)
        self.every_n_seconds = every_n_seconds
        self.metrics = [*KEY_METRICS, *(metrics or [])]
        self._last_line = self._epoch_start = time.monotonic()
        self._epoch_first_step = 0
        self._ended: Optional[tuple[int, float, int]] = None  # (epoch, seconds, steps) awaiting its line
        self._validated_epoch: Optional[int] = None
        self._epoch_lines = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clocks."""
        self._last_line = time.monotonic()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the previous epoch's line (its metrics are logged by now), start this epoch's clock."""
        self._write_epoch_line(trainer, last=False)
        self._epoch_start, self._epoch_first_step = time.monotonic(), trainer.global_step

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember that this epoch validated, so its line shows val metrics (others would be stale)."""
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Within a long epoch: a line every ``every_n_seconds``."""
        now = time.monotonic()
        if now - self._last_line < self.every_n_seconds or not trainer.is_global_zero:
            return
        fraction = (batch_idx + 1) / trainer.num_training_batches if trainer.num_training_batches else 0.0
        steps = trainer.global_step - self._epoch_first_step
        running = pl_module.epoch_means("train") if isinstance(pl_module, Task) else None
        so_far = f": {format_metrics({f'train/{k}': v for k, v in running.items()})} so far" if running else ""
        rate = steps / max(now - self._epoch_start, 1e-9)
        self._write(f"{self._epoch_label(trainer)}, step {trainer.global_step:,} ({fraction:.0%}){so_far} ({rate:,.0f} steps/s)")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note the epoch's time and steps; its line waits for the metrics the Task logs after this hook."""
        # Callbacks run before the LightningModule's on_train_epoch_end, where the Task logs
        # the epoch's train/* (only checkpoint and early-stopping callbacks run after it).
        self._ended = (trainer.current_epoch, time.monotonic() - self._epoch_start, trainer.global_step - self._epoch_first_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last epoch's line, always."""
        self._write_epoch_line(trainer, last=True)

    def _write_epoch_line(self, trainer: pl.Trainer, last: bool) -> None:
        if self._ended is None or not trainer.is_global_zero:
            return
        epoch, seconds, steps = self._ended
        if not (last or not self._epoch_lines or time.monotonic() - self._last_line >= EPOCH_LINE_SECONDS):
            return
        self._ended = None
        logged = trainer.callback_metrics
        shown = {
            name: float(logged[name])
            for name in self.metrics
            if name in logged and (not name.startswith("val/") or self._validated_epoch == epoch)
        }
        metrics = f": {format_metrics(shown)}" if shown else ""
        speed = f", {steps / seconds:,.0f} steps/s" if seconds > 0 else ""
        self._write(f"{self._epoch_label(trainer, epoch)}, step {trainer.global_step:,}{metrics} ({format_seconds(seconds)}{speed})")
        self._epoch_lines += 1

    @staticmethod
    def _epoch_label(trainer: pl.Trainer, epoch: Optional[int] = None) -> str:
        epoch = trainer.current_epoch if epoch is None else epoch
        total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None
        return f"epoch {epoch + 1}/{total}" if total else f"epoch {epoch + 1}"

    def _write(self, line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self._last_line = time.monotonic()


class MetricsProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar with the latest key metrics (``KEY_METRICS``) beside it.

    Epoch metrics are logged when an epoch ends, so during epoch e the bar shows epoch e-1's.
    """

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        logged = trainer.callback_metrics
        items.update({name: f"{float(logged[name]):.4g}" for name in KEY_METRICS if name in logged})
        return items
