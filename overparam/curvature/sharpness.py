"""Sharpness through training: top eigenvalues against the optimizer's stability threshold.

**Stability thresholds.** On a quadratic with Hessian H, gradient descent theta <- theta - eta g
is stable iff the sharpness lambda_1(H) < 2 / eta. Cohen et al. (2021, "Gradient descent on
neural networks typically occurs at the edge of stability") found that full-batch GD on a
network raises lambda_1 (progressive sharpening) until it reaches 2 / eta, then hovers there
while the loss keeps falling non-monotonically. For torch's SGD the same quadratic gives
(``sgd_threshold``, derived from the characteristic polynomial of the recurrence, as in Cohen
et al. 2021, Appendix for momentum):

* heavy-ball momentum beta with dampening d (``buf <- beta buf + (1 - d) g``, ``theta -= eta buf``):
  stable iff lambda_1 < (2 + 2 beta) / ((1 - d) eta);
* Nesterov (d = 0, ``theta -= eta (g + beta buf)``): stable iff lambda_1 < (2 + 2 beta) / ((1 + 2 beta) eta).

**Adam** (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability", Section 2)
updates theta <- theta - eta P^-1 m with m = EMA_beta1(g) and the diagonal preconditioner

    P = (1 - beta1^t) (diag(sqrt(v_t / (1 - beta2^t))) + eps I),   v_t = EMA_beta2(g^2)

(``adam_preconditioner``; the first factor is m's bias correction folded into P). With P frozen
this is heavy-ball momentum on P^-1 H with step (1 - beta1) eta, stable iff the *preconditioned
sharpness* lambda_1(P^-1 H) < (2 + 2 beta1) / ((1 - beta1) eta) = 38 / eta for beta1 = 0.9
(``adam_threshold``); full-batch Adam holds it there (the adaptive edge of stability).
P^-1 H is similar to the symmetric P^-1/2 H P^-1/2 (same eigenvalues), which Lanczos can use
(``PreconditionedOperator``).

**Tracking** (``track_top_k``): the top-k are measured every few steps by Lanczos warm-started from
the previous measurement's Ritz vectors (``lanczos.warm_eigsh``), and the overlap
||U_prev^T U||_F^2 / k of successive top-k eigenvectors (1: the same subspace) says how far they
turned (Gur-Ari et al. 2018's overlap, ``subspace.subspace_overlap``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from overparam.curvature.lanczos import EigenResult, MatVec, eigsh, warm_eigsh
from overparam.curvature.subspace import subspace_overlap

#: Relative Ritz residual at which a tracked eigenvalue counts as converged. Default 1e-2: the
#: value is then within 1% of lambda_1 of an eigenvalue (Kahan's bound) and, measured against a
#: float64 Lanczos along MNIST-FC's SGD training every 16 steps (``benchmarks/sharpness.py
#: --variants``, docs/curvature.md), within 1.2e-4 of lambda_1 (residual^2 / gap) for 6.4 products
#: per measurement; 1e-3 took 8.3 products for errors of 1.4e-6.
TRACK_TOL = 1e-2


def sgd_threshold(lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    """The largest stable sharpness of torch's SGD on a quadratic (module docstring).

    ``2 / lr`` without momentum; ``(2 + 2 beta) / ((1 - d) lr)`` with heavy-ball momentum beta and
    dampening d; ``(2 + 2 beta) / ((1 + 2 beta) lr)`` with Nesterov momentum (d = 0 in torch).
    """
    if nesterov:
        return (2 + 2 * momentum) / ((1 + 2 * momentum) * lr)
    return (2 + 2 * momentum) / ((1 - dampening) * lr)


def adam_threshold(lr: float, beta1: float) -> float:
    """``(2 + 2 beta1) / ((1 - beta1) lr)``: 38 / lr for beta1 = 0.9 (Cohen et al. 2022)."""
    return (2 + 2 * beta1) / ((1 - beta1) * lr)


def adam_preconditioner(exp_avg_sq: Tensor, step: float, beta1: float, beta2: float, eps: float) -> Tensor:
    """P = (1 - beta1^t) (sqrt(v_t / (1 - beta2^t)) + eps), elementwise (Cohen et al. 2022, Section 2).

    Args:
        exp_avg_sq: v_t, Adam's ``exp_avg_sq`` (``max_exp_avg_sq`` for AMSGrad) after t updates.
        step: t, the updates that built it (Adam's ``state["step"]``), at least 1.
        beta1, beta2, eps: the optimizer's hyperparameters.
    """
    if step < 1:
        raise ValueError(f"Adam's preconditioner needs at least one update (step >= 1); got step {step}")
    return (1 - beta1**step) * ((exp_avg_sq / (1 - beta2**step)).sqrt() + eps)


class PreconditionedOperator:
    """``v -> P^-1/2 A P^-1/2 v``: similar to P^-1 A (the same eigenvalues), and symmetric.

    Args:
        operator: a symmetric operator (``matvec``, ``dim``, ``dtype``, ``device``).
        diagonal: P's diagonal (N,), positive, in the operator's flat layout.

    Example (a diagonal A: the eigenvalues of P^-1 A are a_i / p_i)::

        >>> import torch
        >>> from overparam.curvature import eigsh
        >>> class Diag:
        ...     dim, dtype, device = 3, torch.float64, torch.device("cpu")
        ...     def matvec(self, v): return torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64) * v
        >>> op = PreconditionedOperator(Diag(), torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64))
        >>> round(float(eigsh(op.matvec, 3, 1, dtype=torch.float64, tol=1e-12).eigenvalues[0]), 6)
        4.0
    """

    SELF_ADJOINT = True

    def __init__(self, operator, diagonal: Tensor) -> None:
        if diagonal.shape != (operator.dim,):
            raise ValueError(f"preconditioner diagonal must have shape ({operator.dim},). Got {tuple(diagonal.shape)}.")
        if not bool((diagonal > 0).all()):
            raise ValueError("preconditioner diagonal must be positive")
        self.operator = operator
        self.dim, self.dtype, self.device = operator.dim, operator.dtype, operator.device
        self.inv_sqrt = diagonal.to(device=self.device, dtype=self.dtype).rsqrt()

    def matvec(self, v: Tensor) -> Tensor:
        return self.inv_sqrt * self.operator.matvec(self.inv_sqrt * v)


@dataclass
class Tracked:
    """One tracked measurement.

    Attributes:
        result: the ``EigenResult`` (values, Ritz vectors, residuals, converged flags, products).
        overlap: ||U_prev^T U||_F^2 / k with the previous measurement's vectors (NaN at the first).
        warm: whether Lanczos started from the previous vectors.
    """

    result: EigenResult
    overlap: float
    warm: bool


def track_top_k(
    matvec: MatVec,
    dim: int,
    k: int,
    previous: Optional[EigenResult] = None,
    tol: float = TRACK_TOL,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **kwargs,
) -> Tracked:
    """The top-k eigenpairs, warm-started from ``previous`` when it fits (same k and N).

    Args:
        matvec: ``v -> A v`` of the operator now.
        dim, k: N and the number of eigenpairs.
        previous: the last measurement's result (with eigenvectors), or None: a cold start from the
            seeded Gaussian vector.
        tol: relative Ritz residual (default ``TRACK_TOL``).
        dtype, device: of the vectors.
        **kwargs: ``eigsh``'s ``max_steps``, ``max_basis``, ``seed``, ``warn``.
    """
    warm = previous is not None and previous.eigenvectors is not None and previous.eigenvectors.shape == (dim, k)
    if warm:
        result = warm_eigsh(matvec, previous, tol=tol, **kwargs)
        return Tracked(result, subspace_overlap(previous.eigenvectors, result.eigenvectors), True)
    result = eigsh(matvec, dim, k, tol=tol, dtype=dtype, device=device, **kwargs)
    return Tracked(result, math.nan, False)
