"""Smoke test of ``overparam reproduce loss_surfaces`` (issue 18): a tiny variant of the small scale
through the same code (real ``overparam fit`` runs with ``TrajectorySnapshots``, ``overparam
landscape`` in process, the figures). It asserts what holds at any size: the surfaces' centres
are the runs, the Hessian planes' curvatures are positive, a filter direction bends no more than
lambda_1 |d|^2 allows, the PCA planes explain most of each trajectory."""

from __future__ import annotations

import json

import pytest

from overparam.commands import reproduce as reproduce_command
from overparam.reproduce import OBSERVATIONS, loss_surfaces

TINY = dict(n_train=256, n_test=256, width=[32], lb=128, sb=32, epochs=4, grid=5, hessian_h=0.01, size=None)


def test_registered_with_a_title(capsys):
    assert OBSERVATIONS["loss_surfaces"] == "overparam.reproduce.loss_surfaces"
    assert reproduce_command.main(["list"]) == 0
    assert "loss_surfaces" in capsys.readouterr().out
    assert set(loss_surfaces.SCALES) == {"small", "full"}


@pytest.mark.slow
def test_loss_surfaces_tiny(tmp_path, mnist_env):
    numbers = loss_surfaces.run("small", tmp_path / "out", tmp_path / "runs", settings=TINY)
    json.dumps(numbers)  # the command saves them as JSON
    for name in numbers["figures"]:
        assert (tmp_path / "out" / name).stat().st_size > 10_000, name
    for key in ("lb", "sb"):
        r = numbers["runs"][key]
        assert r["hessian_converged"] and r["lambda_1"] >= r["lambda_2"] > 0
        assert 0 < r["filter_dHd_over_lambda1_norm2"] <= 1 + 1e-6, "d^T H d <= lambda_1 |d|^2"
        assert sum(r["pca_explained_variance"]) > 0.5
        assert r["filter_rise_r1"] > 0, "the loss rises away from a trained net"
