"""The spherical p-spin glass as a task: gradient descent on a random landscape.

The "network" is a spin vector sigma on the sphere ``|sigma|^2 = N`` and the loss is the
p-spin Hamiltonian per spin, with the normalisation of Auffinger, Ben Arous and Cerny
("Random matrices and complexity of spin glasses", CPAM 2013)::

    H(sigma) = N^{-(p-1)/2} sum_{i1..ip = 1..N} J_{i1..ip} sigma_i1 ... sigma_ip,   J iid N(0, 1)

so that ``E[H(sigma) H(sigma')] = N q^p`` with ``q = sigma . sigma' / N``. Gradient descent from
random starts halts near the threshold energy ``E_inf = -2 sqrt((p-1)/p)`` (-1.633 for p = 3),
above the ground state (-1.657 for p = 3), with a spread that shrinks as N grows (Sagun, Guney,
Ben Arous, LeCun 2014, "Explorations on high dimensional landscapes"). See ``docs/pspin.md``.

How it fits the Task/DataModule contracts: the couplings are the *data*. Training point i
(P = N of them) is row i of the coupling tensor, ``x_i = (i, J_{i,:,...,:})`` flattened to
``1 + N^{p-1}`` numbers, and the network's output on it is that row's share of the energy::

    f_i(sigma) = N^{-(p-1)/2} sigma_i sum_{i2..ip} J_{i i2..ip} sigma_i2 ... sigma_ip,
    (1/P) sum_i f_i(sigma) = H(sigma) / N.

The loss of a point is its output (``energy_loss``), so the Task's mean loss over the full
batch is the energy per spin; ``batch_size: full`` is plain gradient descent and a smaller
batch is the stochastic variant, a random subset of rows (``batch_size * N^{p-1}`` couplings)
per step, each row once per epoch. The coupling tensor lives once on the device, inside the
DataModule's resident training split; ``functional_view()`` gives ``fn(params, buffers, x)``
like any task, so engines run on it unchanged (but see ``spherical_hessian`` for what the
generic Hessian means here). An ensemble of K members is K random starts on the same couplings.

The optimiser step is projected gradient descent on the sphere: the gradient is projected on
the tangent space (``on_before_optimizer_step``), the optimiser steps, and sigma is rescaled
back to ``|sigma|^2 = N`` (``optimizer_step``). A member *halts* when the rms Riemannian
gradient of H, ``|grad_S H| / sqrt(N)``, drops below ``halt_tol``; it is then frozen, and the
run stops when every member has halted (or at ``max_epochs``/``max_steps``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from overparam.callbacks.base import AnalysisCallback
from overparam.curvature.exact import dense_hessian
from overparam.data import BatchSize, OverparamDataModule
from overparam.distributed import all_reduce_sum, total_count
from overparam.errors import ConfigError, check_positive
from overparam.functional import FunctionalView
from overparam.losses import Reduction
from overparam.task import Task

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


class SpinVector(nn.Module):
    """The parameters: one spin vector ``sigma`` in R^N, started uniformly on ``|sigma|^2 = N``.

    ``forward(x)`` takes coupling rows ``(B, 1 + N^{p-1})`` and returns their energy shares
    ``(B, 1)``. N here counts the spins, which are all the trainable parameters.
    """

    def __init__(self, N: int, p: int) -> None:
        super().__init__()
        self.N, self.p = N, p
        self.sigma = nn.Parameter(to_sphere(torch.randn(N)))

    def forward(self, x: Tensor) -> Tensor:
        sigma = self.sigma
        index, rows = x[:, 0].long(), x[:, 1:]  # (B,), (B, N^{p-1})
        product = sigma  # sigma^{(x)(p-1)} flattened, (N^{p-1},)
        for _ in range(self.p - 2):
            product = (product.unsqueeze(-1) * sigma).reshape(-1)
        field = rows @ product  # (B,)
        return (self.N ** (-(self.p - 1) / 2) * sigma[index] * field).unsqueeze(-1)


# --- data: the couplings -------------------------------------------------------------------
class PSpinData(OverparamDataModule):
    """The couplings of one p-spin sample as N training points (rows of J).

    Args:
        N: number of spins (the memory is ``N^p`` floats: N = 200 at p = 3 is 32 MB in float32).
        p: order of the interaction (p >= 2; 3 by default, the case of Sagun et al. 2014).
        coupling_seed: seed of J (the disorder sample), independent of the batch order.
        batch_size: ``full`` (default) is plain projected gradient descent; an integer b < N
            samples b rows (``b * N^{p-1}`` couplings) per step without replacement in a pass.
        passes_per_epoch: passes over the rows in one epoch (with ``full``: gradient steps per
            epoch). Default 1; long GD runs set 10-100 (see ``OverparamDataModule``).
        eval_batch_size, seed, analysis_size: see ``OverparamDataModule``.

    The targets are zeros (an energy has none); the test split is the training split, so the
    CLI's final test pass reports the energy per spin of the final spins.
    """

    def __init__(
        self,
        N: int = 50,
        p: int = 3,
        coupling_seed: int = 0,
        batch_size: BatchSize = "full",
        passes_per_epoch: int = 1,
        eval_batch_size: int = 8192,
        seed: int = 0,
        analysis_size: Optional[int] = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed, analysis_size, passes_per_epoch)
        check_positive("data.N", N - 1)
        check_positive("data.p", p - 1)
        self.N, self.p, self.coupling_seed = N, p, coupling_seed

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1 + self.N ** (self.p - 1),)

    @property
    def num_outputs(self) -> int:
        return 1

    @property
    def num_train(self) -> int:
        """P = N: one training point per row of the coupling tensor."""
        return self.N

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        x = coupling_rows(couplings(self.N, self.p, self.coupling_seed))
        y = torch.zeros(self.N)
        return {"train": (x, y), "test": (x, y)}

# --- the task ------------------------------------------------------------------------------
class PSpinTask(Task):
    """Projected gradient descent on the spherical p-spin energy; K random starts as an ensemble.

    N (spins) and p are read from the DataModule's linked ``num_train`` (= N) and
    ``input_shape`` (= ``1 + N^{p-1}``), so the YAML sets them once, under ``data``.

    Args:
        lr: time step ``dt`` of the gradient flow ``d sigma/dt = -grad_S H(sigma)``; the default
            SGD optimiser steps ``lr * N`` on the loss ``H/N``, so ``lr`` means the same at every
            N. Default 0.1: stable while ``dt * lambda_max < 2``, and the Riemannian Hessian of H
            has ``lambda_max`` about ``-pE + 2 sqrt(p(p-1))``, 9.8 at the threshold for p = 3.
        momentum: of the default SGD (0: plain gradient descent).
        ensemble_size: K random starts on the same couplings, trained together.
        init_seed: start k is drawn from seed ``init_seed + k`` (uniform on the sphere).
        halt_tol: a member halts when ``|grad_S H| / sqrt(N) < halt_tol`` (rms Riemannian
            gradient of H per spin, O(1) at a random start). Default 1e-4: the energy is then
            within about ``halt_tol^2 / lambda_min`` of the minimum's.
        input_shape, num_outputs, num_train: linked from the DataModule.

    Raises:
        ConfigError: if the linked shapes are not those of ``PSpinData``.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (2501,),
        num_outputs: int = 1,
        num_train: int = 50,
        lr: float = 0.1,
        momentum: float = 0.0,
        ensemble_size: int = 1,
        init_seed: int = 0,
        halt_tol: float = 1e-4,
    ) -> None:
        # "mse" only satisfies the base's loss check; the loss is replaced by energy_loss below.
        super().__init__(
            input_shape=input_shape, num_outputs=num_outputs, num_train=num_train, loss="mse", lr=lr,
            momentum=momentum, weight_decay=0.0, ensemble_size=ensemble_size, init_seed=init_seed,
        )
        self.hparams.pop("loss", None)
        self.hparams.pop("weight_decay", None)
        check_positive("model.halt_tol", halt_tol)
        self.spins_N, self.p = num_train, _order_from_shape(input_shape, num_train)
        if num_outputs != 1:
            raise ConfigError(f"model.num_outputs must be 1 for the p-spin task (an energy), got {num_outputs}")
        self.loss_name, self.loss_fn = "energy", energy_loss
        self.halt_tol = halt_tol
        K = ensemble_size
        self.register_buffer("halt_step", torch.full((K,), -1, dtype=torch.long))  # -1: still running
        self.register_buffer("halt_energy", torch.full((K,), float("nan"), dtype=torch.float64))
        self.register_buffer("halt_gradient", torch.full((K,), float("nan"), dtype=torch.float64))
        self.register_buffer("_last_energy", torch.full((K,), float("nan"), dtype=torch.float64), persistent=False)
        self._batch_energy: Union[Tensor, float] = 0.0
        self._full_batch = False
        self.setup_network()

    def make_network(self) -> nn.Module:
        return SpinVector(self.spins_N, self.p)

    # --- the spins as a (K, N) view -------------------------------------------------------------
    def _sigma_param(self) -> nn.Parameter:
        return self.net.sigma if self.ensemble_size == 1 else self.member_params["sigma"]

    def spins(self) -> Tensor:
        """The spins as a ``(K, N)`` view of the parameter (writes go to the parameter)."""
        return self._sigma_param().data.view(self.ensemble_size, self.spins_N)

    @property
    def halted(self) -> Tensor:
        return self.halt_step >= 0

    # --- steps -------------------------------------------------------------------------------
    def _step(self, batch: Sequence[Tensor], split: str, global_size: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
        loss, out, per_sample = super()._step(batch, split, global_size)
        if split == "train":
            self._full_batch = global_size == self.num_train
            if self._full_batch:  # the energy per spin of each member at this step's spins (chunks add up)
                self._batch_energy = self._batch_energy + all_reduce_sum(per_sample.detach().sum(-1).double() / global_size)
        return loss, out, per_sample

    def record_outputs(self, split: str, outputs: Tensor, y: Tensor, losses: Tensor) -> None:
        """Energies only: an energy has no 0/1 error (recorded as 0)."""
        zeros = torch.zeros_like(losses)
        self.record(split, losses, zeros, zeros[0] if self.ensemble_size > 1 else None)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Project the gradient on the tangent space; judge halting when it is the full gradient."""
        param = self._sigma_param()
        sigma, grad = param.data.view(-1, self.spins_N), param.grad.view(-1, self.spins_N)
        grad.copy_(tangent(grad, sigma))
        if self._full_batch:
            self._observe(self._batch_energy, grad.norm(dim=1).double() * self.spins_N**0.5)
        self._batch_energy = 0.0
        grad[self.halted] = 0.0

    def update(self, optimizer: Any) -> None:
        """Step, then rescale to ``|sigma|^2 = N``; halted members keep their halting spins."""
        before = self.spins().clone()
        super().update(optimizer)
        with torch.no_grad():
            sigma = self.spins()
            sigma.copy_(torch.where(self.halted.unsqueeze(1), before, to_sphere(sigma)))

    def on_train_epoch_end(self) -> None:
        if not self._full_batch:  # minibatch gradients are noisy: judge on the full gradient
            energy, gradient = self.energy_and_gradient()
            self._observe(energy, (tangent(gradient, self.spins().to(gradient.dtype)).norm(dim=1) * self.spins_N**0.5))
        super().on_train_epoch_end()
        self.log_dict(
            {"pspin/energy": self._last_energy.mean().float(), "pspin/halted": self.halted.float().mean()},
            sync_dist=False,
        )
        if bool(self.halted.all()):
            self.trainer.should_stop = True

    def _observe(self, energy: Tensor, gradient: Tensor) -> None:
        """Record energies (K,) and rms Riemannian gradients (K,) of the current spins."""
        self._last_energy = energy
        newly = (~self.halted) & (gradient < self.halt_tol)
        self.halt_energy[newly] = energy[newly].to(self.halt_energy.dtype)
        self.halt_gradient[newly] = gradient[newly].to(self.halt_gradient.dtype)
        self.halt_step[newly] = self.global_step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The loss is H/N: a step lr*N on it is a step lr on H, the same time step at every N.
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr * self.spins_N, momentum=self.hparams.momentum)

    # --- results -------------------------------------------------------------------------------
    def _full_batches(self) -> list[tuple[Tensor, Tensor]]:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None:
            raise ConfigError("the p-spin task needs its PSpinData to evaluate energies (fit with datamodule=...)")
        return datamodule.analysis_batches("train", size=self.num_train)

    @torch.enable_grad()
    def energy_and_gradient(self, batches: Optional[list[tuple[Tensor, Tensor]]] = None) -> tuple[Tensor, Tensor]:
        """Energy per spin ``(K,)`` and its Euclidean gradient ``(K, N)`` over all rows (DDP-exact)."""
        with torch.inference_mode(False):
            return energy_and_gradient(self.functional_view(), self._full_batches() if batches is None else batches)

    def halting_results(self, batches: Optional[list[tuple[Tensor, Tensor]]] = None) -> dict[str, np.ndarray]:
        """Per member: the energy per spin where it halted, the step, the final rms gradient.

        Members that never met ``halt_tol`` report the energy and gradient of their final
        spins, with ``converged`` False and ``step`` the number of steps run. ``batches``
        (all coupling rows) defaults to the attached DataModule's.
        """
        energy, gradient = self.energy_and_gradient(batches)
        rms = tangent(gradient, self.spins().to(gradient.dtype)).norm(dim=1) * self.spins_N**0.5
        halted = self.halted.cpu()
        return {
            "energy": torch.where(halted, self.halt_energy.cpu(), energy.cpu()).numpy(),
            "gradient_rms": torch.where(halted, self.halt_gradient.cpu(), rms.cpu()).numpy(),
            "step": torch.where(halted, self.halt_step.cpu(), torch.tensor(self.global_step)).numpy(),
            "converged": halted.numpy(),
        }


def _order_from_shape(input_shape: Sequence[int], N: int) -> int:
    """p from ``input_shape == (1 + N^{p-1},)``, or a ConfigError."""
    shape = tuple(input_shape)
    if len(shape) == 1 and N >= 2:
        p = 1 + round(math.log(max(shape[0] - 1, 1)) / math.log(N))
        if p >= 2 and 1 + N ** (p - 1) == shape[0]:
            return p
    raise ConfigError(
        f"model.input_shape {list(shape)} with model.num_train {N} is not a p-spin layout (1 + N^(p-1),); "
        "use PSpinData, which links both"
    )


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


# --- callbacks -----------------------------------------------------------------------------
def _require_pspin(callback: AnalysisCallback, pl_module: pl.LightningModule) -> None:
    if not isinstance(pl_module, PSpinTask):
        raise ConfigError(f"{type(callback).__name__} needs the PSpinTask model, got {type(pl_module).__name__}")


class HaltingEnergies(AnalysisCallback):
    """Where each of the K random starts halted: energies per spin, their histogram, statistics.

    Saves ``<log_dir>/halting/halting.npz`` (``energy``, ``step``, ``gradient_rms``,
    ``converged`` per member, with ``N``, ``p``, ``threshold`` and ``ground_state``) and
    ``halting.png`` (the histogram with ``E_inf`` and the ground state marked), and logs
    ``halting/{mean,std,min,max,converged}``.

    Args:
        bins: histogram bins (default 30).
        name: folder and metric prefix (default ``halting``).

    Raises:
        ConfigError: with a model other than ``PSpinTask`` (at fit start).

    Example::

        Trainer(callbacks=[HaltingEnergies()])

        # YAML
        trainer:
          callbacks:
            - class_path: HaltingEnergies
    """

    default_name = "halting"

    def __init__(self, bins: int = 30, name: Optional[str] = None) -> None:
        super().__init__(at_fit_start=False, at_fit_end=True, name=name)
        check_positive(f"{type(self).__name__}.bins", bins)
        self.bins = bins

    def on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """At setup: refuse a model other than the p-spin task."""
        _require_pspin(self, pl_module)

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        results = pl_module.halting_results()
        p, energy = pl_module.p, results["energy"]
        stats = {
            "mean": energy.mean(),
            "std": energy.std(ddof=1) if energy.size > 1 else 0.0,
            "min": energy.min(),
            "max": energy.max(),
            "converged": results["converged"].mean(),
        }
        self.history.append({"tag": tag, **{k: float(v) for k, v in stats.items()}})
        self.log_metrics(trainer, pl_module, stats)
        self.log_histogram(trainer, "energy", energy)
        extra = {"N": pl_module.spins_N, "p": p, "threshold": threshold_energy(p), "ground_state": GROUND_STATE.get(p, np.nan)}
        self.save_npz(trainer, "halting.npz", **results, **extra)
        if trainer.is_global_zero:
            path = _plot_halting(energy, pl_module.spins_N, p, self.bins, f"{self.output_dir(trainer)}/halting.png")
            self.log_image(trainer, "histogram", path)


class SphericalHessian(AnalysisCallback):
    """The exact Riemannian Hessian spectrum of H on the sphere at the halting points.

    For up to ``max_members`` members: the N - 1 eigenvalues of ``spherical_hessian`` (units
    of H), saved to ``<log_dir>/spherical_hessian/spectrum.npz`` with each member's energy, a
    PNG of the pooled histogram against the semicircle of radius ``2 sqrt(p(p-1))`` centred at
    ``-p E``, and ``spherical_hessian/{lambda_min,lambda_max,index,predicted_lambda_min}``
    (means over members; ``index`` is the fraction of negative eigenvalues).

    Each member costs an exact N x N Hessian (N forward-over-reverse products over all rows,
    ``O(N^{p+1})``): meant for N up to a few hundred.

    Args:
        max_members: members analysed (default 8; None: all).
        at_fit_start, at_fit_end, every_n_epochs, at_epochs, name: see ``AnalysisCallback``.

    Raises:
        ConfigError: with a model other than ``PSpinTask`` (at fit start).

    Example::

        Trainer(callbacks=[SphericalHessian(max_members=4)])
    """

    default_name = "spherical_hessian"

    def __init__(
        self,
        max_members: Optional[int] = 8,
        at_fit_start: bool = False,
        at_fit_end: bool = True,
        every_n_epochs: Optional[int] = None,
        at_epochs: Sequence[int] = (),
        name: Optional[str] = None,
    ) -> None:
        super().__init__(at_fit_start, at_fit_end, every_n_epochs, at_epochs, name)
        if max_members is not None:
            check_positive(f"{type(self).__name__}.max_members", max_members)
        self.max_members = max_members

    def on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """At setup: refuse a model other than the p-spin task."""
        _require_pspin(self, pl_module)

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        view = pl_module.functional_view()
        batches = pl_module._full_batches()
        K = min(view.ensemble_size, self.max_members or view.ensemble_size)
        eigenvalues, energies = zip(*(spherical_hessian(view.member(k), batches) for k in range(K)))
        eigenvalues, energy = torch.stack(eigenvalues).cpu(), torch.stack(energies).cpu()  # (K, N-1), (K,)
        p = pl_module.p
        radius = 2.0 * math.sqrt(p * (p - 1))
        stats = {
            "lambda_min": eigenvalues[:, 0].mean(),
            "lambda_max": eigenvalues[:, -1].mean(),
            "index": (eigenvalues < 0).double().mean(),
            "predicted_lambda_min": (-p * energy - radius).mean(),
        }
        self.history.append({"tag": tag, **{k: float(v) for k, v in stats.items()}})
        self.log_metrics(trainer, pl_module, stats)
        safe_tag = tag.replace("=", "")
        self.save_npz(trainer, f"spectrum_{safe_tag}.npz", eigenvalues=eigenvalues, energy=energy, p=p, N=pl_module.spins_N)
        if trainer.is_global_zero:
            path = _plot_spectrum(eigenvalues, energy, p, f"{self.output_dir(trainer)}/spectrum_{safe_tag}.png")
            self.log_image(trainer, f"spectrum_{safe_tag}", path)


def _plot_halting(energy: np.ndarray, N: int, p: int, bins: int, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(energy, bins=bins, color="tab:blue", alpha=0.8)
    ax.axvline(threshold_energy(p), color="k", ls="--", label=r"$E_\infty$")
    if p in GROUND_STATE:
        ax.axvline(GROUND_STATE[p], color="tab:red", ls=":", label="ground state")
    ax.set(xlabel="energy per spin at halting", ylabel="starts", title=f"p-spin, p = {p}, N = {N}, {energy.size} starts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_spectrum(eigenvalues: Tensor, energy: Tensor, p: int, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radius, centre = 2.0 * math.sqrt(p * (p - 1)), float(-p * energy.mean())
    grid = np.linspace(centre - radius, centre + radius, 200)
    density = 2.0 / (math.pi * radius**2) * np.sqrt(np.clip(radius**2 - (grid - centre) ** 2, 0.0, None))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(eigenvalues.flatten().numpy(), bins=40, density=True, alpha=0.7, label="exact, pooled over members")
    ax.plot(grid, density, "k", label=r"semicircle: centre $-pE$, radius $2\sqrt{p(p-1)}$")
    ax.axvline(0.0, color="gray", lw=0.8)
    ax.set(xlabel="eigenvalue of the Riemannian Hessian of H", ylabel="density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
