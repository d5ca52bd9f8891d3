"""The generalised Gauss-Newton matrix (GGN) as a matrix-free operator.

    G = 1/P sum_i J_i^T (d^2 l / df^2)(f_i, y_i) J_i,   J_i = df(theta; x_i)/dtheta   (C x N),

the first term of the split of the Hessian of one sample's loss,

    grad^2 l = J^T l'' J  +  sum_c (dl/df_c) grad^2 f_c      (GGN + residual),

studied by Papyan (2019, "Measurements of three-level hierarchical structure in the outliers
in the spectrum of deepnet Hessians"; 2020, "Traces of class/cross-class structure pervade deep
learning spectra"): the outliers of the Hessian come from G. Per batch the product is
``J^T (l'' (J v))``: a ``jvp`` of the network, a Hessian-vector product of the loss in output
space (a ``jvp`` of its output gradient), and a ``vjp`` of the network. For networks whose
ops lack forward-mode AD, ``reverse=True`` forms ``J v`` by the double-vjp trick instead.
G is positive semi-definite for convex losses (cross-entropy, MSE, squared hinge).
"""

from __future__ import annotations

import torch
from torch import Tensor

from overparam.curvature._base import CurvatureOperator
from overparam.functional import Params


class GGNOperator(CurvatureOperator):
    """``G v`` over a list of batches; see ``CurvatureOperator`` for the common arguments.

    Args:
        reverse: form ``J v`` with two vjps instead of a jvp (ops without forward-mode AD).
    """

    def __init__(self, *args, reverse: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reverse = reverse

    def _net(self, x: Tensor):
        return lambda p: self.fn(p, self.buffers, x)

    def _jvp_net(self, v: Params, x: Tensor) -> tuple[Tensor, Tensor, object]:
        """``(f, J v, vjp_fn)`` at the operator's params."""
        f, vjp_fn = torch.func.vjp(self._net(x), self.params)
        if not self.reverse:
            _, Jv = torch.func.jvp(self._net(x), (self.params,), (v,))
            return f, Jv, vjp_fn
        # J v = d/du <J^T u, v>: the vjp is linear in u, so its vjp gives J v.
        _, inner_vjp = torch.func.vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(f))
        return f, inner_vjp(v)[0], vjp_fn

    def output_hvp(self, f: Tensor, y: Tensor, u: Tensor) -> Tensor:
        """``l''(f) u``: the Hessian of the summed loss in output space applied to ``u``."""
        grad_out = torch.func.grad(lambda o: self.loss_fn(o, y, reduction="sum"))
        return torch.func.jvp(grad_out, (f.detach(),), (u,))[1]

    def _matvec_batch(self, v: Params, x: Tensor, y: Tensor) -> Params:
        f, Jv, vjp_fn = self._jvp_net(v, x)
        return vjp_fn(self.output_hvp(f, y, Jv))[0]
