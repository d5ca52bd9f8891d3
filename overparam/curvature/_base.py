"""The one base every curvature operator shares: data loop, flat vectors, 1/P, all-reduce.

An operator represents a symmetric N x N matrix ``A`` of the empirical risk

    L(theta) = 1/P sum_{i=1}^P l(f(theta; x_i), y_i),

where the sum runs over the analysis data (a list of ``(x, y)`` batches; under DDP each rank
holds a disjoint shard) and P is the total number of points over all ranks. Subclasses supply
one per-batch product ``_matvec_batch(v, x, y) = sum_{i in batch} A_i v`` (a params-shaped
dict, summed over the batch, not averaged); this class

* turns flat vectors into params-shaped dicts and back (``overparam.functional``),
* sums the per-batch products, all-reduces the sum (``overparam.distributed``) and divides
  by P last, so every rank holds the single-process answer (torchmetrics' "reduce sums"),
* exposes ``matvec``/``matmat``/``@``, a dense ``to_dense`` for small N and a SciPy
  ``LinearOperator`` (``to_scipy``).

The layout follows curvlinops' ``_torch_base.py`` (Dangel et al.), with the functional view's
``fn(params, buffers, x)`` in place of an ``nn.Module``. The network is evaluated exactly as
``fn`` evaluates it: callbacks put modules in eval mode first, so BatchNorm uses its running
statistics and the operator is a fixed matrix (not one that changes with the batch split).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from overparam.distributed import all_reduce_sum, total_count
from overparam.functional import FunctionalView, NetFn, Params, flatten, unflatten

LossFn = Callable[..., Tensor]
Batch = tuple[Tensor, Tensor]


def check_vector(v: Tensor, dim: int, device: torch.device) -> None:
    """Raise ValueError unless ``v`` is a vector (N,) or a matrix (N, m) on the operator's device
    (any floating dtype: products cast it to the operator's)."""
    if v.dim() not in (1, 2) or v.shape[0] != dim:
        raise ValueError(f"Input tensor must have shape ({dim},) or ({dim}, m), with m arbitrary. Got {tuple(v.shape)}.")
    if v.device != device:
        raise ValueError(f"Input tensor must be on {device}. Got {v.device}.")


def cast_batches(batches: Sequence[Batch], dtype: torch.dtype) -> list[Batch]:
    """Floating inputs and targets in the operator's dtype (labels stay integers)."""
    out = []
    for x, y in batches:
        x = x.to(dtype) if x.is_floating_point() else x
        y = y.to(dtype) if y.is_floating_point() else y
        out.append((x, y))
    return out


def cast_point(
    params: Params, buffers: Optional[Params], batches: Sequence[Batch], dtype: Optional[torch.dtype]
) -> tuple[Params, Params, list[Batch], torch.dtype]:
    """Detached params, buffers and batches in ``dtype`` (default: the params' dtype)."""
    dtype = dtype or next(iter(params.values())).dtype
    params = {n: p.detach().to(dtype) for n, p in params.items()}
    buffers = {n: (b.to(dtype) if b.is_floating_point() else b) for n, b in (buffers or {}).items()}
    return params, buffers, cast_batches(batches, dtype), dtype


class CurvatureOperator:
    """Matrix-free symmetric operator ``A = 1/P sum_i A_i`` over a list of batches.

    Args:
        fn: ``fn(params, buffers, x) -> (B, C)`` outputs (a K = 1 functional view's ``fn``).
        params: the point theta at which the curvature is taken (detached, copied to ``dtype``).
        loss_fn: ``loss_fn(outputs, y, reduction)`` from ``overparam.losses``.
        batches: this rank's ``(x, y)`` chunks (``DataModule.analysis_batches()``).
        buffers: non-trainable state passed to ``fn`` (BatchNorm running statistics).
        dtype: working dtype (default: the params'); float64 gives reference values.

    Attributes:
        dim: N, the number of parameters.
        num_points: P, the number of points over all ranks.
    """

    SELF_ADJOINT = True
    #: the same data in the same order every call: products are deterministic (Lanczos needs it).
    FIXED_DATA_ORDER = True

    def __init__(
        self,
        fn: NetFn,
        params: Params,
        loss_fn: LossFn,
        batches: Sequence[Batch],
        buffers: Optional[Params] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        self.fn = fn
        self.loss_fn = loss_fn
        self.params, self.buffers, self.batches, self.dtype = cast_point(params, buffers, batches, dtype)
        self.device = next(iter(self.params.values())).device
        self.dim = sum(p.numel() for p in self.params.values())
        self.num_points = total_count(sum(x.shape[0] for x, _ in self.batches), self.device)
        if self.num_points == 0:
            raise ValueError("curvature operator needs at least one data point (got empty batches on every rank)")

    @classmethod
    def from_view(cls, view: FunctionalView, loss_fn: LossFn, batches: Sequence[Batch], **kwargs):
        """The operator of a K = 1 functional view at its current params."""
        if view.ensemble_size != 1:
            raise ValueError(f"curvature operators take a K = 1 view; use view.member(k) (K = {view.ensemble_size})")
        return cls(view.fn, view.params, loss_fn, batches, buffers=view.buffers, **kwargs)

    # --- what subclasses provide --------------------------------------------------------------
    def _matvec_batch(self, v: Params, x: Tensor, y: Tensor) -> Params:
        """``sum_{i in batch} A_i v`` as a params-shaped dict."""
        raise NotImplementedError

    # --- shared mechanics -----------------------------------------------------------------------
    def batch_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """``sum_{i in batch} l(f(params; x_i), y_i)`` (summed: 1/P is applied once, last)."""
        return self.loss_fn(self.fn(params, self.buffers, x), y, reduction="sum")

    def flatten(self, tensors: Params) -> Tensor:
        return flatten(tensors)

    def unflatten(self, v: Tensor) -> Params:
        return unflatten(v, self.params)

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a flat vector ``v`` of shape (N,); every rank gets the same result."""
        check_vector(v, self.dim, self.device)
        v_dict = self.unflatten(v.to(self.dtype))
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for x, y in self.batches:
                total += self.flatten(self._matvec_batch(v_dict, x, y)).detach()
        all_reduce_sum(total)
        return total.div_(self.num_points)

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for V of shape (N, m), column by column."""
        check_vector(V, self.dim, self.device)
        if V.dim() == 1:
            return self.matvec(V)
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matmat(other)

    def to_dense(self) -> Tensor:
        """The N x N matrix, by N products with unit vectors (small N only)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` in float64 (for ``eigsh`` and friends)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(x: "np.ndarray") -> "np.ndarray":
            v = torch.as_tensor(np.asarray(x).reshape(-1), device=self.device).to(self.dtype)
            return self.matvec(v).detach().to(torch.float64).cpu().numpy()

        return LinearOperator((self.dim, self.dim), matvec=mv, rmatvec=mv, dtype=np.float64)

    # --- first order, on the same data ----------------------------------------------------------
    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """``(L, grad L)``: the mean loss and the flat mean gradient over the data (all ranks)."""
        grad_fn = torch.func.grad_and_value(self.batch_loss)
        total = torch.zeros(self.dim + 1, dtype=self.dtype, device=self.device)
        for x, y in self.batches:
            g, loss = grad_fn(self.params, x, y)
            total[:-1] += self.flatten(g).detach()
            total[-1] += loss.detach()
        all_reduce_sum(total)
        total.div_(self.num_points)
        return float(total[-1]), total[:-1]
