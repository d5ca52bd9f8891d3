"""The residual of the Gauss-Newton split: R = H - G.

    R = 1/P sum_i sum_c (dl/df_c)(f_i, y_i) grad^2 f_c(theta; x_i),

the part of the Hessian that carries the network's own curvature weighted by the loss
gradient (Papyan 2019, 2020; Sagun et al. 2017, "Empirical analysis of the Hessian of
over-parametrized neural networks"). It vanishes for a linear model and at an interpolating
minimum of the squared loss, and it holds the Hessian's negative eigenvalues. Per batch it is
computed as ``H_B v - G_B v`` with the same HVP path as ``HessianOperator``.
"""

from __future__ import annotations

from torch import Tensor

from overparam.curvature.ggn import GGNOperator
from overparam.curvature.hessian import HessianOperator
from overparam.functional import Params


class ResidualOperator(HessianOperator):
    """``(H - G) v`` over a list of batches (arguments as ``HessianOperator``)."""

    def __init__(self, *args, reverse: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ggn = GGNOperator(self.fn, self.params, self.loss_fn, self.batches, buffers=self.buffers, reverse=reverse)

    def _matvec_batch(self, v: Params, x: Tensor, y: Tensor) -> Params:
        hv = super()._matvec_batch(v, x, y)
        gv = self._ggn._matvec_batch(v, x, y)
        return {n: hv[n] - gv[n] for n in hv}
