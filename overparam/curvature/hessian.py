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

from torch import Tensor

from overparam.curvature._base import CurvatureOperator
from overparam.curvature.hvp import DEFAULT_CACHE_BYTES, HVP_MODES, HVPChooser, default_candidates, make_batch_hvp, timed_product
from overparam.functional import Params


class HessianOperator(CurvatureOperator):
    """``H v`` over a list of batches; see ``CurvatureOperator`` for the common arguments.

    Nothing is computed at construction: the HVP path is built, and for ``auto`` chosen, by the
    products themselves (curvlinops' operators likewise do no work until the first product), so
    an error in the model or the data surfaces from the first product with its own message.

    Args:
        hvp_mode: ``auto`` (the first products try each candidate in turn, timed; the fastest is
            kept: ``HVPChooser``), ``forward_over_reverse``, ``compiled`` or ``double_backward``
            (see ``hvp.py``).
        compile: whether ``auto`` also tries ``compiled`` (default: on CUDA only).
        cache_bytes: memory ``double_backward`` may keep for its per-batch gradient graphs
            (default 1 GiB, ``hvp.DEFAULT_CACHE_BYTES``); the operator holds them until it is
            dropped.

    Attributes:
        hvp_timings: seconds of one product per candidate (empty unless ``auto``).
    """

    def __init__(
        self, *args, hvp_mode: str = "auto", compile: Optional[bool] = None, cache_bytes: int = DEFAULT_CACHE_BYTES, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode must be one of {', '.join(HVP_MODES)}; got {hvp_mode!r}")
        self._chooser: Optional[HVPChooser] = None
        if hvp_mode == "auto":
            self._chooser = HVPChooser(self.batch_loss, default_candidates(self.device, compile), cache_bytes)
            self._hvp = self._chooser
        else:
            self._hvp = make_batch_hvp(self.batch_loss, hvp_mode, cache_bytes)
        self._fixed_mode = hvp_mode

    @property
    def hvp_mode(self) -> str:
        """The mode in use: the fixed one, the one ``auto`` chose, or ``auto`` while choosing."""
        if self._chooser is None:
            return self._fixed_mode
        return self._chooser.mode or "auto"

    @property
    def hvp_timings(self) -> dict[str, float]:
        return dict(self._chooser.timings) if self._chooser is not None else {}

    def matvec(self, v: Tensor) -> Tensor:
        """``H v``; while ``auto`` is choosing, each product is timed for the choice."""
        if self._chooser is None or self._chooser.mode is not None:
            return super().matvec(v)
        product = super().matvec
        out, seconds = timed_product(lambda: product(v), self.device)
        self._chooser.record(seconds)
        return out

    def _matvec_batch(self, v: Params, x: Tensor, y: Tensor) -> Params:
        return self._hvp(self.params, v, x, y)
