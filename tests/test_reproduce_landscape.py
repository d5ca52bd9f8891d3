"""Smoke tests of ``overparam reproduce lb_vs_sb`` and ``mode_connectivity`` (issue 9, obs. 2 and 7).

Tiny variants of the small scale (a few hundred digits, a narrow net, a few epochs) through the
same code: real ``overparam fit`` runs, ``overparam interpolate``/``connect`` in process, the
figures. They assert what is robust at this size: the fitted Bezier curve removes most of the
linear path's barrier; the line from the LB solution at the switch to where SB took it has no
barrier; SB (more steps per epoch) fits the training set better than LB.
"""

from __future__ import annotations

import json

import pytest

from overparam.commands import reproduce as reproduce_command
from overparam.reproduce import OBSERVATIONS, lb_vs_sb, mode_connectivity

TINY_PAIR = dict(n_train=500, n_test=500, analysis_size=500, width=[64], epochs=5, steps=150, points=9)
TINY_BATCH = dict(n_train=512, n_test=500, width=[64], lb=256, sb=32, epochs=6, switch=3, points=9)


def test_registered_with_titles(capsys):
    assert OBSERVATIONS["lb_vs_sb"] == "overparam.reproduce.lb_vs_sb"
    assert OBSERVATIONS["mode_connectivity"] == "overparam.reproduce.mode_connectivity"
    assert reproduce_command.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "lb_vs_sb" in listed and "mode_connectivity" in listed
    for module in (lb_vs_sb, mode_connectivity):
        assert set(module.SCALES) == {"small", "full"}


def test_mode_connectivity_tiny(tmp_path, mnist_env):
    numbers = mode_connectivity.run("small", tmp_path / "out", tmp_path / "runs", settings=TINY_PAIR)
    json.dumps(numbers)  # the command saves them as JSON
    assert (tmp_path / "out" / "mode_connectivity.png").stat().st_size > 10_000
    # heights above the chord (Entezari et al. 2022): the tiny nets' end losses differ
    linear, curve = numbers["barriers"]["linear/train/loss/barrier_linear"], numbers["barriers"]["bezier/train/loss/barrier_linear"]
    assert linear > 0.05, f"two independent nets should have a barrier on the segment, got {linear}"
    assert curve < 0.5 * linear, f"the fitted curve should remove most of the barrier: {curve} vs linear {linear}"
    assert numbers["barrier_during_training"], "InterpolationBarrier logged nothing during training"


@pytest.mark.slow
def test_lb_vs_sb_tiny(tmp_path, mnist_env):
    numbers = lb_vs_sb.run("small", tmp_path / "out", tmp_path / "runs", settings=TINY_BATCH)
    json.dumps(numbers)
    for name in ("lb_vs_sb_training.png", "lb_vs_sb_lines.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000
    runs = numbers["runs"]
    assert runs["sb"]["train/loss"] < runs["lb"]["train/loss"]
    assert runs["lb_to_sb"]["train/loss"] < runs["lb"]["train/loss"], "switching to SB should lower the training loss"
    switch = numbers["lines"]["switch"]
    assert switch["train/loss/barrier"] < 0.01, f"no barrier between the LB solution and where SB took it: {switch}"
    for key in ("away_lb", "away_sb"):
        assert numbers["away"][key]["rise_at_1.0"] > 0, "a random line away from a solution goes up"
