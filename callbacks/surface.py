"""``LossSurface``: the loss and error on a plane around the network, at fit end or on a schedule.

What ``overparam landscape`` does for a finished run, inside the Trainer (``overparam.planes``):
a ``filter`` plane (two filter-normalised random directions, Li et al. 2018), the ``hessian``
plane (top-2 eigenvectors of the Hessian of the training loss), or the ``pca`` plane of the
trajectory kept by a ``TrajectorySnapshots`` callback in the same Trainer (Li et al. 2018,
Sec. 7). Every rank evaluates its shard of the analysis data and the sums are all-reduced; the
PCA snapshots, which rank 0 alone keeps, are broadcast first. Outputs go to
``<log_dir>/surface/``: ``surface_<tag>.npz`` (as the command's ``surface.npz``),
``contour_<tag>.png`` and ``surface_<tag>.png``, also sent to W&B when it is a logger; the
centre's losses, the curvature there and the directions' numbers are logged.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from overparam import planes
from overparam.callbacks.base import AnalysisCallback, check_splits_and_size, split_batches
from overparam.callbacks.trajectory import TrajectorySnapshots
from overparam.errors import ConfigError
from overparam.functional import FunctionalView
from overparam.landscape import batchnorm_layers
from overparam.plots import plot_plane_evaluation, save_figure

PLANES = ("filter", "hessian", "pca")


class LossSurface(AnalysisCallback):
    """The surface ``L(theta + a d1 + b d2)`` on a grid around the current network.

    Args:
        plane: ``filter`` (default), ``hessian`` or ``pca`` (needs ``TrajectorySnapshots``).
        points: grid points per axis (default 21, as ``overparam landscape``).
        range: both axes' extent ``[lo, hi]``; None (default): ``planes.default_axes``, [-1, 1]
            and for ``pca`` the box around the trajectory (as ``overparam landscape``).
        splits: splits to evaluate (default train; ``train`` is the DataModule's
            ``analysis_batches``).
        size: training points (default: the DataModule's ``analysis_size``, else all).
        points_per_call: grid points per vmapped forward (default 7).
        seed: seed of the random directions and of Lanczos' start vector.
        **kwargs: the schedule of ``AnalysisCallback`` (``at_fit_end`` default True,
            ``every_n_epochs``, ``at_epochs``, ``at_fit_start``, ``name``).

    Raises:
        ConfigError: an unknown plane or split, a bad grid or size (at ``__init__``); ``pca``
            without a ``TrajectorySnapshots`` callback (at setup).

    Example::

        Trainer(callbacks=[TrajectorySnapshots(), LossSurface(plane="pca")])

    In YAML::

        trainer:
          callbacks:
            - class_path: TrajectorySnapshots
            - class_path: LossSurface
              init_args: {plane: pca, points: 21}
    """

    default_name = "surface"

    def __init__(
        self,
        plane: str = "filter",
        points: int = 21,
        range: Optional[Sequence[float]] = None,
        splits: Sequence[str] = ("train",),
        size: Optional[int] = None,
        points_per_call: int = 7,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        option = type(self).__name__
        if plane not in PLANES:
            raise ConfigError(f"{option}.plane must be one of {', '.join(PLANES)}; got {plane!r}")
        if range is not None and (len(range) != 2 or not range[0] < range[1]):
            raise ConfigError(f"{option}.range must be [lo, hi] with lo < hi, or null; got {list(range)}")
        try:
            planes.axis(points)
        except ConfigError as exc:
            raise ConfigError(f"{option}.{exc}") from None
        check_splits_and_size(option, splits, size)
        self.plane, self.points, self.range = plane, points, None if range is None else tuple(range)
        self.splits, self.size, self.points_per_call, self.seed = list(splits), size, points_per_call, seed
        self._trajectory: Optional[TrajectorySnapshots] = None

    def on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before fitting: the ``pca`` plane needs a ``TrajectorySnapshots`` in the same Trainer."""
        if stage == "fit" and self.plane == "pca":
            found = [c for c in trainer.callbacks if isinstance(c, TrajectorySnapshots)]
            if not found:
                raise ConfigError(f"{type(self).__name__}.plane=pca needs a TrajectorySnapshots callback in the same Trainer (add --trainer.callbacks+=TrajectorySnapshots)")
            self._trajectory = found[0]

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        """Evaluate each member's surface, log its numbers, save the arrays and the figures."""
        view = pl_module.functional_view().detached()
        data = split_batches(trainer, self.splits, self.size, type(self).__name__)
        train = data["train"] if "train" in data else trainer.datamodule.analysis_batches("train", size=self.size)
        bn_module = getattr(pl_module, "net", None) if pl_module.ensemble_size == 1 else None
        has_bn = bool(batchnorm_layers(bn_module))
        trajectory = self._broadcast_trajectory(trainer) if self.plane == "pca" else None
        metrics = {}
        for k, member in enumerate(view.members()):
            plane = self._plane(member, pl_module, train, None if trajectory is None else trajectory[:, k])
            axes = planes.default_axes(plane, self.points) if self.range is None else (planes.axis(self.points, *self.range),) * 2
            ev = planes.evaluate_plane(
                member.fn, plane, data, pl_module.loss_fn, axes=axes,
                buffers=member.buffers, bn_module=bn_module, bn_batches=train if has_bn else None, points_per_call=self.points_per_call,
            )
            prefix = f"member_{k}/" if view.ensemble_size > 1 else ""
            metrics.update({prefix + key: value for key, value in self._numbers(ev).items()})
            self._save(trainer, ev, tag + (f"_member_{k}" if prefix else ""), prefix)
        self.log_metrics(trainer, pl_module, metrics)
        self.history.append({"tag": tag, "epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})

    # --- helpers ------------------------------------------------------------------------------
    def _plane(self, member: FunctionalView, pl_module: pl.LightningModule, train: list, trajectory: Optional[torch.Tensor]) -> planes.Plane:
        if self.plane == "filter":
            return planes.random_plane(member.params, seed=self.seed)
        if self.plane == "hessian":
            plane = planes.hessian_plane(member.fn, member.params, pl_module.loss_fn, train, buffers=member.buffers, seed=self.seed, warn=False)
            if not plane.info["converged"].all():
                rank_zero_warn(f"{type(self).__name__}: the top-2 Hessian eigenpairs did not converge (relative residuals "
                               f"{plane.info['residuals']}); the plane's directions are approximate")
            return plane
        return planes.pca_plane(member.params, trajectory.to(next(iter(member.params.values())).device))

    def _broadcast_trajectory(self, trainer: pl.Trainer) -> torch.Tensor:
        """``(T, K, N)`` snapshots on every rank (rank 0 keeps them)."""
        snapshots = torch.stack(self._trajectory.snapshots) if trainer.is_global_zero and self._trajectory.snapshots else None
        snapshots = trainer.strategy.broadcast(snapshots, src=0)
        if snapshots is None:
            raise ConfigError(f"{type(self).__name__}.plane=pca: TrajectorySnapshots kept no snapshots (is at_fit_start or a schedule on?)")
        return snapshots

    def _numbers(self, ev: planes.PlaneEvaluation) -> dict[str, float]:
        info = ev.plane.info
        out = {f"centre/{key}": value for key, value in ev.centre().items()} if (ev.a == 0).any() and (ev.b == 0).any() else {}
        if "train" in ev.loss and ev.centre_is_interior:
            out.update({f"curvature/{key}": value for key, value in ev.curvature("train").items() if key.startswith("L_")})
        if self.plane == "hessian":
            out.update({"lambda_1": float(info["eigenvalues"][0]), "lambda_2": float(info["eigenvalues"][1])})
        elif self.plane == "pca":
            out.update({f"explained_variance_{i + 1}": float(r) for i, r in enumerate(info["explained_variance_ratio"])})
        return out

    def _save(self, trainer: pl.Trainer, ev: planes.PlaneEvaluation, tag: str, label: str) -> None:
        stem = re.sub(r"[^\w=.-]", "_", tag)
        self.save_npz(trainer, f"surface_{stem}.npz", **ev.arrays())
        if trainer.is_global_zero:
            contours, surfaces = plot_plane_evaluation(ev, f"{self.plane} plane, {label}{tag}")
            for name, figure in (("contour", contours), ("surface", surfaces)):
                path = save_figure(figure, os.path.join(self.output_dir(trainer), f"{name}_{stem}.png"))
                self.log_image(trainer, f"{label}{name}", path)

    # --- resume -------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, plane=self.plane)
