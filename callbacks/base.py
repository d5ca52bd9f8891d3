"""What every analysis callback shares: when to run, a clean context, where outputs go.

Subclasses implement ``analyse(trainer, pl_module, tag)`` and get:

* one schedule (``at_fit_start``, ``at_fit_end``, ``every_n_epochs``, ``at_epochs``) behind
  one overridable method, ``should_run`` (Lightning's ``WeightAveraging.should_update``);
* ``analysis_context``: grad enabled, inference mode off, eval mode, RNG state, ``.grad``
  and train/eval flags restored afterwards, so training is left untouched;
* ``output_dir``: ``<log_dir>/<name>/``, created on rank 0 only; ``log_metrics``,
  ``log_image`` and ``log_histogram`` that send to every logger (W&B media when it is one);
* ``history`` kept in ``state_dict`` so a resumed run continues it, and ``done_epochs`` so
  an analysis is not repeated after a restart.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from overparam.errors import ConfigError, check_positive

FIT_START = "start"
FIT_END = "end"


class AnalysisCallback(pl.Callback):
    """Base of overparam's analysis callbacks.

    Args:
        at_fit_start: run before the first training step (the initial network).
        at_fit_end: run after the last epoch (the trained network).
        every_n_epochs: also run at the end of every n-th epoch (None: never).
        at_epochs: also run at the end of these epochs (0-based).
        name: folder and metric prefix (defaults to the class's ``default_name``).
    """

    default_name = "analysis"

    def __init__(
        self,
        at_fit_start: bool = False,
        at_fit_end: bool = True,
        every_n_epochs: Optional[int] = None,
        at_epochs: Sequence[int] = (),
        name: Optional[str] = None,
    ) -> None:
        if every_n_epochs is not None:
            check_positive(f"{type(self).__name__}.every_n_epochs", every_n_epochs)
        if any(e < 0 for e in at_epochs):
            raise ConfigError(f"{type(self).__name__}.at_epochs must be non-negative epochs, got {list(at_epochs)}")
        self.at_fit_start = at_fit_start
        self.at_fit_end = at_fit_end
        self.every_n_epochs = every_n_epochs
        self.at_epochs = sorted(set(at_epochs))
        self.name = name or self.default_name
        self.history: list[dict[str, Any]] = []
        self.done: list[str] = []

    # --- when --------------------------------------------------------------------------------
    def should_run(self, epoch: int) -> bool:
        """Whether to run at the end of (0-based) ``epoch``."""
        if epoch in self.at_epochs:
            return True
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the first step: analyse the initial network if asked (not again on resume)."""
        if self.at_fit_start and trainer.global_step == 0:
            self._run(trainer, pl_module, FIT_START)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After each epoch: analyse if the schedule says so."""
        # current_epoch is still the epoch that just ended here (it increments afterwards).
        if self.should_run(trainer.current_epoch):
            self._run(trainer, pl_module, f"epoch={trainer.current_epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the last epoch: analyse the trained network if asked."""
        if self.at_fit_end and not trainer.interrupted:
            self._run(trainer, pl_module, FIT_END)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """On every rank, before anything runs: resolve the run folder once.

        ``trainer.log_dir`` is a broadcast under DDP; resolved here, where every rank is, the
        rank-zero-only helpers (``save_npz``, plots) never call a collective alone. Subclasses
        that override ``setup`` call ``super().setup(...)`` first.
        """
        self._log_dir = trainer.log_dir or trainer.default_root_dir

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        if tag in self.done:
            return
        with analysis_context(pl_module):
            self.analyse(trainer, pl_module, tag)
        self.done.append(tag)

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        """Compute, log and save one analysis of the current network (``tag`` names it)."""
        raise NotImplementedError

    # --- where ---------------------------------------------------------------------------------
    def output_dir(self, trainer: pl.Trainer) -> str:
        """``<log_dir>/<name>/`` (``default_root_dir/<name>`` without a logger); created on rank 0.

        Safe on rank 0 alone: the log dir is resolved in ``setup`` on all ranks.
        """
        base = getattr(self, "_log_dir", None)
        if base is None:  # used outside a Trainer's setup: resolve now (all ranks must be here)
            base = self._log_dir = trainer.log_dir or trainer.default_root_dir
        path = os.path.join(base, self.name)
        if trainer.is_global_zero:
            os.makedirs(path, exist_ok=True)
        return path

    @rank_zero_only
    def save_npz(self, trainer: pl.Trainer, filename: str, **arrays: Any) -> str:
        path = os.path.join(self.output_dir(trainer), filename)
        np.savez(path, **{k: _to_numpy(v) for k, v in arrays.items()})
        return path

    def log_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]) -> None:
        """Scalars to every logger (at the current step) and to ``trainer.callback_metrics``."""
        values = {f"{self.name}/{k}": float(v) for k, v in metrics.items()}
        for key, value in values.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)

    @rank_zero_only
    def log_image(self, trainer: pl.Trainer, key: str, path: str) -> None:
        """A saved PNG to W&B (other loggers keep the file in the run folder)."""
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"{self.name}/{key}", images=[path], step=trainer.global_step)

    @rank_zero_only
    def log_histogram(self, trainer: pl.Trainer, key: str, values: Any = None, counts_edges: Any = None) -> None:
        """Raw values, or an already binned ``(counts, edges)``, as a W&B histogram when W&B is a logger."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                if counts_edges is not None:
                    counts, edges = counts_edges
                    histogram = wandb.Histogram(np_histogram=(_to_numpy(counts), _to_numpy(edges)))
                else:
                    histogram = wandb.Histogram(_to_numpy(values))
                logger.log_metrics({f"{self.name}/{key}": histogram}, step=trainer.global_step)

    # --- resume ------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """Checkpoint key: the class plus ``name``, so two instances of one class can share a Trainer."""
        return self._generate_state_key(name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.done = list(state_dict.get("done", []))


@contextlib.contextmanager
def analysis_context(module: torch.nn.Module) -> Iterator[None]:
    """Grad on, inference mode off, eval mode; restore modes, RNG state and ``.grad`` after."""
    modes = {m: m.training for m in module.modules()}
    grads = {p: p.grad for p in module.parameters()}
    devices = [p.device for p in module.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
        module.eval()
        try:
            yield
        finally:
            for m, training in modes.items():
                m.train(training)
            for p, g in grads.items():
                p.grad = g


def _to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
