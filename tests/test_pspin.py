"""The spherical p-spin task: the Hamiltonian, its gradient, the sphere, halting, the CLI."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from overparam.curvature.exact import dense_hessian
from overparam.errors import ConfigError
from overparam.plugins.pspin import HaltingEnergies, PSpinData, PSpinTask, SphericalHessian
from overparam.pspin import (
    GROUND_STATE,
    coupling_rows,
    couplings,
    energy_and_gradient,
    energy_loss,
    hamiltonian,
    spherical_hessian,
    spherical_hessian_matvec,
    tangent,
    threshold_energy,
    to_sphere,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Finite-N allowance below the N -> infinity ground state (-1.6575 for p = 3): the minimum
# of one small sample fluctuates by O(N^{-2/3}) around it.
GROUND_STATE_MARGIN = 0.15


def make(N: int = 12, p: int = 3, K: int = 1, **data_kwargs) -> tuple[PSpinData, PSpinTask]:
    task_kwargs = {k: data_kwargs.pop(k) for k in ("lr", "init_seed", "halt_tol") if k in data_kwargs}
    data = PSpinData(N=N, p=p, **data_kwargs)
    task = PSpinTask(input_shape=data.input_shape, num_train=data.num_train, ensemble_size=K, **task_kwargs)
    return data, task


def fit(data: PSpinData, task: PSpinTask, max_steps: int, callbacks=(), tmp_path=None) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator="cpu",
        logger=False if tmp_path is None else pl.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(task, data)
    return trainer


def brute_force(sigma: torch.Tensor, J: torch.Tensor) -> float:
    N, p = J.shape[0], J.dim()
    total = sum(float(J[idx]) * math.prod(float(sigma[i]) for i in idx) for idx in itertools.product(range(N), repeat=p))
    return total * N ** (-(p - 1) / 2)


@pytest.mark.parametrize("p", [2, 3, 4])
def test_hamiltonian_equals_brute_force_sum(p):
    N = 5
    J = couplings(N, p, seed=3)
    sigma = to_sphere(torch.randn(2, N, dtype=torch.float64))
    dense = hamiltonian(sigma, J)
    for k in range(2):
        assert dense[k].item() == pytest.approx(brute_force(sigma[k], J), rel=1e-12, abs=1e-12)
    # The task's row form: the mean of the N rows' energy shares is H / N, for each member.
    data, task = make(N=N, p=p, K=2, coupling_seed=3)
    assert task.p == p and task.N == N
    task.spins().copy_(sigma.float())
    x = coupling_rows(J).float()
    shares = task.member_outputs(x)  # (K, N, 1)
    torch.testing.assert_close(energy_loss(shares, torch.zeros(N), "none").mean(1).double(), dense / N, rtol=1e-5, atol=1e-6)


def test_covariance_is_abc_normalisation():
    """E[H(s) H(s')] = N q^p with q = s.s'/N (Auffinger-Ben Arous-Cerny), by Monte Carlo over J."""
    N, p, samples = 4, 3, 20000
    generator = torch.Generator().manual_seed(0)
    s, t = to_sphere(torch.randn(2, N, dtype=torch.float64, generator=generator))
    J = torch.randn(samples, N, N, N, dtype=torch.float64, generator=generator)
    Hs = torch.einsum("aijk,i,j,k->a", J, s, s, s) * N ** (-(p - 1) / 2)
    Ht = torch.einsum("aijk,i,j,k->a", J, t, t, t) * N ** (-(p - 1) / 2)
    q = float(s @ t) / N
    assert Hs.square().mean().item() == pytest.approx(N, rel=0.05)
    assert (Hs * Ht).mean().item() == pytest.approx(N * q**p, abs=4 * N / samples**0.5)


def test_gradient_matches_autograd_and_projection_is_tangent():
    N, K = 10, 3
    data, task = make(N=N, K=K)
    data.setup()
    J = couplings(N, 3, seed=0)
    energy, grad = energy_and_gradient(task.functional_view(), data.analysis_batches(size=N))
    sigma = task.spins().double().clone().requires_grad_(True)
    reference = hamiltonian(sigma, J) / N
    (expected,) = torch.autograd.grad(reference.sum(), sigma)
    torch.testing.assert_close(energy, reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    # Euler: H is homogeneous of degree p, so sigma . grad e = p e.
    torch.testing.assert_close((grad * sigma.detach()).sum(1), 3 * energy, rtol=1e-4, atol=1e-5)
    # The optimizer hook leaves a tangent gradient on the parameter.
    task._sigma_param().grad = grad.float().reshape_as(task._sigma_param())
    task.on_before_optimizer_step(None)
    projected = task._sigma_param().grad.view(K, N)
    assert (projected * task.spins()).sum(1).abs().max() < 1e-5
    torch.testing.assert_close(projected.double(), tangent(grad, task.spins().double()), rtol=1e-5, atol=1e-6)


def test_gd_halts_between_ground_state_and_zero_on_the_sphere_and_members_match_single_runs():
    N, K = 16, 3
    data, task = make(N=N, K=K, passes_per_epoch=20)
    fit(data, task, max_steps=3000)
    results = task.halting_results()
    assert results["converged"].all(), results
    assert (results["gradient_rms"] < task.halt_tol).all()
    energy = results["energy"]
    assert np.isfinite(energy).all()
    assert (energy > GROUND_STATE[3] - GROUND_STATE_MARGIN).all() and (energy < 0).all(), energy
    # |sigma|^2 = N after every step, and halted members stayed where they halted.
    torch.testing.assert_close(task.spins().square().sum(1), torch.full((K,), float(N)), rtol=1e-5, atol=0)
    final = hamiltonian(task.spins().double(), couplings(N, 3, 0)) / N
    np.testing.assert_allclose(final.numpy(), energy, rtol=0, atol=1e-5)
    # Member k of the ensemble is the single run started from init_seed + k.
    data1, single = make(N=N, K=1, init_seed=2, passes_per_epoch=20)
    fit(data1, single, max_steps=3000)
    single_results = single.halting_results()
    assert single_results["step"][0] == results["step"][2]
    np.testing.assert_allclose(single_results["energy"][0], energy[2], atol=1e-5)


def test_stochastic_variant_descends_and_stays_on_the_sphere():
    N, K = 16, 2
    data, task = make(N=N, K=K, batch_size=4, halt_tol=1e-9)
    start = (hamiltonian(task.spins().double(), couplings(N, 3, 0)) / N).numpy()
    fit(data, task, max_steps=200)  # 50 epochs of 4 steps; halting judged on the full gradient
    results = task.halting_results()
    assert not results["converged"].any() and (results["step"] == 200).all()
    assert (results["energy"] < start - 0.5).all(), (start, results["energy"])
    torch.testing.assert_close(task.spins().square().sum(1), torch.full((K,), float(N)), rtol=1e-5, atol=0)


def test_spherical_hessian_is_the_hessian_along_the_sphere():
    """At any point, Hess(H o R)(0) for the second-order retraction R(u) = sqrt(N)(s + Qu)/|s + Qu|."""
    N = 9
    data, task = make(N=N)
    data.setup()
    batches = data.analysis_batches(size=N)
    view = task.functional_view()
    eigenvalues, energy = spherical_hessian(view, batches)
    J = couplings(N, 3, 0)
    sigma = task.spins()[0].double()
    Q = torch.linalg.qr(sigma.unsqueeze(1), mode="complete").Q[:, 1:]

    def along_sphere(u: torch.Tensor) -> torch.Tensor:
        return hamiltonian(to_sphere(sigma + Q @ u), J)

    expected = torch.linalg.eigvalsh(torch.func.hessian(along_sphere)(torch.zeros(N - 1, dtype=torch.float64)))
    torch.testing.assert_close(eigenvalues, expected, rtol=1e-4, atol=1e-4)
    assert energy.item() == pytest.approx(hamiltonian(sigma, J).item() / N, abs=1e-6)
    # The generic (Euclidean) Hessian of the loss H/N is a different matrix: no radial shift.
    euclidean = torch.linalg.eigvalsh(N * dense_hessian(view.fn, view.params, energy_loss, batches, dtype=torch.float64))
    assert not torch.allclose(euclidean[1:], eigenvalues, atol=1e-2)


def test_matrix_free_spherical_hessian_lanczos_matches_exact():
    from overparam.curvature import bottom_k, top_k

    N = 14
    data, task = make(N=N)
    data.setup()
    batches = data.analysis_batches(size=N)
    view = task.functional_view()
    exact, _ = spherical_hessian(view, batches)
    matvec, v0 = spherical_hessian_matvec(view, batches, dtype=torch.float64, hvp_mode="double_backward")
    low = bottom_k(matvec, N, k=2, v0=v0, dtype=torch.float64, max_steps=N - 1).eigenvalues
    high = top_k(matvec, N, k=1, v0=v0, dtype=torch.float64, max_steps=N - 1).eigenvalues
    torch.testing.assert_close(low.sort().values, exact[:2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(high, exact[-1:], rtol=1e-6, atol=1e-6)


def test_callbacks_halting_energies_spherical_and_generic_hessian(tmp_path):
    """HaltingEnergies and SphericalHessian save their files; at GD's halting points the spherical
    spectrum is non-negative. HessianSpectrum runs on the task as is: at a critical point on the
    sphere its (Euclidean) spectrum of the loss H/N, times N, is {p(p-1)E} (along sigma) and the
    spherical one shifted by pE."""
    from overparam.callbacks.hessian import HessianSpectrum

    N, K, p = 12, 2, 3
    data, task = make(N=N, K=K, passes_per_epoch=20)
    generic = HessianSpectrum(top_k=2, bottom_k=1, exact=True, density=False, trace_probes=1, at_fit_start=False)
    callbacks = [HaltingEnergies(), SphericalHessian(max_members=2), generic]
    trainer = fit(data, task, max_steps=3000, callbacks=callbacks, tmp_path=tmp_path)
    halting = np.load(Path(trainer.log_dir) / "halting" / "halting.npz")
    np.testing.assert_allclose(halting["energy"], task.halting_results()["energy"])
    assert halting["threshold"] == pytest.approx(threshold_energy(3)) and halting["N"] == N
    assert (Path(trainer.log_dir) / "halting" / "halting.png").stat().st_size > 0
    assert float(trainer.callback_metrics["halting/converged"]) == 1.0
    spectrum = np.load(Path(trainer.log_dir) / "spherical_hessian" / "spectrum_end.npz")
    assert spectrum["eigenvalues"].shape == (K, N - 1)
    assert spectrum["eigenvalues"].min() > 0  # halted by GD: local minima on the sphere
    assert float(trainer.callback_metrics["spherical_hessian/index"]) == 0.0
    euclidean = np.sort(N * np.load(Path(trainer.log_dir) / "hessian" / "end.npz")["exact_eigenvalues"], axis=-1)
    spherical = np.load(Path(trainer.log_dir) / "spherical_hessian" / "spectrum_end.npz")
    for k in range(K):
        E = spherical["energy"][k]
        expected = np.sort(np.concatenate([[p * (p - 1) * E], spherical["eigenvalues"][k] + p * E]))
        np.testing.assert_allclose(euclidean[k], expected, atol=1e-4)  # halt_tol 1e-4: not exactly critical


@pytest.mark.slow
def test_two_ddp_ranks_halt_like_one_process():
    """Rows sharded over 2 ranks (gloo, ddp_fork): same halting steps, energies and spins."""
    results = []
    for kwargs in ({"devices": 1}, {"devices": 2, "strategy": "ddp_fork"}):
        data, task = make(N=16, K=3, passes_per_epoch=20)
        trainer = pl.Trainer(
            max_steps=3000, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, **kwargs,
        )
        trainer.fit(task, data)  # ddp_fork sends rank 0's state (halting buffers included) back
        results.append((task.halt_step.clone(), task.halt_energy.clone(), task.spins().clone()))
    (step1, energy1, spins1), (step2, energy2, spins2) = results
    assert (step1 >= 0).all() and torch.equal(step1, step2)
    torch.testing.assert_close(energy2, energy1, rtol=0, atol=1e-6)
    torch.testing.assert_close(spins2, spins1, rtol=0, atol=1e-4)


def test_bad_configuration_is_one_clear_error():
    with pytest.raises(ConfigError, match="model.input_shape"):
        PSpinTask(input_shape=(10,), num_train=4)
    with pytest.raises(ConfigError, match="data.N"):
        PSpinData(N=1)
    with pytest.raises(ConfigError, match="HaltingEnergies.bins"):
        HaltingEnergies(bins=0)
    with pytest.raises(ConfigError, match="needs the PSpinTask"):
        HaltingEnergies().on_setup(None, torch.nn.Module(), "fit")  # type: ignore[arg-type]


def test_cli_fit_with_the_config(cli, tmp_path):
    result = cli(
        "fit", "--config", str(CONFIGS / "pspin.yaml"), "--data.N", "10", "--model.ensemble_size", "4",
        "--trainer.max_epochs", "20", "--data.passes_per_epoch", "50",
        env={"OMP_NUM_THREADS": "1"},  # tiny matmuls: threads only contend on a shared CPU
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test  loss -1." in result.stdout  # the final energy per spin, averaged over starts
    halting = np.load(tmp_path / "runs" / "p_spin_task" / "version_0" / "halting" / "halting.npz")
    assert halting["energy"].shape == (4,) and np.isfinite(halting["energy"]).all()
    assert (halting["energy"] < 0).all()


@pytest.mark.slow
def test_pspin_callbacks_under_two_ddp_processes_match_one(cli, tmp_path):
    """HaltingEnergies and SphericalHessian through the CLI under DDP (2 CPU processes): the run
    ends (it once hung after fit), and the halting energies and spectra equal one process's."""
    args = ("fit", "--config", str(CONFIGS / "pspin.yaml"), "--data.N", "10", "--model.ensemble_size", "4",
            "--trainer.max_epochs", "4", "--data.passes_per_epoch", "50")
    env = {"OMP_NUM_THREADS": "1"}
    single = cli(*args, "--trainer.default_root_dir", "one", env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    double = cli(*args, "--trainer.default_root_dir", "two", "--trainer.strategy", "ddp", "--trainer.devices", "2",
                 env=env, timeout=600)
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = (tmp_path / root / "p_spin_task" / "version_0" for root in ("one", "two"))
    names = ["halting/halting.npz"] + sorted(str(f.relative_to(one)) for f in (one / "spherical_hessian").glob("*.npz"))
    assert len(names) > 1, "SphericalHessian saved its spectrum"
    for name in names:
        a, b = np.load(one / name), np.load(two / name)
        assert a.files == b.files, name
        for key in a.files:
            if np.issubdtype(a[key].dtype, np.number):
                # the halting gradient (~1e-4, at the threshold) is a residual: the ranks' float32
                # partial sums change it at 1e-3; energies, steps and spectra agree much closer
                rtol = 1e-2 if key == "gradient_rms" else 1e-5
                np.testing.assert_allclose(b[key], a[key], rtol=rtol, atol=1e-7, err_msg=f"{name}:{key}")
