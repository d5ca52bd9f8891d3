"""Smoke tests of ``overparam reproduce gd_vs_sgd`` and ``sgd_noise`` (issue 9, obs. 1 and 5).

Tiny variants of the small scale (a few hundred digits, a narrow net, a few epochs) through the
same code: real ``overparam fit`` runs, the numbers and the figures. They assert what is robust
at this size: GD and SGD with the same number of steps both fit the training set and end within
a few test points of each other; alpha is measured pooled and per layer and is below 2 for the
weights; a larger batch needs fewer steps to reach the same training loss, and the fitted
S_min (1 + B_noise/B) is positive. Plus the S(B) fit and ``TargetLoss`` on exact cases.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from overparam.errors import ConfigError
from overparam.reproduce import OBSERVATIONS, gd_vs_sgd, sgd_noise

TINY_GD = dict(n_train=200, n_test=500, width=[64], sgd_batch=50, sgd_epochs=20, gd_epochs=80, seeds=[0, 1], parallel=2)
TINY_NOISE = dict(n_train=256, n_test=200, analysis_size=256, width=[64], batch=64, epochs=2, alpha_every=1,
                  noise_every_n_steps=2, batch_sizes=[16, 128], targets=[1.5, 1.0], target_size=256, max_steps=500,
                  lr=0.1, lrs=[0.1])


def test_registered():
    assert OBSERVATIONS["gd_vs_sgd"] == "overparam.reproduce.gd_vs_sgd"
    assert OBSERVATIONS["sgd_noise"] == "overparam.reproduce.sgd_noise"
    for module in (gd_vs_sgd, sgd_noise):
        assert set(module.SCALES) == {"small", "full"} and module.TITLE


def test_fit_steps_recovers_S_min_and_B_noise():
    B = np.array([16, 64, 256, 1024])
    S_min, B_noise = sgd_noise.fit_steps(B, 50 * (1 + 40 / B))
    assert S_min == pytest.approx(50) and B_noise == pytest.approx(40)
    # No speed-up from a larger batch at all: S_min is the constant, B_noise 0.
    assert sgd_noise.fit_steps(B, [30, 30, 30, 30]) == pytest.approx((30, 0), abs=1e-9)


def test_run_names():
    assert sgd_noise.run_name(64, 0.1, 0.1) == "batch_64" and sgd_noise.run_name(64, 0.3, 0.1) == "batch_64_lr0.3"


def test_steps_to_is_the_first_crossing():
    curve = {"step": np.array([0, 1, 2, 3, 4]), "loss": np.array([2.0, 1.0, 0.5, 0.7, 0.4])}
    assert [sgd_noise.steps_to(curve, t) for t in (1.5, 0.5, 0.45, 0.1)] == [1, 2, 4, None]


@pytest.mark.parametrize("kwargs, match", [(dict(targets=[]), "targets"), (dict(targets=[0.5, -1]), "targets"),
                                           (dict(targets=[0.5], size=0), "size"), (dict(targets=[0.5], every_n_steps=0), "every_n_steps")])
def test_target_loss_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        sgd_noise.TargetLoss(**kwargs)


def test_sgd_noise_tiny(tmp_path, mnist_env):
    numbers = sgd_noise.run("small", tmp_path / "out", tmp_path / "runs", settings=TINY_NOISE)
    json.dumps(numbers)
    for name in numbers["figures"]:
        assert (tmp_path / "out" / name).stat().st_size > 10_000
    h = numbers["noise"]
    assert h["alpha_epochs"] == [0.0, 1.0, 2.0], "alpha at the start and after each epoch"
    assert all(0.5 < a < 2.2 for a in h["alpha"]), h["alpha"]
    assert {"layers.1.weight", "layers.3.weight"} <= set(h["alpha_layers"])
    assert all(a < 2 for a in h["alpha_layers"]["layers.1.weight"]), "the first layer's weight noise is heavy-tailed"
    assert len(h["B_simple"]) == 2 and all(b > 0 for b in h["B_simple"])
    for target in ("1.5", "1.0"):
        c = numbers["critical_batch"][target]["fixed_lr"]
        small, large = c["steps"]
        assert small is not None and large is not None and large <= small, f"batch 128 should need no more steps than 16: {c}"
        assert numbers["critical_batch"][target]["best_lr"]["steps"] == c["steps"], "one lr: best = fixed"
    # The batch runs stop at the lowest target: the step of the crossing, not max_steps.
    assert all(r["steps"] < TINY_NOISE["max_steps"] for r in numbers["batch_runs"].values()), numbers["batch_runs"]
    c = numbers["critical_batch"]["1.0"]
    assert c["fixed_lr"]["S_min"] > 0 and c["fixed_lr"]["B_noise_fit"] >= 0
    # The noise run (8 steps) reaches the first target: B_simple of that epoch is read there.
    assert math.isfinite(numbers["critical_batch"]["1.5"]["B_simple"]) and numbers["critical_batch"]["1.5"]["B_simple"] > 0
    assert numbers["diverged"] == []


@pytest.mark.slow
def test_gd_vs_sgd_tiny(tmp_path, mnist_env):
    numbers = gd_vs_sgd.run("small", tmp_path / "out", tmp_path / "runs", settings=TINY_GD)
    json.dumps(numbers)
    assert (tmp_path / "out" / "gd_vs_sgd.png").stat().st_size > 10_000
    runs = numbers["runs"]
    assert runs["gd_s0"]["test_mistakes"] != runs["gd_s1"]["test_mistakes"] or runs["gd_s0"]["test/loss"] != runs["gd_s1"]["test/loss"], \
        "seeds must give different initialisations"
    for name, r in runs.items():
        assert r["steps"] == 80, f"{name}: GD and SGD take the same number of steps"
        assert r["train/error"] <= 0.02, f"{name} should (nearly) fit 200 digits: {r}"
    gap = abs(numbers["gd"]["mean_test_mistakes"] - numbers["sgd"]["mean_test_mistakes"])
    assert gap < 0.05 * TINY_GD["n_test"], f"GD and SGD end close on the test set: {numbers['gd']} vs {numbers['sgd']}"
