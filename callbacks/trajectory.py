"""``TrajectorySnapshots``: flat float32 snapshots of the parameters along training, in one .npz.

A run keeps ``checkpoints/last.ckpt`` only (``LastCheckpoint``), enough to resume and to evaluate
the final network, not to draw the path training took. Li et al. 2018 ("Visualizing the loss
landscape of neural nets", Sec. 7) project the trajectory ``theta_0 .. theta_n`` on the plane of
its first two principal directions around the final network (``overparam landscape --plane
pca``); they keep a full checkpoint every epoch. Full checkpoints hold the optimizer state and
the callbacks' too (twice the parameters with momentum), so this callback keeps only the
parameters: one ``(K, N)`` float32 row per snapshot, in memory on the CPU, written to
``<run>/trajectory/trajectory.npz`` (``overparam.runs.TRAJECTORY_FILE``) whenever a checkpoint is
saved and at the end of training. The file holds ``step`` (optimizer updates done: the snapshot
is theta_step), ``epoch`` (0-based, the epoch during which it was taken; the final network
counts to the last epoch trained), ``params`` ``(T, K, N)``, and the flat layout
``names``/``numels`` (``overparam.runs.read_trajectory`` reads it back). Memory and disk: ``4 N K`` bytes per
snapshot (1.8 MB for the 443,610 parameters of MNIST-FC).

(Not named ``...Checkpoint``: the CLI takes a callback whose class path says ``Checkpoint`` for
a configured checkpoint callback and would then leave out ``last.ckpt``.)

A resumed run reads the file back and drops the snapshots taken after its checkpoint (that
training is done again), so its trajectory is the one an uninterrupted run would have kept.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from overparam.callbacks.base import FIT_END, AnalysisCallback
from overparam.functional import flatten
from overparam.runs import TRAJECTORY_FILE, read_trajectory


class TrajectorySnapshots(AnalysisCallback):
    """Keep theta_t every ``every_n_epochs`` epochs or ``every_n_steps`` optimizer steps.

    Args:
        every_n_epochs: a snapshot at the end of every n-th epoch (default 1: Li et al.'s
            trajectories have one checkpoint per epoch); None: none at epoch ends.
        every_n_steps: a snapshot of theta_t at t = 0, n, 2n, ... optimizer updates (None,
            the default: none), for runs with few, long epochs (full-batch GD).
        at_fit_start: keep the initial network theta_0 (default True).
        at_fit_end: keep the final network (default True; skipped when the last epoch end
            already kept it).
        name: the folder under the run (default ``trajectory``).

    Raises:
        ConfigError: a non-positive period (at ``__init__``).

    Example::

        Trainer(callbacks=[TrajectorySnapshots(every_n_steps=50)])

    In YAML (or ``--trainer.callbacks+=TrajectorySnapshots``)::

        trainer:
          callbacks:
            - class_path: TrajectorySnapshots
              init_args: {every_n_epochs: 1}
    """

    default_name = "trajectory"

    def __init__(
        self,
        every_n_epochs: Optional[int] = 1,
        every_n_steps: Optional[int] = None,
        at_fit_start: bool = True,
        at_fit_end: bool = True,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(at_fit_start=at_fit_start, at_fit_end=at_fit_end, every_n_epochs=every_n_epochs,
                         every_n_steps=every_n_steps, name=name)
        self.snapshots: list[torch.Tensor] = []  # (K, N) float32 on the CPU, rank 0 only
        self.steps_kept: list[int] = []
        self.epochs_kept: list[int] = []
        self._layout: Optional[tuple[list[str], list[int]]] = None
        self._written = 0

    # --- hooks --------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the first step: on a resumed run, the snapshots kept up to its checkpoint; then theta_0."""
        if trainer.global_step > 0 and not self.steps_kept and trainer.is_global_zero:
            self._read_back(trainer, trainer.global_step)
        super().on_train_start(trainer, pl_module)

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        """At fit start, an epoch end or fit end: keep the network as it is now."""
        # At fit end current_epoch has already been incremented past the last epoch trained.
        epoch = max(trainer.current_epoch - 1, 0) if tag == FIT_END else trainer.current_epoch
        self._keep(trainer, pl_module, trainer.global_step, epoch)

    def analyse_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, record: Any) -> None:
        """Inside the training step, before update ``step``: keep theta_step (a copy, no evaluation)."""
        # record is None for the step due at fit end (after the last update): as analyse at FIT_END.
        self._keep(trainer, pl_module, step, record.epoch if record is not None else max(trainer.current_epoch - 1, 0))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """With every checkpoint, the snapshots so far: a resume from it finds them all."""
        self._write(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the last epoch: the final network (when not kept yet), then the file."""
        super().on_train_end(trainer, pl_module)
        self._write(trainer)

    # --- helpers ------------------------------------------------------------------------------
    def _keep(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, epoch: int) -> None:
        # Every rank holds the same parameters (DDP keeps them equal): rank 0 alone keeps them.
        if not trainer.is_global_zero or (self.steps_kept and self.steps_kept[-1] == step):
            return
        view = pl_module.functional_view()
        if self._layout is None:
            self._layout = (list(view.params), [p[0].numel() if view.ensemble_size > 1 else p.numel() for p in view.params.values()])
        row = torch.stack([flatten(member.params).detach() for member in view.members()])  # (K, N)
        self.snapshots.append(row.to("cpu", torch.float32))
        self.steps_kept.append(step)
        self.epochs_kept.append(epoch)

    def _path(self, trainer: pl.Trainer) -> str:
        return os.path.join(self.output_dir(trainer), TRAJECTORY_FILE.name)

    def _write(self, trainer: pl.Trainer) -> None:
        """``trajectory.npz`` on rank 0 when it gained snapshots, atomically (a kill leaves the old one)."""
        if not trainer.is_global_zero or len(self.steps_kept) == self._written or self._layout is None:
            return
        path = self._path(trainer)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        names, numels = self._layout
        np.savez(tmp, step=np.array(self.steps_kept, dtype=np.int64), epoch=np.array(self.epochs_kept, dtype=np.int64),
                 params=torch.stack(self.snapshots).numpy(), names=np.array(names), numels=np.array(numels, dtype=np.int64))
        os.replace(tmp, path)
        self._written = len(self.steps_kept)

    def _read_back(self, trainer: pl.Trainer, step: int) -> None:
        """The snapshots of a resumed run up to ``step`` (later ones are trained again)."""
        path = self._path(trainer)
        if not os.path.isfile(path):
            rank_zero_warn(f"{type(self).__name__}: resumed at step {step} without {path}; the trajectory starts here")
            return
        arrays = read_trajectory(path, f"{type(self).__name__}")
        keep = arrays["step"] <= step
        self.snapshots = list(torch.from_numpy(arrays["params"][keep]))
        self.steps_kept, self.epochs_kept = arrays["step"][keep].tolist(), arrays["epoch"][keep].tolist()
        self._layout = (arrays["names"].tolist(), arrays["numels"].tolist())
        self._written = len(self.steps_kept) if keep.all() else 0
