"""``overparam reproduce edge_of_stability`` (issue 17): the summary on known curves, and a tiny real run.

The tiny run (200 digits, GD at 2/eta = 40 for 250 steps and Adam for 60; ~1 min on the shared
CPU, so ``-m slow``) goes through the same code as the small scale and asserts what is robust at
that size: GD's sharpness starts below 2/eta, reaches it, and over the second half of the run
stays within -10%/+30% of it; Adam's preconditioned sharpness is measured from the first update
on.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from overparam.reproduce import OBSERVATIONS, edge_of_stability

TINY = dict(n_train=200, gd_lrs=[0.05], gd_steps=250, adam_lrs=[1e-3], adam_steps=60, every=10)


def test_registered():
    assert OBSERVATIONS["edge_of_stability"] == "overparam.reproduce.edge_of_stability"
    assert set(edge_of_stability.SCALES) == {"small", "full"} and edge_of_stability.TITLE
    assert edge_of_stability.run_name("gd", 0.04) == "gd_lr0.04" and edge_of_stability.run_name("adam", 1e-3) == "adam_lr0.001"


def test_summary_finds_the_edge_and_the_hover():
    step = np.arange(0, 200, 10)
    lam = np.where(step < 100, 30 + step / 5, 50 + np.where(step % 20 == 0, 1.0, -1.0))  # rises to 50, then +-1
    loss_step = np.arange(20, 201, 20)
    loss = np.array([1.0, 0.8, 0.6, 0.5, 0.45, 0.5, 0.4, 0.42, 0.35, 0.3])  # rises twice after the edge
    c = {"step": step, "lambda_1": lam, "threshold": np.full(step.shape, 50.0), "hvps": np.r_[18.0, np.full(19, 5.0)],
         "converged": np.ones(20), "warm": np.r_[0.0, np.ones(19)], "loss_step": loss_step, "loss": loss}
    s = edge_of_stability.summary(c)
    assert s["step_edge"] == 100 and s["ratio_first"] == pytest.approx(0.6)
    assert s["ratio_after_edge"]["mean"] == pytest.approx(1.0) and s["ratio_after_edge"]["max"] == pytest.approx(1.02)
    assert s["loss_rises_before_edge"] == "0 of 4 epochs" and s["loss_rises_after_edge"] == "2 of 5 epochs"
    assert s["hvps_first"] == 18 and s["hvps_mean_warm"] == pytest.approx(5.0) and s["loss_at_edge"] == pytest.approx(0.45)
    never = edge_of_stability.summary({**c, "lambda_1": np.full(20, 10.0)})
    assert never["step_edge"] is None and "ratio_after_edge" not in never


@pytest.mark.slow
def test_edge_of_stability_tiny(tmp_path, mnist_env):
    numbers = edge_of_stability.run("small", tmp_path / "out", tmp_path / "runs", settings=TINY)
    json.dumps(numbers)
    for name in numbers["figures"]:
        assert (tmp_path / "out" / name).stat().st_size > 10_000
    gd = numbers["runs"]["gd_lr0.05"]
    assert gd["ratio_first"] < 1.0, "progressive sharpening starts below 2/eta"
    assert gd["step_edge"] is not None and gd["lambda_1_max_before_edge_over_first"] > 1.0, f"lambda_1 should rise to 2/eta: {gd}"
    # Measured here: 0.94-1.24 (the overshoot past 2/eta takes longer to settle on 200 points).
    assert 0.9 < gd["ratio_last_half"]["min"] and gd["ratio_last_half"]["max"] < 1.3, gd
    adam = numbers["runs"]["adam_lr0.001"]
    assert adam["measurements"] == 6 and np.isfinite(adam["lambda_1_first"]), "from the first update on"
