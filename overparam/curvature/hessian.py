"""The Hessian of the empirical risk as a matrix-free operator.

    H = d^2/dtheta^2 L(theta),   L(theta) = 1/P sum_{i=1}^P l(f(theta; x_i), y_i),

with the sum over the analysis data (all ranks) and c = 1/P applied once after the
all-reduce. Each batch contributes ``H_B v`` by one of the HVP paths of ``hvp.py``.

Example (a linear model with the summed-over-outputs squared loss has H = X^T X / P per output)::

    >>> import torch
    >>> from overparam.losses import mse
    >>> X, Y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    >>> fn = lambda p, b, x: x @ p["w"]
    >>> H = HessianOperator(fn, {"w": torch.zeros(3, 1, dtype=torch.float64)}, mse, [(X, Y)])
    >>> torch.allclose(H.to_dense(), X.T @ X / 8)
    True
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from overparam.curvature._base import CurvatureOperator
from overparam.curvature.hvp import HVP_MODES, _probe, default_candidates, make_batch_hvp
from overparam.functional import Params


class HessianOperator(CurvatureOperator):
    """``H v`` over a list of batches; see ``CurvatureOperator`` for the common arguments.

    Args:
        hvp_mode: ``auto`` (time the candidates on the first batch, keep the fastest),
            ``forward_over_reverse``, ``compiled`` or ``double_backward`` (see ``hvp.py``).
        compile: whether ``auto`` also tries ``compiled`` (default: on CUDA only).

    Attributes:
        hvp_mode: the mode in use (``auto`` resolved).
        hvp_timings: seconds per candidate from the probe (empty unless ``auto``).
    """

    def __init__(self, *args, hvp_mode: str = "auto", compile: Optional[bool] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode must be one of {', '.join(HVP_MODES)}; got {hvp_mode!r}")
        self.hvp_timings: dict[str, float] = {}
        built: dict = {}
        if hvp_mode == "auto":
            hvp_mode, built = self._probe(default_candidates(self.device, compile))
        self.hvp_mode = hvp_mode
        # The probe's function is reused: a compiled one is not compiled twice.
        self._hvp = built.get(hvp_mode) or make_batch_hvp(self.batch_loss, hvp_mode)

    def _probe(self, candidates: tuple[str, ...]) -> tuple[str, dict]:
        built: dict = {}
        best = candidates[0]  # an empty shard: any mode gives zeros; agree on rank 0's choice
        if self.batches:
            x, y = self.batches[0]
            best, self.hvp_timings, built = _probe(self.batch_loss, self.params, x, y, candidates, 1)
        # Under DDP ranks must agree (timings differ by rank): rank 0's choice wins.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            choice = [best]
            torch.distributed.broadcast_object_list(choice, src=0)
            best = choice[0]
        return best, built

    def _matvec_batch(self, v: Params, x: Tensor, y: Tensor) -> Params:
        return self._hvp(self.params, v, x, y)
