"""HessianSpectrum: top eigenvalues, spectral density, GGN split, trace and outliers of the Hessian.

The talk's Observation 2 (Sagun et al. 2017, "Empirical analysis of the Hessian of
over-parametrized neural networks"; Papyan 2019, 2020): at the start and at the end of training
the Hessian of the training loss is a bulk near zero plus a few outliers, about one per class.
This callback measures it on a fixed subset of the training set with the engine in
``overparam.curvature`` (formulas and sources there) and, as options, the share of the
gradient that lies in the top-k eigenspace every n steps (Gur-Ari, Roberts & Dyer 2018), run
from the Task's per-step hook on a second ``StepSchedule``, and the spectra of parameter blocks
(``blocks``: the diagonal blocks H_bb of ``overparam.curvature.blocks``, and the block-diagonal
spectrum diag(H_bb) against the full one).

Outliers (the rule): with the top eigenvalues lambda_1 >= ... >= lambda_k (k = ``top_k``), the
k-th one stands for the edge of the bulk, and the outliers are the eigenvalues above
``outlier_ratio`` times that edge: #{i : lambda_i > r max(lambda_k, 0)}, r = 2 by default. This
needs ``top_k`` larger than the number of outliers; the default 2C + 1 (at least 5) leaves room
for the C outliers of Papyan (2019) and puts lambda_k in the bulk. Outliers decay gradually
(on MNIST, 24, 17, 13, ..., 4.8 above a bulk edge near 1.3), so a rule on consecutive gaps
would miss them.

Outputs, in ``<log_dir>/<name>/`` (rank 0): ``<tag>.npz`` per analysis (tag ``start``,
``epoch=E`` or ``end``; leading member dimension K) with every value beside its uncertainty:
eigenvalues with their Ritz residuals and ``converged`` flags (1/0, against ``tol``), the
trace with its standard error, SLQ nodes and weights with the probe count, the moments
tr(H^j)/N (j = 1..4) with their standard errors and the smoothed density with its pointwise
standard error; a PNG ``<tag>.png`` like the talk's figure (log-scale histogram of the
spectrum, outliers marked, the fit-start spectrum overlaid, a +-2 SE band, a caption with the
number of probes and the convergence of the top-k), and with ``subspace_every_n_steps`` the
series ``subspace.npz`` and ``subspace_overlap.png`` at fit end; with ``blocks``, per block
``block_eigenvalues``, ``block_ritz_residuals``, ``block_converged``, ``block_trace`` (+ SE),
``block_density_nodes``/``_weights`` and the block-diagonal ``block_diagonal_eigenvalues`` and
``block_diagonal_density`` (on the full density's grid) in the .npz, and ``<tag>_blocks.png``.
Scalars go to every logger as ``<name>/top1``, ``<name>/outliers``, ``<name>/trace``,
``<name>/unconverged``, ``<name>/block/<block>/top1``, ``<name>/block_diagonal_top1``, ...; with
K > 1 members every name gets the suffix ``/member_k``. An eigenvalue that did not converge is
reported by one ``rank_zero_warn`` per analysis naming the option to raise (for the subspace
series: once per run, later ones counted in ``subspace.npz``).

BatchNorm: analyses run in eval mode, so BatchNorm uses its running statistics and the Hessian
is that of a fixed function of theta (batch statistics would make it depend on the chunking).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from overparam.callbacks.base import FIT_START, AnalysisCallback, StepSchedule, analysis_context
from overparam.curvature import (
    HVP_MODES,
    BlockOperator,
    GGNOperator,
    HessianOperator,
    ResidualOperator,
    dense_hessian,
    density_band,
    block_diagonal_slq,
    block_indices,
    eigsh,
    eigvalsh,
    hutchinson,
    moment_stderr,
    merge_top_k,
    moments,
    operator_eigsh,
    parameter_blocks,
    slq,
    subspace_fraction,
    subspace_overlap,
)
from overparam import plots
from overparam.curvature.blocks import LAYERS, BlockSpec
from overparam.curvature.lanczos import EigenResult
from overparam.curvature.outliers import count_outliers
from overparam.curvature.slq import DEFAULT_PROBES, DEFAULT_STEPS
from overparam.errors import ConfigError, check_choice, check_positive
from overparam.progress import Progress
from overparam.metrics import member_name, member_suffix

if TYPE_CHECKING:
    from overparam.task import StepRecord


def block_index_sets(option: str, params: dict[str, Tensor], spec: BlockSpec) -> dict[str, Tensor]:
    """``{block: flat indices}`` of ``parameter_blocks(params, spec)``; a bad spec as a one-line ConfigError.

    Args:
        option: the option's name for the message (``HessianSpectrum.blocks``).
        params: one member's parameters (the functional view's names and order).
        spec: ``"layers"`` or ``{block: glob or [globs]}`` (``overparam.curvature.blocks``).
    """
    try:
        blocks = parameter_blocks(list(params), spec)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from exc
    return {name: block_indices(params, names) for name, names in blocks.items()}


class HessianSpectrum(AnalysisCallback):
    """Hessian spectrum of the training loss at fit start, fit end and on a schedule.

    Args:
        top_k: largest eigenvalues by Lanczos (default 2C + 1, at least 5: room for C outliers).
        bottom_k: smallest eigenvalues too (negative directions; default 0).
        lanczos_steps: product budget of each Lanczos run (default ``max(40k, 600)``, see
            ``eigsh``); a run stops earlier once every wanted eigenpair has converged.
        lanczos_basis: vectors Lanczos keeps before a thick restart (memory ``lanczos_basis * N``;
            default ``max(3k + 50, 100)``).
        tol: an eigenpair has converged when its Ritz residual is below ``tol * ||H||``
            (default 1e-6). Unconverged ones are flagged in the .npz and warned about.
        density: also estimate the spectral density by SLQ (needed for the bulk in the PNG).
        density_probes: SLQ probes (default ``slq.DEFAULT_PROBES``, whose docstring gives the
            measurement behind it); the moments' and the density's standard errors need >= 2.
        density_steps: Lanczos steps per probe (default 90, Ghorbani et al. 2019).
        ggn_split: also the top-k of the Gauss-Newton part G and the extreme eigenvalues of the
            residual R = H - G (Papyan 2019), and their traces on the same probes.
        trace_probes: Hutchinson probes for tr H (0: no trace; default 10).
        exact: also the exact spectrum by a dense Hessian and ``eigvalsh`` (small N only).
        exact_max_params: the largest N ``exact`` accepts (default 5000: a 200 MB matrix).
        outlier_ratio: outliers lie above this multiple of the bulk edge lambda_k (default 2).
        analysis_size: training points analysed (default: the DataModule's ``analysis_size``,
            or all of them).
        batch_size: points per chunk of the analysis passes (memory; default: the DataModule's
            ``eval_batch_size``).
        hvp_mode: ``auto`` (probe once, keep the fastest), ``forward_over_reverse``,
            ``compiled`` or ``double_backward``.
        compile: whether ``auto`` also tries ``torch.compile`` (default: on CUDA only).
        seed: seed of the Lanczos start vector and of the SLQ/Hutchinson probes (shared by ranks).
        plot: write PNGs.
        subspace_every_n_steps: every n optimizer steps, the fraction of the full-batch and the
            minibatch gradient in the top-``subspace_k`` eigenspace (None: off).
        subspace_k: dimension of that subspace (default C, the number of outputs).
        subspace_refresh_every_n_steps: recompute the top eigenvectors every n steps (default:
            at every measurement). In between, the last Ritz vectors are reused; a measurement at
            the step of a scheduled analysis reuses that analysis's Ritz vectors.
        blocks: also the spectrum of each diagonal block H_bb of parameter blocks, ``"layers"``
            (one per module) or ``{name: glob or [globs]}`` on the functional view's parameter
            names (unmatched ones form ``rest``): top-k, trace and density per block, and the
            block-diagonal spectrum diag(H_bb) against the full one (``<tag>_blocks.png``).
        at_fit_start, at_fit_end, every_n_epochs, at_epochs, name: ``AnalysisCallback``'s
            schedule (default: at fit start and at fit end) and folder/metric prefix.

    Raises:
        ConfigError: for a bad value (named), ``exact`` with N > ``exact_max_params``, a
            DataModule without ``analysis_batches``, or a block glob that matches nothing.

    Example::

        Trainer(callbacks=[HessianSpectrum(top_k=12, density=True, ggn_split=True)])

    YAML::

        trainer:
          callbacks:
            - class_path: HessianSpectrum
              init_args: {top_k: 12, ggn_split: true, every_n_epochs: 5}
    """

    default_name = "hessian"

    def __init__(
        self,
        top_k: Optional[int] = None,
        bottom_k: int = 0,
        lanczos_steps: Optional[int] = None,
        lanczos_basis: Optional[int] = None,
        tol: float = 1e-6,
        density: bool = True,
        density_probes: int = DEFAULT_PROBES,
        density_steps: int = DEFAULT_STEPS,
        ggn_split: bool = False,
        trace_probes: int = 10,
        exact: bool = False,
        exact_max_params: int = 5000,
        outlier_ratio: float = 2.0,
        analysis_size: Optional[int] = None,
        batch_size: Optional[int] = None,
        hvp_mode: str = "auto",
        compile: Optional[bool] = None,
        seed: int = 0,
        plot: bool = True,
        subspace_every_n_steps: Optional[int] = None,
        subspace_k: Optional[int] = None,
        subspace_refresh_every_n_steps: Optional[int] = None,
        blocks: Optional[Union[str, dict[str, Union[str, list[str]]]]] = None,
        at_fit_start: bool = True,
        at_fit_end: bool = True,
        every_n_epochs: Optional[int] = None,
        at_epochs: Sequence[int] = (),
        name: Optional[str] = None,
    ) -> None:
        super().__init__(at_fit_start, at_fit_end, every_n_epochs, at_epochs, name)
        cls = type(self).__name__
        for option, value in (
            ("top_k", top_k),
            ("lanczos_steps", lanczos_steps),
            ("lanczos_basis", lanczos_basis),
            ("analysis_size", analysis_size),
            ("batch_size", batch_size),
            ("subspace_k", subspace_k),
            ("subspace_refresh_every_n_steps", subspace_refresh_every_n_steps),
        ):
            if value is not None:
                check_positive(f"{cls}.{option}", value)
        check_positive(f"{cls}.bottom_k", bottom_k, allow_zero=True)
        check_positive(f"{cls}.trace_probes", trace_probes, allow_zero=True)
        check_positive(f"{cls}.density_probes", density_probes)
        check_positive(f"{cls}.exact_max_params", exact_max_params)
        check_positive(f"{cls}.tol", tol, allow_zero=True)
        if density_steps < 2:
            raise ConfigError(f"{cls}.density_steps must be at least 2, got {density_steps!r}")
        if not outlier_ratio > 1:
            raise ConfigError(f"{cls}.outlier_ratio must be greater than 1, got {outlier_ratio!r}")
        check_choice(f"{cls}.hvp_mode", hvp_mode, HVP_MODES)
        if isinstance(blocks, str) and blocks != LAYERS:
            raise ConfigError(f"{cls}.blocks must be {LAYERS!r} or a mapping of block names to globs; got {blocks!r}")
        self.blocks = blocks
        self._block_indices: dict[str, Tensor] = {}
        self.top_k, self.bottom_k, self.lanczos_steps, self.tol = top_k, bottom_k, lanczos_steps, tol
        self.lanczos_basis = lanczos_basis
        self.density, self.density_probes, self.density_steps = density, density_probes, density_steps
        self.ggn_split, self.trace_probes = ggn_split, trace_probes
        self.exact, self.exact_max_params, self.outlier_ratio = exact, exact_max_params, outlier_ratio
        self.analysis_size, self.batch_size = analysis_size, batch_size
        self.hvp_mode, self.compile, self.seed, self.plot = hvp_mode, compile, seed, plot
        self.subspace_every_n_steps = subspace_every_n_steps
        # The subspace series has its own step schedule (the base's ``steps`` is the analyses'),
        # run from ``on_train_step`` like every step analysis: t = 0, n, 2n, ..., each once.
        self.subspace_steps = StepSchedule(subspace_every_n_steps, f"{cls}.subspace_every_n_steps")
        self._subspace_warned = False
        self.subspace_k = subspace_k
        self.subspace_refresh_every_n_steps = subspace_refresh_every_n_steps or subspace_every_n_steps
        self.subspace_history: list[dict[str, Any]] = []
        # Per member: (global step, Ritz vectors (N, k), eigenvalues). Not checkpointed (N x k).
        self._ritz: dict[int, tuple[int, Tensor, Tensor]] = {}
        self._previous_vectors: dict[int, Tensor] = {}
        self._resolved_mode: Optional[str] = None

    # --- setup ---------------------------------------------------------------------------------
    def on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check what needs the model and data: ``analysis_batches`` and the exact size limit."""
        cls = type(self).__name__
        if not hasattr(trainer.datamodule, "analysis_batches"):
            raise ConfigError(f"{cls} needs an overparam DataModule with analysis_batches(); got {type(trainer.datamodule).__name__}")
        N = getattr(pl_module, "N", None)
        if self.exact and N is not None and N > self.exact_max_params:
            raise ConfigError(
                f"{cls}.exact needs N <= exact_max_params = {self.exact_max_params}; this model has N = {N:,} "
                "(turn exact off or raise exact_max_params)"
            )

        if self.blocks is not None:
            self._block_indices = block_index_sets(f"{cls}.blocks", pl_module.functional_view().member(0).params, self.blocks)

    def _num_top(self, pl_module: pl.LightningModule, N: int) -> int:
        k = self.top_k or max(2 * int(pl_module.num_outputs) + 1, 5)
        if k > N:
            rank_zero_warn(f"{type(self).__name__}.top_k = {k} exceeds N = {N}; using N")
        return min(k, N)

    def _batches(self, trainer: pl.Trainer) -> list:
        return trainer.datamodule.analysis_batches(size=self.analysis_size, batch_size=self.batch_size)

    def _hessian(self, view, loss_fn, batches) -> HessianOperator:
        op = HessianOperator.from_view(view, loss_fn, batches, hvp_mode=self._resolved_mode or self.hvp_mode, compile=self.compile)
        self._resolved_mode = op.hvp_mode
        return op

    # --- one analysis -------------------------------------------------------------------------
    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        """Spectrum of every member at the current params; log, save npz and PNG."""
        view = pl_module.functional_view()
        batches = self._batches(trainer)
        K = view.ensemble_size
        results = [self._analyse_member(view.member(k), pl_module, batches, k, trainer.global_step) for k in range(K)]
        metrics: dict[str, float] = {}
        for k, result in enumerate(results):
            suffix = member_suffix(k, K)
            metrics.update({f"{key}{suffix}": value for key, value in result["scalars"].items()})
            self.history.append(
                {
                    "tag": tag,
                    "epoch": trainer.current_epoch,
                    "step": trainer.global_step,
                    "member": k,
                    **result["scalars"],
                    "eigenvalues": result["top"].tolist(),
                    "converged": result["converged"].tolist(),
                    "nodes": result["nodes"].tolist() if result["nodes"] is not None else None,
                    "weights": result["weights"].tolist() if result["weights"] is not None else None,
                    "exact": result["exact"].tolist() if result["exact"] is not None else None,
                    "N": result["N"],
                    "blocks": {n: b["top"].tolist() for n, b in result["blocks"].items()} if result["blocks"] else None,
                }
            )
        self.log_metrics(trainer, pl_module, metrics)
        self._warn_unconverged(tag, results)
        self._save(trainer, tag, results)
        if trainer.is_global_zero:
            self.log_histogram(trainer, "eigenvalues", _histogram_samples(results[0]))
            if self.plot:
                for k in range(K):
                    filename = f"{tag}.png" if K == 1 else f"{tag}_member{k}.png"
                    path = self._plot(trainer, k, tag, filename)
                    self.log_image(trainer, "spectrum" if K == 1 else member_name("spectrum", k), path)
                    if results[k]["blocks"]:
                        path = self._plot_blocks(trainer, results[k], filename.replace(".png", "_blocks.png"))
                        self.log_image(trainer, "blocks" if K == 1 else member_name("blocks", k), path)

    def _progress(self, pl_module: pl.LightningModule, what: str) -> Optional[Progress]:
        """Progress lines of one long computation, on rank 0 only (``overparam.progress``)."""
        return Progress(f"{type(self).__name__} {what}") if pl_module.trainer.is_global_zero else None

    def _analyse_member(self, view, pl_module, batches, member: int, step: int) -> dict[str, Any]:
        loss_fn = pl_module.loss_fn
        H = self._hessian(view, loss_fn, batches)
        k = self._num_top(pl_module, H.dim)
        # The engine's own warning is off: every rank would emit it; ``_warn_unconverged`` warns on rank 0.
        eig_kwargs = {"max_steps": self.lanczos_steps, "max_basis": self.lanczos_basis, "tol": self.tol, "seed": self.seed, "warn": False}
        top = operator_eigsh(H, k=k, progress=self._progress(pl_module, f"top-{k} (Lanczos)"), **eig_kwargs)
        if H.hvp_mode != "auto":  # chosen during the products: later operators skip the choice
            self._resolved_mode = H.hvp_mode
        if self.subspace_every_n_steps is not None:  # reused by the subspace measurements
            self._ritz[member] = (step, top.eigenvectors, top.eigenvalues)
        scalars: dict[str, float] = {f"top{i + 1}": float(v) for i, v in enumerate(top.eigenvalues)}
        scalars["outliers"] = count_outliers(top.eigenvalues.tolist(), self.outlier_ratio)
        scalars["ritz_residual_max"] = float(top.relative_residuals.max())
        out: dict[str, Any] = {"top": top.eigenvalues, "residuals": top.residuals, "converged": top.converged, "N": H.dim}
        out["unconverged"] = _unconverged("top", top)
        out["bottom"] = out["bottom_residuals"] = out["bottom_converged"] = torch.zeros(0, dtype=torch.float64)
        if self.bottom_k:
            bottom = operator_eigsh(H, k=min(self.bottom_k, H.dim), which="smallest", **eig_kwargs)
            scalars.update({f"bottom{i + 1}": float(v) for i, v in enumerate(bottom.eigenvalues)})
            out["bottom"], out["bottom_residuals"], out["bottom_converged"] = bottom.eigenvalues, bottom.residuals, bottom.converged
            out["unconverged"] += _unconverged("bottom", bottom)
        if self.trace_probes:
            trace = hutchinson(H.matvec, H.dim, self.trace_probes, self.seed, H.dtype, H.device)
            scalars["trace"], scalars["trace_stderr"] = trace.trace, trace.stderr
        out["nodes"] = out["weights"] = None
        if self.density:
            result = slq(H.matvec, H.dim, self.density_probes, self.density_steps, self.seed, H.dtype, H.device,
                         progress=self._progress(pl_module, "density (SLQ)"))
            out["nodes"], out["weights"] = result.nodes, result.weights
            out["moments"] = moments(result.nodes, result.weights, MOMENT_ORDERS)
            out["moment_stderr"] = moment_stderr(result.nodes, result.weights, MOMENT_ORDERS)
            out["density_grid"], out["density"], out["density_stderr"] = density_band(result.nodes, result.weights)
        out["blocks"] = None
        if self._block_indices:
            self._analyse_blocks(H, k, eig_kwargs, scalars, out)
        if self.ggn_split:
            self._ggn_split(view, loss_fn, batches, k, eig_kwargs, scalars, out)
        scalars["unconverged"] = sum(n for _, n, _ in out["unconverged"])
        out["exact"] = None
        if self.exact:
            dense = dense_hessian(view.fn, view.params, loss_fn, batches, view.buffers, progress=self._progress(pl_module, "exact Hessian"))
            out["exact"] = eigvalsh(dense)
            scalars["exact_top1"] = float(out["exact"][0])
        out["scalars"] = scalars
        return out

    def _analyse_blocks(self, H: HessianOperator, k: int, eig_kwargs: dict, scalars: dict, out: dict) -> None:
        """Top-k, trace and density of each diagonal block H_bb, and of diag(H_bb) (``curvature.blocks``)."""
        blocks: dict[str, dict[str, Any]] = {}
        for name, idx in self._block_indices.items():
            op = BlockOperator(H, idx)
            top = eigsh(op.matvec, op.dim, min(k, op.dim), dtype=op.dtype, device=op.device, **eig_kwargs)
            block: dict[str, Any] = {"dim": op.dim, "top": top.eigenvalues, "residuals": top.residuals, "converged": top.converged}
            scalars.update({f"block/{name}/top{i + 1}": float(v) for i, v in enumerate(top.eigenvalues)})
            out["unconverged"] += _unconverged(f"block {name} top", top)
            if self.trace_probes:
                trace = hutchinson(op.matvec, op.dim, self.trace_probes, self.seed, op.dtype, op.device)
                block["trace"], block["trace_stderr"] = trace.trace, trace.stderr
                scalars[f"block/{name}/trace"] = trace.trace
            if self.density:
                block["slq"] = slq(op.matvec, op.dim, self.density_probes, self.density_steps, self.seed, op.dtype, op.device)
            blocks[name] = block
        merged, _ = merge_top_k([b["top"] for b in blocks.values()], k)
        scalars.update({f"block_diagonal_top{i + 1}": float(v) for i, v in enumerate(merged)})
        out["blocks"], out["block_diagonal_top"] = blocks, merged
        out["block_diagonal_density"] = None
        if self.density:
            rule = block_diagonal_slq([b["slq"] for b in blocks.values()])
            out["block_diagonal_density"] = density_band(rule.nodes, rule.weights, grid=out["density_grid"])

    def _ggn_split(self, view, loss_fn, batches, k, eig_kwargs, scalars, out) -> None:
        G = GGNOperator.from_view(view, loss_fn, batches)
        R = ResidualOperator.from_view(view, loss_fn, batches, hvp_mode=self._resolved_mode or self.hvp_mode, compile=self.compile)
        ggn = operator_eigsh(G, k=k, **eig_kwargs)
        res_top = operator_eigsh(R, k=1, **eig_kwargs)
        res_bottom = operator_eigsh(R, k=1, which="smallest", **eig_kwargs)
        scalars.update({f"ggn_top{i + 1}": float(v) for i, v in enumerate(ggn.eigenvalues)})
        scalars["residual_top1"], scalars["residual_bottom1"] = float(res_top.eigenvalues[0]), float(res_bottom.eigenvalues[0])
        if self.trace_probes:  # the same probes as tr H: tr G + tr R = tr H sample by sample
            ggn_trace = hutchinson(G.matvec, G.dim, self.trace_probes, self.seed, G.dtype, G.device)
            residual_trace = hutchinson(R.matvec, R.dim, self.trace_probes, self.seed, R.dtype, R.device)
            scalars["ggn_trace"], scalars["ggn_trace_stderr"] = ggn_trace.trace, ggn_trace.stderr
            scalars["residual_trace"], scalars["residual_trace_stderr"] = residual_trace.trace, residual_trace.stderr
        out["ggn_top"], out["ggn_residuals"], out["ggn_converged"] = ggn.eigenvalues, ggn.residuals, ggn.converged
        out["residual_extremes"] = torch.stack([res_top.eigenvalues[0], res_bottom.eigenvalues[0]])
        out["residual_extremes_residuals"] = torch.stack([res_top.residuals[0], res_bottom.residuals[0]])
        out["residual_extremes_converged"] = torch.stack([res_top.converged[0], res_bottom.converged[0]])
        out["unconverged"] += _unconverged("GGN top", ggn) + _unconverged("R top", res_top) + _unconverged("R bottom", res_bottom)

    def _warn_unconverged(self, tag: str, results: list[dict[str, Any]]) -> None:
        """One warning (rank 0) naming every run whose eigenpairs missed ``tol``, and what to raise."""
        notes = []
        for k, result in enumerate(results):
            member = f"member {k} " if len(results) > 1 else ""
            notes += [f"{member}{name}: {n} ({detail})" for name, n, detail in result["unconverged"]]
        if not notes:
            return
        cls = type(self).__name__
        rank_zero_warn(
            f"{cls} ({tag}): eigenvalues not converged to tol = {self.tol:g}: {'; '.join(notes)}. They may be off by up "
            f"to their residual and are flagged (converged = 0) in {tag}.npz. Raise {cls}.lanczos_steps (the product "
            f"budget, spent above) or {cls}.lanczos_basis (vectors kept between restarts), or loosen tol."
        )

    # --- files -----------------------------------------------------------------------------------
    def _save(self, trainer: pl.Trainer, tag: str, results: list[dict[str, Any]]) -> None:
        arrays = {
            "epoch": np.array(trainer.current_epoch),
            "step": np.array(trainer.global_step),
            "N": np.array(results[0]["N"]),
            "tol": np.array(self.tol),
            "eigenvalues": _stack([r["top"] for r in results]),
            "ritz_residuals": _stack([r["residuals"] for r in results]),
            "converged": _stack([r["converged"] for r in results]),
            "bottom_eigenvalues": _stack([r["bottom"] for r in results]),
            "bottom_ritz_residuals": _stack([r["bottom_residuals"] for r in results]),
            "bottom_converged": _stack([r["bottom_converged"] for r in results]),
            "outliers": np.array([r["scalars"]["outliers"] for r in results]),
        }
        if self.trace_probes:
            arrays["trace"] = np.array([r["scalars"]["trace"] for r in results])
            arrays["trace_stderr"] = np.array([r["scalars"]["trace_stderr"] for r in results])
            arrays["trace_probes"] = np.array(self.trace_probes)
        if self.density:
            arrays["density_probes"] = np.array(self.density_probes)
            arrays["density_nodes"] = _stack([r["nodes"] for r in results])
            arrays["density_weights"] = _stack([r["weights"] for r in results])
            arrays["density_moment_orders"] = np.array(MOMENT_ORDERS)
            arrays["density_moments"] = _stack([r["moments"] for r in results])
            arrays["density_moment_stderr"] = _stack([r["moment_stderr"] for r in results])
            arrays["density_grid"] = _stack([r["density_grid"] for r in results])
            arrays["density"] = _stack([r["density"] for r in results])
            arrays["density_stderr"] = _stack([r["density_stderr"] for r in results])
        if self.ggn_split:
            arrays["ggn_eigenvalues"] = _stack([r["ggn_top"] for r in results])
            arrays["ggn_ritz_residuals"] = _stack([r["ggn_residuals"] for r in results])
            arrays["ggn_converged"] = _stack([r["ggn_converged"] for r in results])
            arrays["residual_extremes"] = _stack([r["residual_extremes"] for r in results])
            arrays["residual_extremes_ritz_residuals"] = _stack([r["residual_extremes_residuals"] for r in results])
            arrays["residual_extremes_converged"] = _stack([r["residual_extremes_converged"] for r in results])
        if self.exact:
            arrays["exact_eigenvalues"] = _stack([r["exact"] for r in results])
        if results[0]["blocks"]:
            arrays.update(_block_arrays(results))
        self.save_npz(trainer, f"{tag}.npz", **arrays)

    def _plot(self, trainer: pl.Trainer, member: int, tag: str, filename: str) -> str:
        entries = [h for h in self.history if h["member"] == member]
        current = entries[-1]
        start = next((h for h in entries if h["tag"] == FIT_START), None)
        shown = [start, current] if start is not None and start is not current else [current]
        path = os.path.join(self.output_dir(trainer), filename)
        return plots.save_figure(plots.plot_hessian_spectra(shown, self.outlier_ratio), path, dpi=110, tight=False)

    def _plot_blocks(self, trainer: pl.Trainer, result: dict[str, Any], filename: str) -> str:
        """The full spectrum against diag(H_bb), and each block's lambda_1 and tr/N_b (``plots``)."""
        full = {"top": result["top"].numpy(), "grid": None}
        diagonal = {"top": result["block_diagonal_top"].numpy(), "grid": None}
        if result["block_diagonal_density"] is not None:
            full.update(grid=result["density_grid"].numpy(), density=result["density"].numpy())
            grid, phi, _ = result["block_diagonal_density"]
            diagonal.update(grid=grid.numpy(), density=phi.numpy())
        blocks = {n: {"top": b["top"].numpy(), "trace": b.get("trace"), "dim": b["dim"]} for n, b in result["blocks"].items()}
        path = os.path.join(self.output_dir(trainer), filename)
        return plots.save_figure(plots.plot_block_spectra(full, blocks, diagonal, result["N"]), path)

    # --- gradient in the top subspace (issue 10) ---------------------------------------------------
    def on_train_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: "StepRecord") -> None:
        """Before the update of step t (called by the Task; ``.grad`` holds the step's gradient):
        the base's step schedule, then the subspace measurement when ``subspace_steps`` is due."""
        super().on_train_step(trainer, pl_module, record)
        if self.subspace_steps.due(record.index):
            with analysis_context(pl_module):
                self._measure_subspace(trainer, pl_module, record.index)
            self.subspace_steps.mark(record.index)

    def _measure_subspace(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        view = pl_module.functional_view()
        batches = self._batches(trainer)
        K = view.ensemble_size
        metrics: dict[str, float] = {}
        for k in range(K):
            member = view.member(k)
            H = self._hessian(member, pl_module.loss_fn, batches)
            dim = min(self.subspace_k or int(pl_module.num_outputs), H.dim)
            U, overlap, refreshed, unconverged = self._subspace(H, k, dim, step)
            _, g_full = H.loss_and_gradient()
            g_batch = _minibatch_gradient(view, k)
            row = {
                "step": step,
                "epoch": trainer.current_epoch,
                "member": k,
                "fraction_full": subspace_fraction(g_full, U),
                "fraction_batch": subspace_fraction(g_batch, U) if g_batch is not None else math.nan,
                "overlap": overlap,
                "refreshed": refreshed,
                "unconverged": unconverged,
            }
            self.subspace_history.append(row)
            suffix = member_suffix(k, K)
            for key in ("fraction_full", "fraction_batch", "overlap"):
                if not math.isnan(row[key]):
                    metrics[f"subspace_{key}{suffix}"] = row[key]
        self.log_metrics(trainer, pl_module, metrics)

    def _subspace(self, H: HessianOperator, member: int, dim: int, step: int) -> tuple[Tensor, float, bool, int]:
        """Top-``dim`` Ritz vectors, reused while fresh enough; overlap with the previous set.

        Returns ``(U, overlap, refreshed, unconverged)``: ``refreshed`` when U was computed at this
        step (here or by a scheduled analysis at the same step); the overlap with the last
        refreshed U is measured only then (NaN otherwise, and at the first measurement);
        ``unconverged`` counts the Ritz pairs computed here that missed ``tol`` (the first time,
        one warning on rank 0, not one per rank: ``_warn_subspace_unconverged``).
        """
        cached = self._ritz.get(member)
        reusable = (
            cached is not None
            and cached[1].shape[1] >= dim
            and step - cached[0] < self.subspace_refresh_every_n_steps
        )
        unconverged = 0
        if not reusable:
            top = operator_eigsh(H, k=dim, max_steps=self.lanczos_steps, tol=self.tol, seed=self.seed, warn=False)
            unconverged = int((~top.converged).sum())
            if unconverged:
                self._warn_subspace_unconverged(step, top)
            cached = self._ritz[member] = (step, top.eigenvectors, top.eigenvalues)
        U = cached[1][:, :dim]
        refreshed = cached[0] == step
        overlap = math.nan
        if refreshed:
            previous = self._previous_vectors.get(member)
            if previous is not None:
                overlap = subspace_overlap(previous, U)
            self._previous_vectors[member] = U
        return U, overlap, refreshed, unconverged

    def _warn_subspace_unconverged(self, step: int, top: EigenResult) -> None:
        """Once per run, on rank 0: the subspace's eigenvectors missed ``tol`` (later ones are counted)."""
        if self._subspace_warned:
            return
        self._subspace_warned = True
        cls = type(self).__name__
        (_, missing, detail), = _unconverged("subspace", top)
        rank_zero_warn(
            f"{cls} (subspace, step {step}): {missing} top eigenvectors not converged to tol = {self.tol:g} ({detail}); "
            f"the fractions use them as they are. Later ones are counted in subspace.npz (unconverged), not warned "
            f"about. Raise {cls}.lanczos_steps or loosen tol."
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the last epoch: the fit-end analysis, then the subspace series and its plot."""
        super().on_train_end(trainer, pl_module)
        if self.subspace_every_n_steps is None or not self.subspace_history:
            return
        if not trainer.is_global_zero:
            return
        rows = self.subspace_history
        self.save_npz(
            trainer,
            "subspace.npz",
            **{key: np.array([r[key] for r in rows]) for key in ("step", "epoch", "member", "fraction_full", "fraction_batch", "overlap", "refreshed", "unconverged")},
        )
        if self.plot:
            path = os.path.join(self.output_dir(trainer), "subspace_overlap.png")
            plots.save_figure(plots.plot_gradient_subspace(rows), path, dpi=110)
            self.log_image(trainer, "subspace_overlap", path)

    # --- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "subspace_history": self.subspace_history, "subspace_last_step": self.subspace_steps.last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.subspace_history = list(state_dict.get("subspace_history", []))
        # Checkpoints from before the shared schedule have only the history: its last step.
        last = max((h["step"] for h in self.subspace_history), default=-1)
        self.subspace_steps.last = int(state_dict.get("subspace_last_step", last))


# --- helpers ---------------------------------------------------------------------------------------
#: SLQ moments tr(H^j) / N saved with their standard errors.
MOMENT_ORDERS = [1, 2, 3, 4]


def _unconverged(name: str, result: EigenResult) -> list[tuple[str, int, str]]:
    """``[(name, how many, detail)]`` when some of ``result``'s eigenpairs did not converge, else []."""
    missing = int((~result.converged).sum())
    if not missing:
        return []
    worst = float(result.relative_residuals.max())
    return [(name, missing, f"of {result.eigenvalues.numel()}, relative residual up to {worst:.1e} after {result.num_matvecs} products")]


def _minibatch_gradient(view, member: int) -> Optional[Tensor]:
    """The training step's gradient of one member from ``.grad`` (None before any backward)."""
    grads = []
    for p in view.params.values():
        if p.grad is None:
            return None
        grads.append((p.grad[member] if view.ensemble_size > 1 else p.grad).reshape(-1))
    return torch.cat(grads).detach()


def _stack(arrays: list[Optional[Tensor]]) -> np.ndarray:
    """Stack per-member 1-D or 2-D arrays along a leading K axis, padding with NaN."""
    arrays = [np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float64) for a in arrays]
    shape = tuple(max(a.shape[d] for a in arrays) for d in range(arrays[0].ndim))
    out = np.full((len(arrays), *shape), np.nan)
    for k, a in enumerate(arrays):
        out[(k, *tuple(slice(0, s) for s in a.shape))] = a
    return out


def _block_arrays(results: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-block arrays of the .npz: leading member axis K, then the block axis B (NaN-padded)."""
    names = list(results[0]["blocks"])

    def per_block(key: str) -> np.ndarray:
        return _stack([_stack([r["blocks"][n][key] for n in names]) for r in results])

    arrays = {
        "block_names": np.array(names),
        "block_sizes": np.array([results[0]["blocks"][n]["dim"] for n in names]),
        "block_eigenvalues": per_block("top"),
        "block_ritz_residuals": per_block("residuals"),
        "block_converged": per_block("converged"),
        "block_diagonal_eigenvalues": _stack([r["block_diagonal_top"] for r in results]),
    }
    if "trace" in results[0]["blocks"][names[0]]:
        arrays["block_trace"] = np.array([[r["blocks"][n]["trace"] for n in names] for r in results])
        arrays["block_trace_stderr"] = np.array([[r["blocks"][n]["trace_stderr"] for n in names] for r in results])
    if results[0]["block_diagonal_density"] is not None:
        arrays["block_density_nodes"] = _stack([_stack([r["blocks"][n]["slq"].nodes for n in names]) for r in results])
        arrays["block_density_weights"] = _stack([_stack([r["blocks"][n]["slq"].weights for n in names]) for r in results])
        for i, key in enumerate(("grid", "", "stderr")):
            name = "block_diagonal_density" + (f"_{key}" if key else "")
            arrays[name] = _stack([r["block_diagonal_density"][i] for r in results])
    return arrays


def _histogram_samples(result: dict[str, Any]) -> np.ndarray:
    """Values whose histogram looks like the spectrum: exact eigenvalues, else SLQ nodes each
    repeated in proportion to its weight (1000 samples per probe), else the top eigenvalues."""
    if result["exact"] is not None:
        return result["exact"].numpy()
    if result["nodes"] is not None:
        nodes, weights = result["nodes"].numpy().ravel(), result["weights"].numpy().ravel()
        return np.repeat(nodes, np.maximum(np.round(weights * 1000), 0).astype(int))
    return result["top"].numpy()
