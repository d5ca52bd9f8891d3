"""``overparam reproduce grokking`` (issue 19): its pieces on known inputs, and a tiny run end to end.

The tiny run (p = 7, a d = 8 transformer, 60 steps, one seed with and without weight decay and
one other fraction) goes through the same code as the small scale: real ``overparam fit`` runs of
``configs/grokking.yaml``, the numbers and the figures. At this size nothing groks; it checks the
plumbing: every run read back, the Hessian at fit start, at the log-spaced epochs and at fit end,
the weight norm, the figures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from overparam.reproduce import OBSERVATIONS, grokking

TINY = dict(p=7, fraction=0.5, d_model=8, d_mlp=16, lr=3e-3, weight_decays=[1.0, 0.0], seeds=[0], max_steps=60,
            passes=10, hessian_points=3, hessian_size=16, fractions=[0.6], parallel=2)


def test_registered():
    assert OBSERVATIONS["grokking"] == "overparam.reproduce.grokking"
    assert set(grokking.SCALES) == {"small", "full"} and grokking.TITLE


def test_first_step_is_the_first_crossing():
    steps, accuracy = np.array([10, 20, 30, 40]), np.array([0.1, 0.995, 0.98, 1.0])
    assert grokking.first_step(steps, accuracy) == 20
    assert grokking.first_step(steps, np.array([0.1, 0.5, 0.9, 0.98])) is None


def test_hessian_epochs_are_log_spaced_and_leave_the_end_to_the_fit_end_analysis():
    s = dict(max_steps=6000, passes=50, hessian_points=8)  # 120 epochs
    assert grokking.hessian_epochs(s) == [0, 1, 3, 7, 14, 30, 60]  # after 1, 2, 4, 8, 15, 31, 61 epochs


def test_jobs_share_the_main_fraction_run():
    s = {**grokking.SCALES["small"], "seeds": [0, 1], "fractions": [0.5, 0.6]}
    assert list(grokking.jobs(s)) == ["wd1_frac0.5_s0", "wd1_frac0.5_s1", "wd0_frac0.5_s0", "wd0_frac0.5_s1", "wd1_frac0.6_s0"]


def test_arm_numbers_average_the_seeds_that_reached_99():
    runs = [{"steps_to_test_99": t, "steps_to_train_99": 100, "final_test_accuracy": 1.0} for t in (600, 800, None)]
    arm = grokking.arm_numbers(runs)
    assert arm["reached"] == "2/3" and arm["mean_steps_to_test_99"] == 700 and arm["sd_steps_to_test_99"] == pytest.approx(141.42, rel=1e-4)


@pytest.mark.slow  # three `overparam fit` processes: ~30 s on an idle 2-core CPU
def test_tiny_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    numbers = grokking.run("small", tmp_path / "out", tmp_path / "runs", settings=TINY)
    json.dumps(numbers)
    assert numbers["P"] == round(0.5 * 49) and set(numbers["runs"]) == {"wd1_frac0.5_s0", "wd0_frac0.5_s0", "wd1_frac0.6_s0"}
    for name in numbers["figures"]:
        assert (tmp_path / "out" / name).stat().st_size > 10_000, name
    run = numbers["runs"]["wd1_frac0.5_s0"]
    assert list(run["hessian_top1"]) == ["0", "10", "20", "60"], "fit start, after epochs 1 and 2, fit end"
    assert all(v > 0 for v in run["hessian_top1"].values()) and run["steps"] == 60
    assert run["weight_norm"]["final"] < numbers["runs"]["wd0_frac0.5_s0"]["weight_norm"]["final"], "weight decay shrinks the weights"
    assert set(numbers["arms"]) == {"weight_decay=1", "weight_decay=0"}
