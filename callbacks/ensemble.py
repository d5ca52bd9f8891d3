"""Ensemble averaging: the error of f_bar = mean_k f_k and the output fluctuations around it.

For K members with outputs ``f_k(x)`` (before the sign/argmax) on P' test points:

* ensemble error: the 0/1 error of ``f_bar(x) = 1/K sum_k f_k(x)``;
* mean member error: ``1/K sum_k err(f_k)``;
* output fluctuation: ``1/K sum_k 1/P' sum_x |f_k(x) - f_bar(x)|^2`` (the empirical variance
  of the outputs over members, with 1/K; summed over the C outputs).

Past the jamming point N* the test error of one net decreases with N because these
fluctuations shrink as ``|f_N - <f_N>| ~ N^{-1/4}`` and averaging K nets removes them
(Geiger, Jacot, Spigler, Gabriel, Sagun, d'Ascoli, Biroli, Hongler, Wyart 2020, "Scaling
description of generalization with number of parameters in deep learning", J. Stat. Mech.
023401, Sec. 3 and Fig. 3).

``overparam.metrics.EnsembleStatistics`` is the metric (sums reduced across ranks before
dividing); ``EnsembleEvaluation`` applies it to a task's K vmapped members at validation/test,
and ``overparam ensemble`` applies it to separately trained runs.

What the Task already logs for K > 1 (``overparam/task.py``) and this callback does not repeat:
``{split}/ensemble_error`` (the error of f_bar), ``{split}/error`` (the mean member error) and
``{split}/{loss,error}/member_k``. The callback adds ``{split}/ensemble_fluctuation``,
``{split}/ensemble_fluctuation/member_k`` and ``{split}/ensemble_loss`` (the task's loss of
f_bar), and saves the per-member numbers of each test run to ``<log_dir>/ensemble/test.npz``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from overparam.callbacks.base import AnalysisCallback
from overparam.errors import ConfigError
from overparam.metrics import EnsembleStatistics, member_name

SPLITS = ("val", "test")


def ensemble_metrics(outputs: Tensor, y: Tensor, loss_fn: Optional[Callable[..., Tensor]] = None) -> dict[str, Any]:
    """All ensemble statistics of ``(K, B, C)`` outputs on one set of points (one process)."""
    stats = EnsembleStatistics(outputs.shape[0], loss_fn)
    stats.update(outputs, y)
    return stats.compute()


class EnsembleEvaluation(AnalysisCallback):
    """Log the output fluctuation and the loss of the ensemble average at validation and test.

    Works on a task with ``ensemble_size`` K > 1 (members trained together by vmap); the
    Task itself logs the ensemble's error and the members' (see the module docstring). For
    separately trained runs use ``overparam ensemble --ckpts ...``.

    Args:
        splits: evaluation loops to follow, from ``val`` and ``test``. Default: both.
        every_n_epochs, at_epochs, at_fit_end: also evaluate the test split on this schedule
            during training (useful without a validation split), logged as ``ensemble/test_*``
            at the current step. Default: never.
        name: folder and metric prefix of the scheduled evaluations. Default: ``ensemble``.

    Example::

        Trainer(callbacks=[EnsembleEvaluation()])   # model: {ensemble_size: 8}

    In a config::

        trainer:
          callbacks:
            - class_path: EnsembleEvaluation
    """

    default_name = "ensemble"

    def __init__(
        self,
        splits: tuple[str, ...] = SPLITS,
        every_n_epochs: Optional[int] = None,
        at_epochs: tuple[int, ...] = (),
        at_fit_end: bool = False,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(False, at_fit_end, every_n_epochs, at_epochs, name)
        bad = [s for s in splits if s not in SPLITS]
        if bad:
            raise ConfigError(f"EnsembleEvaluation.splits must be taken from {', '.join(SPLITS)}; got {list(splits)}")
        self.splits = tuple(splits)
        self._sums: dict[str, EnsembleStatistics] = {}
        self._warned = False

    def _active(self, pl_module: pl.LightningModule) -> bool:
        if getattr(pl_module, "ensemble_size", 1) > 1:
            return True
        if not self._warned:
            rank_zero_info(
                "EnsembleEvaluation does nothing for model.ensemble_size 1; set it above 1, or average "
                "separate runs with `overparam ensemble --ckpts ...`. To silence this, remove the callback."
            )
            self._warned = True
        return False

    def on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """A schedule needs an overparam DataModule (its test split); the loop hooks need nothing."""
        scheduled = self.every_n_epochs is not None or self.at_epochs or self.at_fit_end
        if stage == "fit" and scheduled and not hasattr(trainer.datamodule, "analysis_batches"):
            raise ConfigError("EnsembleEvaluation with every_n_epochs/at_epochs/at_fit_end needs an overparam DataModule (data: ...)")

    # --- evaluation loops ------------------------------------------------------------------
    def _start(self, split: str, pl_module: pl.LightningModule) -> None:
        if split in self.splits and self._active(pl_module):
            self._sums[split] = EnsembleStatistics(pl_module.ensemble_size, pl_module.loss_fn).to(pl_module.device)

    def _batch(self, split: str, pl_module: pl.LightningModule, batch: Any) -> None:
        if split in self._sums:
            with torch.no_grad():
                self._sums[split].update(pl_module.member_outputs(batch[0]), batch[1])  # (K, B, C)

    def _end(self, split: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sums = self._sums.pop(split, None)
        if sums is None:
            return
        result = sums.compute()  # one all-reduce: every rank holds the global sums
        values = {f"{split}/ensemble_fluctuation": result["fluctuation"], f"{split}/ensemble_loss": result["ensemble_loss"]}
        for k, v in enumerate(result["member_fluctuation"].tolist()):
            values[member_name(f"{split}/ensemble_fluctuation", k)] = v
        pl_module.log_dict({n: torch.tensor(v, dtype=torch.float32) for n, v in values.items()}, sync_dist=False)
        if split == "test":
            self.save_npz(trainer, "test.npz", **{k: v for k, v in result.items()})

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the sums of a validation pass (sanity checks included)."""
        self._start("val", pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Add one validation batch (this rank's slice)."""
        self._batch("val", pl_module, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reduce across ranks and log ``val/ensemble_*``."""
        self._end("val", trainer, pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the sums of a test pass."""
        self._start("test", pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Add one test batch (this rank's slice)."""
        self._batch("test", pl_module, batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reduce across ranks, log ``test/ensemble_*`` and save ``ensemble/test.npz``."""
        self._end("test", trainer, pl_module)

    # --- scheduled evaluation during training ---------------------------------------------
    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        """Evaluate the test split (each rank its shard) and log ``ensemble/test_*``."""
        if not self._active(pl_module):
            return
        sums = EnsembleStatistics(pl_module.ensemble_size, pl_module.loss_fn).to(pl_module.device)
        with torch.no_grad():
            for x, y in trainer.datamodule.analysis_batches("test"):
                sums.update(pl_module.member_outputs(x), y)
        result = sums.compute()
        metrics = {f"test_{k}": v for k, v in result.items() if isinstance(v, float)}
        self.log_metrics(trainer, pl_module, metrics)
        self.history.append({"tag": tag, "step": trainer.global_step, **metrics})
