"""`overparam reproduce jamming`: the narrowest nets jam, the widest reach N_Delta = 0, N* between."""

from __future__ import annotations

import json

import pytest

from overparam.reproduce import jamming


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # the runs are subprocesses: tiny float64 matmuls on a shared 2-core machine want one thread
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def check_phase(numbers: dict) -> None:
    groups = sorted(numbers["groups"], key=lambda g: g["N"])
    narrow, wide = groups[0], groups[-1]
    assert narrow["sat_fraction"] == 0.0 and narrow["N_delta_over_N"] > 0, "the narrowest nets must jam"
    assert wide["sat_fraction"] == 1.0 and wide["N_delta_over_N"] == 0.0, "the widest nets must reach N_Delta = 0"
    nstar = numbers["nstar"]
    assert narrow["N"] < nstar["N_star"] < wide["N"]
    assert nstar["largest_unsat_N"] < nstar["smallest_sat_N"]


def test_reduced_random_sweep(tmp_path):
    """Two widths x K = 3 vmapped seeds on P = 30 random labels (d = h)."""
    # Epochs of 50 steps: the lr endgame (10 epochs per decay, 7 decays) ends in ~4k steps.
    reduced = {"random": dict(widths=[2, 12], K=3, data={"num_train": 30, "num_test": 200, "passes_per_epoch": 50},
                              max_steps=20_000, min_plateau_steps=200)}
    numbers = jamming.run("small", tmp_path / "out", tmp_path / "runs", settings=reduced, datasets=("random",))
    check_phase(numbers["random"])
    assert [g["samples"] for g in numbers["random"]["groups"]] == [3, 3]
    for name in numbers["figures"]:
        assert (tmp_path / "out" / name).stat().st_size > 0
    json.dumps(numbers)  # what `overparam reproduce` saves


@pytest.mark.slow
def test_small_scale(tmp_path, mnist_env):
    """The whole small scale: random labels and MNIST parity."""
    numbers = jamming.run("small", tmp_path / "out", tmp_path / "runs")
    check_phase(numbers["random"])
    check_phase(numbers["mnist"])
    # past N* the K-member average is at least as good as its members on average
    nstar = numbers["mnist"]["nstar"]["N_star"]
    for g in numbers["mnist"]["groups"]:
        if g["N"] > nstar:
            assert g["ensemble_test_error"] <= g["test_error"] + 1e-12
