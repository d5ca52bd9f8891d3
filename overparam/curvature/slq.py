"""Stochastic Lanczos quadrature (SLQ): the spectral density of a symmetric operator.

For a unit probe v = z / sqrt(N), z Rademacher, E[v^T g(A) v] = tr g(A) / N. An m-step Lanczos
run from v gives the Gauss quadrature rule v^T g(A) v ~ sum_j w_j g(theta_j), with nodes
theta_j the eigenvalues of T and weights w_j = (first component of T's j-th eigenvector)^2;
it is exact for polynomials of degree <= 2m - 1 (Golub & Meurant, "Matrices, Moments and
Quadrature", 2010). Averaging over probes estimates the spectral density
phi(t) = 1/N sum_i delta(t - lambda_i) (Lin, Saad & Yang 2016, "Approximating spectral
densities of large matrices"; Ghorbani, Krishnan & Xiao 2019, "An investigation into neural
net optimization via Hessian eigenvalue density"; Papyan 2020, Algorithm 2 LanczosApproxSpec).

The costly run (``slq``) returns the raw nodes and weights; the density (``density``), the
moments (``moments``) and histograms are pure functions of them (curvlinops' pattern), so a
figure can be re-smoothed without a single new product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from overparam.curvature.lanczos import MatVec, lanczos

#: Lanczos steps per probe. Default 90: Ghorbani, Krishnan & Xiao 2019, Section 2.3 (m = 90).
DEFAULT_STEPS = 90
#: probes. Default 1: for N in the 10^5..10^7 range one probe already concentrates
#: (Ghorbani et al. 2019, Section 2.3 and their Figure 1); raise it for small N.
DEFAULT_PROBES = 1


@dataclass
class SLQResult:
    """Raw SLQ output: per probe, Gauss nodes and weights (rows padded with weight 0).

    Attributes:
        nodes: (n_probes, m) float64 Ritz values.
        weights: (n_probes, m) float64, each row sums to 1.
        dim: N.
    """

    nodes: Tensor
    weights: Tensor
    dim: int


def rademacher(dim: int, seed: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A unit Rademacher probe z / sqrt(N) from a seeded CPU generator (same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 2, (dim,), generator=generator).to(torch.float64).mul_(2).sub_(1)
    return (z / dim**0.5).to(device=device, dtype=dtype)


def slq(
    matvec: MatVec,
    dim: int,
    num_probes: int = DEFAULT_PROBES,
    num_steps: int = DEFAULT_STEPS,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> SLQResult:
    """Run ``num_probes`` Lanczos runs of ``num_steps`` from Rademacher probes.

    Probe ``i`` is drawn with seed ``seed + i``. Costs ``num_probes * num_steps`` products.
    """
    m = min(num_steps, dim)
    nodes = torch.zeros(num_probes, m, dtype=torch.float64)
    weights = torch.zeros(num_probes, m, dtype=torch.float64)
    for i in range(num_probes):
        run = lanczos(matvec, rademacher(dim, seed + i, dtype, device), m, keep_basis=False, seed=seed + i)
        theta, S, _ = run.ritz()
        nodes[i, : theta.numel()] = theta
        weights[i, : theta.numel()] = S[0, :].square()
    return SLQResult(nodes, weights, dim)


def moments(nodes: Tensor, weights: Tensor, orders: int | list[int]) -> Tensor:
    """Estimates of tr(A^j) / N, ``sum_probes sum_k w_k theta_k^j / n_probes``, for each j."""
    js = [orders] if isinstance(orders, int) else list(orders)
    values = torch.stack([(weights * nodes.pow(j)).sum(-1).mean() for j in js])
    return values[0] if isinstance(orders, int) else values


def density(
    nodes: Tensor,
    weights: Tensor,
    grid: Optional[Tensor] = None,
    sigma: Optional[float] = None,
    num_points: int = 1000,
) -> tuple[Tensor, Tensor]:
    """Gaussian-smoothed density ``phi(t) = mean_probes sum_k w_k N(t; theta_k, sigma^2)``.

    Args:
        nodes, weights: SLQ output (``SLQResult.nodes``, ``.weights``).
        grid: where to evaluate (default: ``num_points`` points spanning the nodes +- 5 sigma).
        sigma: kernel width (default: 1% of the nodes' range, the width PyHessian's
            ``density_generate`` uses relative to the range; any width integrates to 1).

    Returns:
        ``(grid, phi)``; phi integrates to 1 over the real line.
    """
    live = weights > 0
    lo, hi = float(nodes[live].min()), float(nodes[live].max())
    if sigma is None:
        sigma = max(0.01 * (hi - lo), 1e-12 * max(abs(lo), abs(hi), 1.0))
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64)
    z = (grid[:, None, None] - nodes[None]) / sigma  # (G, n_probes, m)
    kernel = torch.exp(-0.5 * z.square()) / (sigma * (2 * torch.pi) ** 0.5)
    phi = (kernel * weights[None]).sum(-1).mean(-1)
    return grid, phi


def histogram(nodes: Tensor, weights: Tensor, dim: int, bins: Tensor | int = 100) -> tuple[Tensor, Tensor]:
    """Eigenvalue counts per bin: ``N * mean_probes sum_k w_k [theta_k in bin]``.

    The SLQ analogue of a histogram of all N eigenvalues (Sagun et al. 2017's figure);
    the counts sum to N.
    """
    nodes, weights = nodes.to(torch.float64), weights.to(torch.float64)
    live = weights > 0
    if isinstance(bins, int):
        lo, hi = float(nodes[live].min()), float(nodes[live].max())
        pad = 1e-9 * max(hi - lo, abs(hi), 1.0)
        bins = torch.linspace(lo - pad, hi + pad, bins + 1, dtype=torch.float64)
    counts = torch.zeros(bins.numel() - 1, dtype=torch.float64)
    index = torch.bucketize(nodes[live], bins, right=True) - 1
    index = index.clamp(0, counts.numel() - 1)
    counts.index_add_(0, index, weights[live] * dim / nodes.shape[0])
    return bins, counts
