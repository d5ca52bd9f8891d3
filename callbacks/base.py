"""What every analysis callback shares: when to run, a clean context, where outputs go.

Subclasses implement ``analyse(trainer, pl_module, tag)`` and get:

* one schedule, owned here: ``at_fit_start``, ``at_fit_end``, ``every_n_epochs``,
  ``at_epochs`` (``should_run(epoch)``) and ``every_n_steps`` (``StepSchedule``); a step
  analysis at step t sees theta_t, the network after t optimizer updates, and runs once per t
  (Lightning's ``WeightAveraging.should_update`` and its ``latest_update_step`` guard);
* ``analysis_context``: grad enabled, inference mode off, eval mode, RNG state, ``.grad``
  and train/eval flags restored afterwards, so training is left untouched;
* ``output_dir``: ``<log_dir>/<name>/``, resolved in ``setup`` on every rank (subclasses
  cannot override ``setup``; they implement ``on_setup``), created on rank 0 only;
  ``log_metrics``, ``log_image`` and ``log_histogram`` that send to every logger (W&B media
  when it is one);
* ``history`` kept in ``state_dict`` so a resumed run continues it, and ``done`` so an
  analysis is not repeated after a restart.

Steps: the Task trains blocks of optimizer steps inside one ``training_step`` and calls
``on_train_step(trainer, pl_module, record)`` of every callback that has one, once per step,
before the step's update (``overparam.task.StepRecord``: the step index t, its data, its
forward outputs). Lightning's own per-batch hooks (``on_train_batch_start/end``) fire once
per block, so step-scheduled work belongs in ``on_train_step``.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from overparam.errors import ConfigError, check_positive

if TYPE_CHECKING:
    from overparam.task import StepRecord

FIT_START = "start"
FIT_END = "end"


class StepSchedule:
    """Every n-th optimizer step: t = 0, n, 2n, ... (t = updates done), each step at most once.

    ``due(t)`` is true when t is on the schedule and later than the last step marked, so a
    resumed run or a second hook at the same step never repeats an analysis. ``last`` goes
    into the callback's ``state_dict``.

    Args:
        every_n_steps: the period n (None: never).
        option: the option's name for error messages.
    """

    def __init__(self, every_n_steps: Optional[int], option: str = "every_n_steps") -> None:
        if every_n_steps is not None:
            check_positive(option, every_n_steps)
        self.every_n_steps = every_n_steps
        self.last = -1

    def due(self, step: int) -> bool:
        return self.every_n_steps is not None and step % self.every_n_steps == 0 and step > self.last

    def mark(self, step: int) -> None:
        self.last = max(self.last, step)


class AnalysisCallback(pl.Callback):
    """Base of overparam's analysis callbacks.

    Args:
        at_fit_start: run before the first training step (the initial network).
        at_fit_end: run after the last epoch (the trained network).
        every_n_epochs: also run at the end of every n-th epoch (None: never).
        at_epochs: also run at the end of these epochs (0-based).
        name: folder and metric prefix (defaults to the class's ``default_name``).
        every_n_steps: also run on the network after every n-th optimizer step, t = 0, n,
            2n, ... updates (None: never); ``analyse_step`` does the work (by default
            ``analyse`` with the tag ``step=t``). The network after the last update is
            analysed at fit end when its step is on the schedule.
    """

    default_name = "analysis"

    def __init__(
        self,
        at_fit_start: bool = False,
        at_fit_end: bool = True,
        every_n_epochs: Optional[int] = None,
        at_epochs: Sequence[int] = (),
        name: Optional[str] = None,
        every_n_steps: Optional[int] = None,
    ) -> None:
        if every_n_epochs is not None:
            check_positive(f"{type(self).__name__}.every_n_epochs", every_n_epochs)
        if any(e < 0 for e in at_epochs):
            raise ConfigError(f"{type(self).__name__}.at_epochs must be non-negative epochs, got {list(at_epochs)}")
        self.at_fit_start = at_fit_start
        self.at_fit_end = at_fit_end
        self.every_n_epochs = every_n_epochs
        self.at_epochs = sorted(set(at_epochs))
        self.steps = StepSchedule(every_n_steps, f"{type(self).__name__}.every_n_steps")
        self.name = name or self.default_name
        self.history: list[dict[str, Any]] = []
        self.done: list[str] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "setup" in vars(cls):
            raise TypeError(
                f"{cls.__name__} overrides setup(); implement on_setup() instead: AnalysisCallback.setup "
                "resolves the run folder on every rank (a collective under DDP) before calling it"
            )

    @property
    def every_n_steps(self) -> Optional[int]:
        return self.steps.every_n_steps

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

    def on_train_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: "StepRecord") -> None:
        """Before the update of step t (called by the Task): the step analysis of theta_t if due."""
        if self.steps.due(record.index):
            self._run_step(trainer, pl_module, record.index, record)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After each epoch: analyse if the schedule says so."""
        # current_epoch is still the epoch that just ended here (it increments afterwards).
        if self.should_run(trainer.current_epoch):
            self._run(trainer, pl_module, f"epoch={trainer.current_epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the last epoch: the step analysis of the final network if due, then the fit-end one."""
        if trainer.interrupted:
            return
        if self.steps.due(trainer.global_step):
            self._run_step(trainer, pl_module, trainer.global_step, None)
        if self.at_fit_end:
            self._run(trainer, pl_module, FIT_END)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """On every rank, before anything runs: resolve the run folder, then ``on_setup``.

        ``trainer.log_dir`` is a broadcast under DDP; resolved here, where every rank is, the
        rank-zero-only helpers (``save_npz``, plots) never call a collective alone.
        """
        self._log_dir = trainer.log_dir or trainer.default_root_dir
        self.on_setup(trainer, pl_module, stage)

    def on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks that need the trainer or the model (subclasses override)."""

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        if tag in self.done:
            return
        with analysis_context(pl_module):
            self.analyse(trainer, pl_module, tag)
        self.done.append(tag)

    def _run_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, record: Optional["StepRecord"]
    ) -> None:
        self.analyse_step(trainer, pl_module, step, record)
        self.steps.mark(step)

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        """Compute, log and save one analysis of the current network (``tag`` names it)."""
        raise NotImplementedError

    def analyse_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, record: Optional["StepRecord"]
    ) -> None:
        """The analysis of theta_step (``record``: the step's data and outputs; None at fit end).

        Runs inside the training step: an override that evaluates the network enters
        ``analysis_context`` itself (one that only reads ``record`` need not pay for it).
        """
        with analysis_context(pl_module):
            self.analyse(trainer, pl_module, f"step={step}")

    # --- where ---------------------------------------------------------------------------------
    def output_dir(self, trainer: pl.Trainer) -> str:
        """``<log_dir>/<name>/`` (``default_root_dir/<name>`` without a logger); created on rank 0.

        The log dir was resolved in ``setup`` on every rank, so this is safe on rank 0 alone.
        """
        base = getattr(self, "_log_dir", None)
        if base is None:
            raise RuntimeError(f"{type(self).__name__}.output_dir used before the Trainer's setup")
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
        """Checkpoint key: the class plus ``name``, so two instances of one class can share a Trainer.

        Cached: the Trainer reads it at every hook call (profiler labels), several times a step.
        """
        if getattr(self, "_state_key", (None,))[0] != self.name:
            self._state_key = (self.name, self._generate_state_key(name=self.name))
        return self._state_key[1]

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "done": self.done, "last_step": self.steps.last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.done = list(state_dict.get("done", []))
        self.steps.last = int(state_dict.get("last_step", -1))


@contextlib.contextmanager
def analysis_context(module: torch.nn.Module) -> Iterator[None]:
    """Grad on, inference mode off, eval mode; restore modes, RNG state and ``.grad`` after."""
    # Lists, not dicts: hashing modules (torchmetrics' Metric hashes its states) costs more than the rest.
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.grad) for p in module.parameters()]
    devices = [p.device for p in module.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
        module.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training
            for p, g in grads:
                p.grad = g


#: Splits an analysis callback may evaluate (``train`` is the DataModule's ``analysis_batches``).
SPLITS = ("train", "val", "test")


def check_splits_and_size(option: str, splits: Sequence[str], size: Optional[int]) -> None:
    """One-line ConfigErrors for a callback's ``splits`` (a non-empty list of ``SPLITS``) and ``size``."""
    unknown = [s for s in splits if s not in SPLITS]
    if not splits or unknown:
        raise ConfigError(f"{option}.splits must be a non-empty list of {', '.join(SPLITS)}; got {list(splits)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"{option}.size must be a positive integer or null, got {size!r}")


def split_batches(trainer: pl.Trainer, splits: Sequence[str], size: Optional[int], option: str) -> dict[str, list]:
    """This rank's fixed analysis batches of each split (``size`` training points; the other splits whole).

    Raises:
        ConfigError: a split the DataModule does not have.
    """
    datamodule = trainer.datamodule
    data = {}
    for split in splits:
        if split not in datamodule.splits:
            raise ConfigError(f"{option}.splits: the data has no {split!r} split; it has {', '.join(sorted(datamodule.splits))}")
        data[split] = datamodule.analysis_batches(split, size=size if split == "train" else None)
    return data


def _to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
