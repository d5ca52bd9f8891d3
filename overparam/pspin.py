"""The spherical p-spin glass: its Hamiltonian, gradients and Riemannian Hessian (no Lightning).

The p-spin Hamiltonian per spin, with the normalisation of Auffinger, Ben Arous and Cerny
("Random matrices and complexity of spin glasses", CPAM 2013)::

    H(sigma) = N^{-(p-1)/2} sum_{i1..ip = 1..N} J_{i1..ip} sigma_i1 ... sigma_ip,   J iid N(0, 1),

on the sphere ``|sigma|^2 = N``, so that ``E[H(sigma) H(sigma')] = N q^p`` with
``q = sigma . sigma' / N``. Gradient descent from random starts halts near the threshold energy
``E_inf = -2 sqrt((p-1)/p)`` (-1.633 for p = 3), above the ground state (-1.657 for p = 3)
(Sagun, Guney, Ben Arous, LeCun 2014, "Explorations on high dimensional landscapes").

The task (``overparam.plugins.pspin``) treats the couplings as data: training point i is row i
of J, ``x_i = (i, J_{i,:,...,:})`` flattened to ``1 + N^{p-1}`` numbers (``coupling_rows``), and
the network's output on it is that row's share of the energy, so the mean over all rows is
``H / N`` (``energy_loss``). The functions here act on the task's functional view and those
rows; under DDP each rank passes its shard and the sums are all-reduced. See ``docs/pspin.md``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from overparam.curvature.exact import dense_hessian
from overparam.distributed import all_reduce_sum, total_count
from overparam.functional import FunctionalView
from overparam.losses import Reduction

#: Ground-state energy per spin of the spherical p-spin model (N -> infinity), from the
#: one-step RSB solution of Crisanti and Sommers (Z. Phys. B 87, 1992); only p = 3 is tabulated.
GROUND_STATE = {3: -1.6575}


def threshold_energy(p: int) -> float:
    """``E_inf = -2 sqrt((p-1)/p)``: where the Hessian's semicircle touches 0 (Auffinger, Ben Arous, Cerny 2013)."""
    return -2.0 * math.sqrt((p - 1) / p)


