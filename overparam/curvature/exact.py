"""Dense oracles for small N: the exact Hessian, GGN and their spectra by ``eigvalsh``.

Built directly with ``torch.func`` (``hessian``, ``jacrev``), independently of the matrix-free
operators, so tests compare two computations (curvlinops' ``examples/functorch.py``). Memory
is O(N^2) (and O(B C N) for the Jacobian): meant for N up to a few thousand.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from overparam.curvature._base import Batch, LossFn, cast_point
from overparam.distributed import all_reduce_sum, total_count
from overparam.functional import NetFn, Params, flatten, unflatten
from overparam.progress import Progress, track


def _flat_setup(params: Params, buffers: Optional[Params], batches: Sequence[Batch], dtype: Optional[torch.dtype]):
    like, buffers, batches, _ = cast_point(params, buffers, batches, dtype)
    return like, buffers, batches, flatten(like)


#: Hessian columns computed per vmapped call: ``jacfwd`` would take all N at once, with N
#: copies of the batch's activations (gigabytes at N = 5,000); 256 bound that and give progress.
COLUMNS_PER_CALL = 256


def dense_hessian(
    fn: NetFn,
    params: Params,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    buffers: Optional[Params] = None,
    dtype: Optional[torch.dtype] = None,
    progress: Optional[Progress] = None,
) -> Tensor:
    """The N x N Hessian of ``1/P sum_i l(f(theta; x_i), y_i)`` by ``jacfwd(grad(L))``.

    Not ``torch.func.hessian`` (``jacfwd(jacrev(L))``): differentiating through ``jacrev`` (a vjp
    vmapped over the basis) of a LayerNorm with an affine weight gives a wrong, non-symmetric
    matrix in torch 2.14 (``jacrev(jacrev(L))`` too; cf. functorch issue #534 on LayerNorm's
    batched backward), while ``jacfwd`` of the plain ``grad`` is exact: ``tests/test_transformer.py``
    checks it against finite differences and double-backward products with LayerNorm on.
    ``jacfwd`` is ``vmap`` of ``jvp`` over the basis vectors; here it runs ``COLUMNS_PER_CALL``
    basis vectors at a time, each block reported to ``progress`` (None: silent).
    """
    like, buffers, batches, theta = _flat_setup(params, buffers, batches, dtype)

    def batch_loss(flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(fn(unflatten(flat, like), buffers, x), y, reduction="sum")

    N = theta.numel()
    H = torch.zeros(N, N, dtype=theta.dtype, device=theta.device)
    blocks = torch.arange(N, device=theta.device).split(COLUMNS_PER_CALL)
    report = track(progress, len(batches) * len(blocks), "column blocks")
    for x, y in batches:
        gradient = functools.partial(torch.func.grad(batch_loss), x=x, y=y)
        for columns in blocks:
            basis = torch.zeros(len(columns), N, dtype=theta.dtype, device=theta.device)
            basis[torch.arange(len(columns)), columns] = 1.0
            H[:, columns] += torch.func.vmap(lambda v: torch.func.jvp(gradient, (theta,), (v,))[1])(basis).T
            report.update()
    report.finish()
    all_reduce_sum(H)
    return H / total_count(sum(x.shape[0] for x, _ in batches), theta.device)


def dense_ggn(
    fn: NetFn,
    params: Params,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    buffers: Optional[Params] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``1/P sum_i J_i^T l''_i J_i`` from the dense Jacobian and per-sample output Hessians."""
    like, buffers, batches, theta = _flat_setup(params, buffers, batches, dtype)
    G = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype, device=theta.device)
    for x, y in batches:
        f = fn(like, buffers, x)  # (B, C)
        J = torch.func.jacrev(lambda flat: fn(unflatten(flat, like), buffers, x))(theta)  # (B, C, N)

        def sample_loss(o: Tensor, t: Tensor) -> Tensor:
            return loss_fn(o[None], t[None], reduction="sum")

        L2 = torch.func.vmap(torch.func.hessian(sample_loss))(f.detach(), y)  # (B, C, C)
        G += torch.einsum("bcn,bcd,bdm->nm", J, L2, J)
    all_reduce_sum(G)
    return G / total_count(sum(x.shape[0] for x, _ in batches), theta.device)


def eigvalsh(matrix: Tensor) -> Tensor:
    """Eigenvalues in descending order (float64), the oracle for top-k tests."""
    return torch.linalg.eigvalsh(matrix.to(torch.float64)).flip(0)
