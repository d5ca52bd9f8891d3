"""The gradient's share of the top Hessian subspace, and how fast that subspace turns.

Gur-Ari, Roberts & Dyer (2018, "Gradient descent happens in a tiny subspace") observe that after
a short transient the gradient lies mostly in the span of the top-k Hessian eigenvectors,
k = the number of classes, and that this subspace changes slowly. With U (N x k) orthonormal
Ritz vectors of the k largest eigenvalues and P_k = U U^T:

* fraction in the subspace:  f = |P_k g|^2 / |g|^2 = |U^T g|^2 / |g|^2   (their Eq. 2),
* overlap of two subspaces:   o(U, V) = tr(P_U P_V) / k = ||U^T V||_F^2 / k   (their Eq. 3),

f = 1 and o = 1 for k = N; for random subspaces E[f] = k / N and E[o] = k / N.
"""

from __future__ import annotations

import torch
from torch import Tensor


def subspace_fraction(g: Tensor, U: Tensor) -> float:
    """``|U^T g|^2 / |g|^2`` for orthonormal columns U (N x k); 0 for a zero gradient."""
    g64 = g.to(torch.float64)
    norm2 = float(g64.square().sum())
    if norm2 == 0.0:
        return 0.0
    proj = U.to(torch.float64).T @ g64
    return float(proj.square().sum()) / norm2


def subspace_overlap(U: Tensor, V: Tensor) -> float:
    """``||U^T V||_F^2 / k`` with k the smaller number of columns (1: the same subspace)."""
    k = min(U.shape[1], V.shape[1])
    M = U.to(torch.float64).T @ V.to(torch.float64)
    return float(M.square().sum()) / k