# --- the model's maths, as plain functions ---------------------------------------------------
def couplings(N: int, p: int = 3, seed: int = 0) -> Tensor:
    """The coupling tensor ``J``, shape ``(N,) * p``, iid standard Gaussian, float64, seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((N,) * p, generator=generator, dtype=torch.float64)


def hamiltonian(sigma: Tensor, J: Tensor) -> Tensor:
    """``H(sigma) = N^{-(p-1)/2} sum J_{i1..ip} sigma_i1 ... sigma_ip`` for ``sigma`` of shape ``(..., N)``.

    The dense contraction, one index at a time (the reference the task's row form is tested against).
    """
    N, p = J.shape[0], J.dim()
    out = J.to(sigma.dtype).expand(*sigma.shape[:-1], *J.shape)
    for _ in range(p):
        out = (out * sigma.reshape(*sigma.shape[:-1], *([1] * (out.dim() - sigma.dim())), N)).sum(-1)
    return out * N ** (-(p - 1) / 2)


def coupling_rows(J: Tensor) -> Tensor:
    """Training inputs: row i is ``(i, J_{i,:,...,:} flattened)``, shape ``(N, 1 + N^{p-1})``."""
    N = J.shape[0]
    index = torch.arange(N, dtype=J.dtype).unsqueeze(1)  # exact in float32 for N < 2^24
    return torch.cat([index, J.reshape(N, -1)], dim=1)


def tangent(v: Tensor, sigma: Tensor) -> Tensor:
    """Project ``v`` on the tangent space of the sphere at ``sigma``: ``v - (v.sigma/|sigma|^2) sigma`` (rows)."""
    return v - (v * sigma).sum(-1, keepdim=True) / sigma.square().sum(-1, keepdim=True) * sigma


def to_sphere(sigma: Tensor) -> Tensor:
    """Rescale each row of ``sigma`` to ``|sigma|^2 = N``."""
    return sigma * (sigma.shape[-1] ** 0.5 / sigma.norm(dim=-1, keepdim=True))


def energy_loss(outputs: Tensor, y: Tensor, reduction: Reduction = "mean") -> Tensor:
    """The loss of a point is its output, the point's share of the energy (``y`` is unused).

    Args:
        outputs: ``(..., B, 1)`` energy shares ``f_i``.
        y: ``(B,)`` placeholder targets (zeros).
        reduction: ``none`` gives ``(..., B)``; ``mean`` over all N rows is ``H / N``.
    """
    shares = outputs[..., 0]
    return shares if reduction == "none" else shares.sum() if reduction == "sum" else shares.mean()



def energy_and_gradient(view: FunctionalView, batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Energy per spin ``(K,)`` and its Euclidean gradient ``(K, N)`` of every member.

    Sums over this rank's rows, all-reduces, divides by the total row count: under DDP every
    rank gets the single-process answer.
    """
    view = view.detached()
    sigma = view.params["sigma"].detach().requires_grad_(True)
    K = view.ensemble_size
    energy_sum = torch.zeros(K, dtype=torch.float64, device=sigma.device)
    grad_sum = torch.zeros(K, sigma.shape[-1], dtype=torch.float64, device=sigma.device)
    count = 0
    for x, y in batches:
        out = view.fn({"sigma": sigma}, view.buffers, x)
        shares = energy_loss(out.reshape(K, x.shape[0], 1), y, reduction="none").sum(-1)  # (K,)
        (grad,) = torch.autograd.grad(shares.sum(), sigma)
        energy_sum += shares.detach().double()
        grad_sum += grad.reshape(K, -1).double()
        count += x.shape[0]
    all_reduce_sum(energy_sum)
    all_reduce_sum(grad_sum)
    P = total_count(count, sigma.device)
    return energy_sum / P, grad_sum / P


# --- curvature on the sphere ---------------------------------------------------------------
def spherical_hessian(view: FunctionalView, batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The Riemannian Hessian of H on the sphere ``|sigma|^2 = N`` at one member's spins, exactly.

    The loss is ``e = H/N`` and its Euclidean Hessian ``nabla^2 e`` is what a generic Hessian
    engine computes from the functional view. On the sphere the second-order behaviour is
    instead (Absil, Mahony, Sepulchre 2008, "Optimization Algorithms on Matrix Manifolds",
    Sec. 5.5; the sphere's Weingarten map gives the radial term)::

        Hess_S e = P (nabla^2 e) P - (sigma . nabla e / |sigma|^2) P,    P = I - sigma sigma^T / N,

    restricted to the N - 1 tangent directions. For the p-spin, H is homogeneous of degree p,
    so ``sigma . nabla e = p e`` and the radial term is ``-p e / N``: in units of H (times N)
    the bulk is a semicircle of radius ``2 sqrt(p(p-1))`` centred at ``-p E`` (E the energy per
    spin), which touches 0 at ``E_inf`` (Auffinger, Ben Arous, Cerny 2013). The Euclidean
    spectrum of ``nabla^2 e`` lacks that shift and has an outlier ``p(p-1) E / N`` along sigma.

    Args:
        view: a K = 1 view of a ``PSpinTask`` (params ``{"sigma": (N,)}``).
        batches: all coupling rows (this rank's shard under DDP; the sums are all-reduced).

    Returns:
        ``(eigenvalues, energy)``: the N - 1 tangent eigenvalues of ``N Hess_S e`` (the
        Riemannian Hessian of H) in ascending order, float64, and the energy per spin.
    """
    sigma = view.params["sigma"].detach().double()
    N = sigma.shape[0]
    hessian = dense_hessian(view.fn, {"sigma": sigma}, energy_loss, batches, view.buffers, torch.float64)  # (N, N)
    batches64 = [(x.double(), y) for x, y in batches]
    energy, gradient = energy_and_gradient(FunctionalView(view.fn, {"sigma": sigma}, view.buffers), batches64)
    energy, gradient = energy[0], gradient[0]
    # Orthonormal basis of the tangent space: the complete QR of sigma, less its first column.
    Q = torch.linalg.qr(sigma.unsqueeze(1), mode="complete").Q[:, 1:]  # (N, N-1)
    radial = (sigma @ gradient) / sigma.square().sum()
    riemannian = Q.T @ (hessian - radial * torch.eye(N, dtype=torch.float64, device=sigma.device)) @ Q
    return torch.linalg.eigvalsh(N * (riemannian + riemannian.T) / 2), energy


def spherical_hessian_matvec(view: FunctionalView, batches: list[tuple[Tensor, Tensor]], **operator_kwargs: Any) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """Matrix-free ``v -> N Hess_S e v`` (the Riemannian Hessian of H) for Lanczos at large N.

    Built on the curvature engine's ``HessianOperator`` (the Euclidean ``nabla^2 e``)::

        v -> N [ P (nabla^2 e) P v - (sigma . nabla e / N) P v ],   P = I - sigma sigma^T / N.

    It acts on R^N with sigma as an extra eigenvector of eigenvalue 0; start Lanczos from a
    tangent vector (the second return value, seeded) so the Krylov space stays tangent, e.g.
    ``bottom_k(matvec, N, k=1, v0=v0, dtype=torch.float64)`` for the smallest curvature.

    Args:
        view: a K = 1 view of a ``PSpinTask``.
        batches: all coupling rows (this rank's shard under DDP).
        **operator_kwargs: ``HessianOperator`` options (``dtype``, ``hvp_mode``).

    Returns:
        ``(matvec, v0)``.
    """
    from overparam.curvature import HessianOperator

    operator = HessianOperator.from_view(view, energy_loss, batches, **operator_kwargs)
    sigma = operator.params["sigma"]
    N = sigma.shape[0]
    _, gradient = energy_and_gradient(FunctionalView(view.fn, operator.params, view.buffers), operator.batches)
    radial = float(gradient[0].to(sigma.dtype) @ sigma) / N

    def matvec(v: Tensor) -> Tensor:
        w = tangent(v, sigma)
        return N * tangent(operator.matvec(w) - radial * w, sigma)

    generator = torch.Generator().manual_seed(0)
    v0 = tangent(torch.randn(N, generator=generator, dtype=torch.float64).to(sigma), sigma)
    return matvec, v0
