"""SharpnessTracker: the top Hessian eigenvalues through training, against the optimizer's threshold.

Every ``every_n_steps`` optimizer steps (or on the epoch schedule) the callback measures
lambda_1..lambda_k of the Hessian of the training loss on the DataModule's fixed analysis subset,
warm-started from the previous measurement's Ritz vectors, and compares lambda_1 with the
stability threshold of the optimizer's *current* lr (so schedules and batch-size switches are
followed): 2 / lr for plain GD (Cohen et al. 2021: progressive sharpening, then a hover at the
edge of stability), (2 + 2 beta) / lr for heavy-ball momentum; for Adam and AdamW also the
preconditioned sharpness lambda_1(P^-1 H) with P from the optimizer's own state, against
(2 + 2 beta1) / ((1 - beta1) lr) = 38 / lr (Cohen et al. 2022). The maths and sources are in
``overparam.curvature.sharpness``; with ``blocks``, lambda_1..k of each diagonal block H_bb too
(``overparam.curvature.blocks``).

The measurement at step t sees theta_t (t updates done), before that step's update, inside
``analysis_context`` (training is left untouched: tested bit for bit). Under DDP each rank holds
a shard of the analysis subset and the operator all-reduces, so every rank measures the
single-process values (tested). Ensemble members are measured one by one (suffix ``/member_k``).

Outputs: scalars ``<name>/lambda_1..k``, ``<name>/2_over_lr``, ``<name>/threshold``,
``<name>/ratio`` (lambda_1 / threshold), ``<name>/ritz_residual_max`` (relative),
``<name>/unconverged``, ``<name>/hvps`` (products spent on the top-k), ``<name>/overlap``
(||U_prev^T U||_F^2 / k of successive top-k eigenvectors), with Adam
``<name>/preconditioned_lambda_1..k``, ``_threshold``, ``_ratio``, ``_hvps``, ``_overlap``, and per
block ``<name>/block/<block>/lambda_1..k``; in ``<log_dir>/<name>/`` (rank 0) ``sharpness.npz``,
the whole series with residuals and converged flags (written at every epoch end and at fit end),
and ``sharpness.png`` (lambda_1 vs step with the threshold line) at fit end.

Resuming: the history is in the checkpoint; the Ritz vectors (N x k) are not, so the first
measurement after a resume starts cold (a few more products, the same values).
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from overparam import plots
from overparam.callbacks.base import AnalysisCallback, analysis_context
from overparam.callbacks.hessian import block_index_sets
from overparam.curvature import (
    HVP_MODES,
    BlockOperator,
    HessianOperator,
    PreconditionedOperator,
    adam_preconditioner,
    adam_threshold,
    sgd_threshold,
    track_top_k,
)
from overparam.curvature.blocks import LAYERS
from overparam.curvature.sharpness import TRACK_TOL, Tracked
from overparam.errors import ConfigError, check_choice, check_positive
from overparam.metrics import member_suffix

#: Optimizers whose preconditioner ``adam_preconditioner`` describes.
ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)


class SharpnessTracker(AnalysisCallback):
    """Sharpness lambda_1..k of the training loss every n optimizer steps, warm-started.

    Args:
        top_k: eigenvalues tracked (default 1, the sharpness).
        every_n_steps: measure theta_t at t = 0, n, 2n, ... (default 16: the interval of the
            issue's benchmark and of Cockpit's comparison; None: only the epoch schedule).
        tol: relative Ritz residual at which a value has converged (default 1e-2,
            ``curvature.sharpness.TRACK_TOL``: within 1% of lambda_1 by Kahan's bound, measured
            within 3e-4 on MNIST-FC). Unconverged values are flagged in the .npz and warned about once.
        lanczos_steps: product budget per measurement (default ``max(40k, 600)``).
        lanczos_basis: vectors kept before a thick restart (default ``max(3k + 50, 100)``).
        preconditioned: also lambda_1..k(P^-1 H) with Adam's P (None: when the optimizer is Adam
            or AdamW; True: require one).
        blocks: also per parameter block: ``"layers"`` (one per module) or ``{name: glob or
            [globs]}`` on the functional view's parameter names (unmatched ones form ``rest``).
        analysis_size: training points analysed (default: the DataModule's ``analysis_size``).
        batch_size: points per chunk of the analysis passes (default: ``eval_batch_size``).
        hvp_mode: ``auto`` (chosen during the first measurement, kept after), or a fixed mode.
        compile: whether ``auto`` also tries ``torch.compile`` (default: on CUDA only).
        seed: seed of the cold start vector (shared by ranks).
        plot: write ``sharpness.png`` at fit end.
        at_fit_start, at_fit_end, every_n_epochs, at_epochs, name: ``AnalysisCallback``'s schedule
            (default: only ``every_n_steps``) and folder/metric prefix (default ``sharpness``).

    Raises:
        ConfigError: a bad value (named), a DataModule without ``analysis_batches``, a block glob
            that matches nothing, or ``preconditioned=True`` without Adam/AdamW.

    Example::

        Trainer(callbacks=[SharpnessTracker(every_n_steps=10, top_k=2)])

    YAML::

        trainer:
          callbacks:
            - class_path: SharpnessTracker
              init_args: {every_n_steps: 10, blocks: layers}
    """

    default_name = "sharpness"

    def __init__(
        self,
        top_k: int = 1,
        every_n_steps: Optional[int] = 16,
        tol: float = TRACK_TOL,
        lanczos_steps: Optional[int] = None,
        lanczos_basis: Optional[int] = None,
        preconditioned: Optional[bool] = None,
        blocks: Optional[Union[str, dict[str, Union[str, list[str]]]]] = None,
        analysis_size: Optional[int] = None,
        batch_size: Optional[int] = None,
        hvp_mode: str = "auto",
        compile: Optional[bool] = None,
        seed: int = 0,
        plot: bool = True,
        at_fit_start: bool = False,
        at_fit_end: bool = False,
        every_n_epochs: Optional[int] = None,
        at_epochs: Sequence[int] = (),
        name: Optional[str] = None,
    ) -> None:
        super().__init__(at_fit_start, at_fit_end, every_n_epochs, at_epochs, name, every_n_steps)
        cls = type(self).__name__
        check_positive(f"{cls}.top_k", top_k)
        check_positive(f"{cls}.tol", tol, allow_zero=True)
        for option, value in (("lanczos_steps", lanczos_steps), ("lanczos_basis", lanczos_basis),
                              ("analysis_size", analysis_size), ("batch_size", batch_size)):
            if value is not None:
                check_positive(f"{cls}.{option}", value)
        check_choice(f"{cls}.hvp_mode", hvp_mode, HVP_MODES)
        if isinstance(blocks, str) and blocks != LAYERS:
            raise ConfigError(f"{cls}.blocks must be {LAYERS!r} or a mapping of block names to globs; got {blocks!r}")
        self.top_k, self.tol, self.lanczos_steps, self.lanczos_basis = top_k, tol, lanczos_steps, lanczos_basis
        self.preconditioned, self.blocks = preconditioned, blocks
        self.analysis_size, self.batch_size = analysis_size, batch_size
        self.hvp_mode, self.compile, self.seed, self.plot = hvp_mode, compile, seed, plot
        # Per (quantity, member): the last measurement's result, the warm start of the next.
        # Not checkpointed (N x k): a resumed run starts its first measurement cold.
        self._previous: dict[tuple[str, int], Any] = {}
        self._block_indices: dict[str, Tensor] = {}
        self._resolved_mode: Optional[str] = None
        self._warned = False

    # --- setup ----------------------------------------------------------------------------------
    def on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the DataModule and resolve ``blocks`` on the network's parameter names."""
        cls = type(self).__name__
        if not hasattr(trainer.datamodule, "analysis_batches"):
            raise ConfigError(f"{cls} needs an overparam DataModule with analysis_batches(); got {type(trainer.datamodule).__name__}")
        if self.blocks is not None:
            self._block_indices = block_index_sets(f"{cls}.blocks", pl_module.functional_view().member(0).params, self.blocks)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the optimizer (``preconditioned=True`` needs Adam), then the base's fit-start run."""
        optimizer = trainer.optimizers[0]
        if self.preconditioned and not isinstance(optimizer, ADAM_TYPES):
            raise ConfigError(f"{type(self).__name__}.preconditioned needs Adam or AdamW; the optimizer is {type(optimizer).__name__}")
        if len({group["lr"] for group in optimizer.param_groups}) > 1:
            rank_zero_warn(f"{type(self).__name__}: the param groups have different lrs; the thresholds use the first group's")
        super().on_train_start(trainer, pl_module)

    # --- measurements ---------------------------------------------------------------------------
    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        """An epoch-schedule or fit start/end measurement of theta at ``global_step``."""
        self._measure(trainer, pl_module, trainer.global_step)

    def analyse_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, record: Any) -> None:
        """The measurement of theta_step, before the step's update."""
        with analysis_context(pl_module):
            self._measure(trainer, pl_module, step)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if self.history and self.history[-1]["step"] == step:
            return  # measured already (an epoch end meets the step schedule)
        optimizer = trainer.optimizers[0]
        group = optimizer.param_groups[0]
        lr = float(group["lr"])
        threshold = self._threshold(optimizer, group, lr)
        view = pl_module.functional_view()
        batches = trainer.datamodule.analysis_batches(size=self.analysis_size, batch_size=self.batch_size)
        K = view.ensemble_size
        metrics: dict[str, float] = {"2_over_lr": 2.0 / lr}
        for k in range(K):
            row = self._measure_member(trainer, pl_module, optimizer, view, k, batches)
            row.update(step=step, epoch=trainer.current_epoch, lr=lr, threshold=threshold)
            self.history.append(row)
            metrics.update(self._scalars(row, member_suffix(k, K)))
        self.log_metrics(trainer, pl_module, metrics)
        self._warn_unconverged(step)

    def _measure_member(self, trainer, pl_module, optimizer, view, k: int, batches) -> dict[str, Any]:
        member = view.member(k)
        mode = self._resolved_mode or self.hvp_mode
        H = HessianOperator.from_view(member, pl_module.loss_fn, batches, hvp_mode=mode, compile=self.compile)
        row: dict[str, Any] = {"member": k, "N": H.dim}
        row.update(self._track("hessian", k, H))
        if H.hvp_mode != "auto":  # chosen during the products: later measurements skip the choice
            self._resolved_mode = H.hvp_mode
        diagonal = self._adam_diagonal(optimizer, member, view, k) if self._wants_preconditioned(optimizer) else None
        if diagonal is not None:
            group = optimizer.param_groups[0]
            row.update({f"preconditioned_{key}": v for key, v in self._track("preconditioned", k, PreconditionedOperator(H, diagonal)).items()})
            row["preconditioned_threshold"] = adam_threshold(float(group["lr"]), group["betas"][0])
        row["blocks"] = {name: self._track(f"block/{name}", k, BlockOperator(H, idx)) for name, idx in self._block_indices.items()}
        return row

    def _track(self, quantity: str, member: int, operator) -> dict[str, Any]:
        """Top-k of ``operator`` warm-started from this quantity's last result; a history fragment."""
        key = (quantity, member)
        tracked: Tracked = track_top_k(
            operator.matvec, operator.dim, min(self.top_k, operator.dim), self._previous.get(key), tol=self.tol,
            dtype=operator.dtype, device=operator.device, max_steps=self.lanczos_steps, max_basis=self.lanczos_basis,
            seed=self.seed, warn=False,  # ``_warn_unconverged`` warns once, on rank 0
        )
        result = self._previous[key] = tracked.result
        return {
            "eigenvalues": result.eigenvalues.tolist(),
            "residuals": result.relative_residuals.tolist(),
            "converged": result.converged.tolist(),
            "hvps": result.num_matvecs,
            "overlap": tracked.overlap,
            "warm": tracked.warm,
        }

    def _wants_preconditioned(self, optimizer: torch.optim.Optimizer) -> bool:
        return self.preconditioned is not False and isinstance(optimizer, ADAM_TYPES)

    @staticmethod
    def _threshold(optimizer: torch.optim.Optimizer, group: dict, lr: float) -> float:
        """SGD's stability threshold (momentum, dampening, Nesterov); 2 / lr for other optimizers."""
        if isinstance(optimizer, torch.optim.SGD):
            return sgd_threshold(lr, group.get("momentum", 0.0), group.get("dampening", 0.0), group.get("nesterov", False))
        return 2.0 / lr

    @staticmethod
    def _adam_diagonal(optimizer: torch.optim.Optimizer, member, view, k: int) -> Optional[Tensor]:
        """Adam's P for member ``k`` as a flat vector in the view's order; None before the first update."""
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        pieces = []
        for name, p in view.params.items():
            state, group = optimizer.state.get(p), groups[id(p)]
            if not state:
                return None
            v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            v = v[k] if view.ensemble_size > 1 else v
            beta1, beta2 = group["betas"]
            P = adam_preconditioner(v.detach(), float(state["step"]), beta1, beta2, group["eps"])
            pieces.append(P.reshape(-1).to(member.params[name].dtype))
        return torch.cat(pieces)

    def _scalars(self, row: dict[str, Any], suffix: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for prefix in ("", "preconditioned_"):
            values = row.get(f"{prefix}eigenvalues")
            if not values:
                continue
            out.update({f"{prefix}lambda_{i + 1}{suffix}": v for i, v in enumerate(values)})
            out[f"{prefix}hvps{suffix}"] = row[f"{prefix}hvps"]
            if not math.isnan(row[f"{prefix}overlap"]):
                out[f"{prefix}overlap{suffix}"] = row[f"{prefix}overlap"]
            out[f"{prefix}threshold"] = row[f"{prefix}threshold"]
            out[f"{prefix}ratio{suffix}"] = values[0] / row[f"{prefix}threshold"]
        out[f"ritz_residual_max{suffix}"] = max(row["residuals"])
        out[f"unconverged{suffix}"] = sum(not c for c in row["converged"] + row.get("preconditioned_converged", []))
        for name, block in row["blocks"].items():
            out.update({f"block/{name}/lambda_{i + 1}{suffix}": v for i, v in enumerate(block["eigenvalues"])})
            out[f"unconverged{suffix}"] += sum(not c for c in block["converged"])
        return out

    def _warn_unconverged(self, step: int) -> None:
        """The first time a value misses ``tol``: one warning (rank 0); later ones are only flagged."""
        if self._warned:
            return
        rows = [r for r in self.history if r["step"] == step]
        missing = sum(self._scalars(r, "")["unconverged"] for r in rows)
        if missing:
            self._warned = True
            cls = type(self).__name__
            rank_zero_warn(
                f"{cls} (step {step}): {missing} tracked eigenvalue(s) did not converge to tol = {self.tol:g}; they are "
                f"flagged (converged = 0) in sharpness.npz and counted in {self.name}/unconverged, and not warned about "
                f"again. Raise {cls}.lanczos_steps or loosen tol."
            )

    # --- files ----------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The epoch schedule's measurement if due, then the series so far to ``sharpness.npz``."""
        super().on_train_epoch_end(trainer, pl_module)
        self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last step's measurement if due, then ``sharpness.npz`` and ``sharpness.png``."""
        super().on_train_end(trainer, pl_module)
        self._save(trainer)
        if self.plot and self.history and trainer.is_global_zero:
            path = plots.save_figure(plots.plot_sharpness(self.history), os.path.join(self.output_dir(trainer), "sharpness.png"))
            self.log_image(trainer, "sharpness", path)

    def _save(self, trainer: pl.Trainer) -> None:
        if not self.history or not trainer.is_global_zero:
            return
        self.save_npz(trainer, "sharpness.npz", **series_arrays(self.history, self.top_k, self.tol))


def _padded(rows: list[dict[str, Any]], key: str, k: int) -> np.ndarray:
    """(M, k) float64 from each row's list ``key`` (NaN where absent or shorter)."""
    out = np.full((len(rows), k), np.nan)
    for i, r in enumerate(rows):
        values = r.get(key) or []
        out[i, : len(values)] = np.asarray(values, dtype=np.float64)
    return out


def series_arrays(rows: list[dict[str, Any]], k: int, tol: float) -> dict[str, np.ndarray]:
    """The arrays of ``sharpness.npz``: one row per measurement and member (see docs/curvature.md)."""

    def column(key: str) -> np.ndarray:
        return np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)

    arrays = {
        "tol": np.array(tol),
        "step": column("step"),
        "epoch": column("epoch"),
        "member": column("member"),
        "lr": column("lr"),
        "two_over_lr": 2.0 / column("lr"),
        "threshold": column("threshold"),
        "eigenvalues": _padded(rows, "eigenvalues", k),
        "ritz_residuals": _padded(rows, "residuals", k),
        "converged": _padded(rows, "converged", k),
        "hvps": column("hvps"),
        "overlap": column("overlap"),
        "warm": column("warm"),
    }
    if any(r.get("preconditioned_eigenvalues") for r in rows):
        arrays.update({
            "preconditioned_threshold": column("preconditioned_threshold"),
            "preconditioned_eigenvalues": _padded(rows, "preconditioned_eigenvalues", k),
            "preconditioned_ritz_residuals": _padded(rows, "preconditioned_residuals", k),
            "preconditioned_converged": _padded(rows, "preconditioned_converged", k),
            "preconditioned_hvps": column("preconditioned_hvps"),
            "preconditioned_overlap": column("preconditioned_overlap"),
        })
    names = list(rows[0].get("blocks") or {})
    if names:
        arrays["block_names"] = np.array(names)
        for key, out in (("eigenvalues", "block_eigenvalues"), ("residuals", "block_ritz_residuals"), ("converged", "block_converged")):
            arrays[out] = np.stack([_padded([r["blocks"][n] for r in rows], key, k) for n in names], axis=1)  # (M, B, k)
        arrays["block_hvps"] = np.array([[r["blocks"][n]["hvps"] for n in names] for r in rows], dtype=np.float64)
    return arrays
