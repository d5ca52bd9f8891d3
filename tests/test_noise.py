"""Noise engine and GradientNoise: tail index on alpha-stable samples, B_simple on linear
regression with a known noise scale, per-sample moments against a loop, DDP = one device."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from overparam.callbacks.gradient_noise import GradientNoise
from overparam.errors import ConfigError
from overparam.losses import mse
from overparam.noise import NoiseScale, per_sample_moments, tail_index, two_batch_estimates
from overparam.plugins.teacher_student import TeacherStudent, TeacherStudentData


def symmetric_alpha_stable(alpha: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """Chambers-Mallows-Stuck (1976), beta = 0, unit scale (alpha = 2: N(0, 2))."""
    V = (torch.rand(n, generator=generator, dtype=torch.float64) - 0.5) * math.pi
    W = -torch.log(torch.rand(n, generator=generator, dtype=torch.float64))
    if alpha == 2.0:
        return 2.0 * torch.sin(V) * W.sqrt()  # the formula's limit, N(0, 2)
    return torch.sin(alpha * V) / torch.cos(V) ** (1 / alpha) * (torch.cos(V - alpha * V) / W) ** ((1 - alpha) / alpha)


@pytest.mark.parametrize("alpha", [1.2, 1.5, 1.8, 2.0])
def test_tail_index_recovers_alpha_of_stable_samples(alpha):
    X = symmetric_alpha_stable(alpha, 10**6, torch.Generator().manual_seed(0))
    assert tail_index(X) == pytest.approx(alpha, abs=0.05)


def test_tail_index_ignores_zeros_and_needs_samples():
    X = symmetric_alpha_stable(1.5, 10**5, torch.Generator().manual_seed(1))
    with_zeros = torch.cat([X, torch.zeros(10**5, dtype=X.dtype)])
    assert tail_index(with_zeros) == pytest.approx(tail_index(X), abs=0.02)
    assert math.isnan(tail_index(torch.ones(10)))


def _linear_regression(d, sigma, delta_norm, generator):
    """f(x) = w.x, y = w*.x + sigma eps, x ~ N(0, I): per-sample gradient (delta.x - sigma eps) x.

    G = delta = w - w*, tr(Sigma) = (d + 1)|delta|^2 + sigma^2 d (Gaussian 4th moments), so
    B_simple = d + 1 + sigma^2 d / |delta|^2.
    """
    w_star = torch.randn(1, d, generator=generator, dtype=torch.float64)
    delta = torch.randn(1, d, generator=generator, dtype=torch.float64)
    delta *= delta_norm / delta.norm()
    params = {"weight": w_star + delta}

    def fn(p, buffers, x):
        return x @ p["weight"].T  # (B, 1)

    def sample(n):
        x = torch.randn(n, d, generator=generator, dtype=torch.float64)
        y = x @ w_star.T + sigma * torch.randn(n, 1, generator=generator, dtype=torch.float64)
        return x, y

    return fn, params, sample, d + 1 + sigma**2 * d / delta_norm**2


@pytest.mark.parametrize("small_batch", [1, 8])
def test_B_simple_recovers_the_noise_scale_of_linear_regression(small_batch):
    fn, params, sample, B_true = _linear_regression(d=10, sigma=2.0, delta_norm=1.0, generator=torch.Generator().manual_seed(0))
    scale = NoiseScale()
    for _ in range(300):  # running means over 300 batches of 64
        x, y = sample(64)
        G2, S, *_ = per_sample_moments(fn, params, {}, mse, x, y, small_batch=small_batch, chunk=32).estimates()
        scale.update(G2, S)
    assert scale.B_simple == pytest.approx(B_true, rel=0.10)  # B_true = 51
    assert scale.G2 == pytest.approx(1.0, rel=0.10)


def test_per_sample_moments_match_a_loop_over_samples():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    params = dict(net.named_parameters())
    fn = lambda p, b, x: torch.func.functional_call(net, p, (x,))  # noqa: E731
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(3, (12,))
    from overparam.losses import cross_entropy

    flat = []
    for i in range(12):
        loss = cross_entropy(net(x[i : i + 1]), y[i : i + 1], reduction="sum")
        flat.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))]))
    g = torch.stack(flat)  # (B, N)
    for small in (1, 3):
        m = per_sample_moments(fn, params, {}, cross_entropy, x, y, small_batch=small, chunk=5)
        torch.testing.assert_close(m.sum_g, g.sum(0))
        G2, S, B_small, B_big = m.estimates()
        small_sq = g.reshape(-1, small, g.shape[1]).mean(1).square().sum(1).mean()
        expected = two_batch_estimates(small_sq, g.mean(0).square().sum(), small, 12)
        torch.testing.assert_close(torch.stack([G2, S]), torch.stack(expected))
        assert (B_small, B_big) == (small, 12)
    # small_batch = 1 is the unbiased sample variance of the per-sample gradients.
    _, S, *_ = per_sample_moments(fn, params, {}, cross_entropy, x, y).estimates()
    torch.testing.assert_close(S, g.var(0, unbiased=True).sum())


def _fit_with_noise(tmp_path, **trainer_kwargs):
    data = TeacherStudentData(num_train=128, num_test=32, batch_size=32, analysis_size=128)
    task = TeacherStudent(width=8, depth=1, input_shape=data.input_shape, num_outputs=data.num_outputs, num_train=128, lr=0.05)
    small_batch = 16 if trainer_kwargs.get("devices", 1) == 1 else 1
    cb = GradientNoise(every_n_steps=1, small_batch=small_batch, tail_index=False)
    t = pl.Trainer(
        max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, **trainer_kwargs,
    )
    t.fit(task, datamodule=data)
    return {k: float(v) for k, v in t.callback_metrics.items() if k.startswith("noise/")}


def test_ddp_estimator_equals_single_device_per_sample_estimator(tmp_path):
    """2 CPU processes (rank gradient = small batch of 16) vs one device, per-sample, groups of 16."""
    single = _fit_with_noise(tmp_path)
    ddp = _fit_with_noise(tmp_path, strategy="ddp_fork", devices=2)
    for key in ("noise/G2", "noise/trace_sigma", "noise/B_simple"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-4), key


def test_callback_logs_alpha_overall_and_per_layer(tmp_path):
    data = TeacherStudentData(num_train=256, num_test=32, batch_size=32, analysis_size=256)
    task = TeacherStudent(width=16, depth=1, input_shape=data.input_shape, num_outputs=data.num_outputs, num_train=256)
    cb = GradientNoise(every_n_steps=2, num_minibatches=16)
    t = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    t.fit(task, datamodule=data)
    keys = set(t.callback_metrics)
    assert {"noise/alpha", "noise/alpha/layers.1.weight", "noise/B_simple"} <= keys
    assert 0.5 < float(t.callback_metrics["noise/alpha"]) < 2.5
    assert cb.history[-1]["minibatch_size"] == 32 and cb.done == ["end"]


@pytest.mark.parametrize("kwargs", [{"every_n_steps": 0}, {"small_batch": 0}, {"K1": 1}, {"num_minibatches": 0}])
def test_bad_arguments_are_rejected(kwargs):
    with pytest.raises(ConfigError, match="GradientNoise"):
        GradientNoise(**kwargs)


def test_callback_leaves_the_training_trajectory_untouched(tmp_path):
    finals = []
    for callbacks in ([], [GradientNoise(every_n_steps=1, every_n_epochs=1)]):
        data = TeacherStudentData(num_train=128, num_test=32, batch_size=32, analysis_size=128)
        task = TeacherStudent(width=8, depth=1, input_shape=data.input_shape, num_outputs=data.num_outputs, num_train=128, momentum=0.9)
        t = pl.Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
        t.fit(task, datamodule=data)
        finals.append(torch.cat([p.detach().reshape(-1) for p in task.parameters()]))
    assert torch.equal(finals[0], finals[1])
