"""The spherical p-spin glass as a task: gradient descent on a random landscape.

The maths (Hamiltonian, couplings as rows, gradients, the Riemannian Hessian) is in
``overparam.pspin``. Here: the model (a spin vector), the data (the couplings, one training
point per row of J), the task (projected gradient descent) and two callbacks.

How it fits the Task/DataModule contracts: the couplings are the *data*. Training point i
(P = N of them) is row i of the coupling tensor, ``x_i = (i, J_{i,:,...,:})`` flattened to
``1 + N^{p-1}`` numbers, and the network's output on it is that row's share of the energy::

    f_i(sigma) = N^{-(p-1)/2} sigma_i sum_{i2..ip} J_{i i2..ip} sigma_i2 ... sigma_ip,
    (1/P) sum_i f_i(sigma) = H(sigma) / N.

The loss of a point is its output (``energy_loss``), so the Task's mean loss over the full
batch is the energy per spin; ``batch_size: full`` is plain gradient descent and a smaller
batch is the stochastic variant, a random subset of rows (``batch_size * N^{p-1}`` couplings)
per step, each row once per pass. The coupling tensor lives once on the device, inside the
DataModule's resident training split; ``functional_view()`` gives ``fn(params, buffers, x)``
like any task, so engines run on it unchanged (but see ``overparam.pspin.spherical_hessian``
for what the generic Hessian means here). An ensemble of K members is K random starts on the
same couplings.

The optimiser step is projected gradient descent on the sphere: the gradient is projected on
the tangent space (``on_before_optimizer_step``), the optimiser steps, and sigma is rescaled
back to ``|sigma|^2 = N`` (``update``). A member *halts* when the rms Riemannian gradient of H,
``|grad_S H| / sqrt(N)``, drops below ``halt_tol``; it is then frozen, and the run stops when
every member has halted (or at ``max_epochs``/``max_steps``).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from overparam.callbacks.base import AnalysisCallback
from overparam.data import BatchSize, OverparamDataModule
from overparam.distributed import all_reduce_sum
from overparam.errors import ConfigError, check_positive
from overparam.plots import plot_halting_energies, plot_spherical_spectrum, save_figure
from overparam.pspin import (
    GROUND_STATE,
    coupling_rows,
    couplings,
    energy_and_gradient,
    energy_loss,
    spherical_hessian,
    tangent,
    threshold_energy,
    to_sphere,
)
from overparam.task import Task

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
        super().__init__(
            input_shape=input_shape, num_outputs=num_outputs, num_train=num_train, lr=lr,
            momentum=momentum, weight_decay=0.0, ensemble_size=ensemble_size, init_seed=init_seed,
        )
        self.hparams.pop("loss", None)
        self.hparams.pop("weight_decay", None)
        check_positive("model.halt_tol", halt_tol)
        self.spins_N, self.p = num_train, _order_from_shape(input_shape, num_train)
        if num_outputs != 1:
            raise ConfigError(f"model.num_outputs must be 1 for the p-spin task (an energy), got {num_outputs}")
        self.halt_tol = halt_tol
        K = ensemble_size
        self.register_buffer("halt_step", torch.full((K,), -1, dtype=torch.long))  # -1: still running
        self.register_buffer("halt_energy", torch.full((K,), float("nan"), dtype=torch.float64))
        self.register_buffer("halt_gradient", torch.full((K,), float("nan"), dtype=torch.float64))
        self.register_buffer("_last_energy", torch.full((K,), float("nan"), dtype=torch.float64), persistent=False)
        self._batch_energy: Union[Tensor, float] = 0.0
        self._full_batch = False
        self.setup_network()

    def make_loss(self, name: str) -> tuple[str, Any]:
        """The energy: a point's loss is its share of H / N (``overparam.pspin.energy_loss``)."""
        return "energy", energy_loss

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
            fig = plot_halting_energies(energy, pl_module.spins_N, p, self.bins, threshold_energy(p), GROUND_STATE.get(p))
            path = save_figure(fig, f"{self.output_dir(trainer)}/halting.png")
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
            fig = plot_spherical_spectrum(eigenvalues.numpy(), float(energy.mean()), p)
            path = save_figure(fig, f"{self.output_dir(trainer)}/spectrum_{safe_tag}.png")
            self.log_image(trainer, f"spectrum_{safe_tag}", path)


