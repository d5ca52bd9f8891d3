"""Curvature engine: Hessian, GGN and residual operators, Lanczos, SLQ (no Lightning inside).

Operators (``HessianOperator``, ``GGNOperator``, ``ResidualOperator``) are matrix-free symmetric
N x N matrices of the empirical risk ``1/P sum_i l(f(theta; x_i), y_i)`` over a list of batches;
under DDP each rank passes its shard and every rank gets the single-process product. The
algorithms take any ``v -> A v``: ``eigsh``/``top_k``/``bottom_k``/``warm_eigsh`` (thick-restart
Lanczos, full reorthogonalisation, residual and ``converged`` flag per eigenvalue), ``slq`` +
``density``/``density_band``/``moments``/``moment_stderr``/``histogram`` (spectral density with
probe-to-probe standard errors), ``hutchinson`` (trace, with its standard error),
``dense_hessian``/``dense_ggn``/``eigvalsh`` (small-N oracles), ``subspace_fraction``/
``subspace_overlap`` (gradient in the top subspace), ``track_top_k`` with the stability
thresholds, ``adam_preconditioner`` and ``PreconditionedOperator`` (sharpness through training),
and ``parameter_blocks``/``BlockOperator`` (diagonal blocks, per-layer spectra). See
docs/curvature.md.
"""

from overparam.curvature._base import CurvatureOperator
from overparam.curvature.blocks import BlockOperator, block_diagonal_slq, block_indices, merge_top_k, parameter_blocks
from overparam.curvature.exact import dense_ggn, dense_hessian, eigvalsh
from overparam.curvature.ggn import GGNOperator
from overparam.curvature.hessian import HessianOperator
from overparam.curvature.hvp import HVP_MODES, HVPChooser, make_batch_hvp, missing_forward_ad
from overparam.curvature.lanczos import (
    ConvergenceWarning,
    EigenResult,
    LanczosResult,
    bottom_k,
    eigsh,
    lanczos,
    operator_eigsh,
    top_k,
    warm_eigsh,
)
from overparam.curvature.residual import ResidualOperator
from overparam.curvature.sharpness import (
    PreconditionedOperator,
    Tracked,
    adam_preconditioner,
    adam_threshold,
    sgd_threshold,
    track_top_k,
)
from overparam.curvature.slq import SLQResult, density, density_band, histogram, moment_stderr, moments, slq
from overparam.curvature.subspace import subspace_fraction, subspace_overlap
from overparam.curvature.trace import TraceEstimate, hutchinson

__all__ = [
    "BlockOperator",
    "ConvergenceWarning",
    "CurvatureOperator",
    "EigenResult",
    "GGNOperator",
    "HVPChooser",
    "HVP_MODES",
    "HessianOperator",
    "LanczosResult",
    "PreconditionedOperator",
    "ResidualOperator",
    "SLQResult",
    "TraceEstimate",
    "Tracked",
    "adam_preconditioner",
    "adam_threshold",
    "block_diagonal_slq",
    "block_indices",
    "bottom_k",
    "dense_ggn",
    "dense_hessian",
    "density",
    "density_band",
    "eigsh",
    "eigvalsh",
    "histogram",
    "hutchinson",
    "lanczos",
    "make_batch_hvp",
    "merge_top_k",
    "missing_forward_ad",
    "moment_stderr",
    "moments",
    "operator_eigsh",
    "parameter_blocks",
    "sgd_threshold",
    "slq",
    "subspace_fraction",
    "subspace_overlap",
    "top_k",
    "track_top_k",
    "warm_eigsh",
]
