"""Smoke tests of ``overparam reproduce hessian_spectrum`` and ``ggn_split`` (issue 9, obs. 3 and 4).

A tiny variant of the small scale (512 digits, one hidden layer of 32, 8 epochs, the Hessian
on 128 points; ~90 s on the shared CPU, so ``-m slow``) through the same code: real ``overparam fit`` runs with ``HessianSpectrum``, the
engine on the end checkpoints, the figures. Asserted where robust at this size: the top
eigenvalue grows during training; at the end the digits have several outliers and parity (one
output) one or two (rule with k = 2C + 1; largest log-gap: 1); the outliers of H are those of G; the residual R has both signs and is small
next to the top outlier; G has no negative eigenvalue.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from overparam.commands import reproduce as reproduce_command
from overparam.reproduce import OBSERVATIONS, ggn_split, hessian_spectrum

TINY = dict(n_train=512, analysis_size=128, width=[32], epochs=8, batch_sizes=[32, 256], top_k=21)


def test_registered_with_titles(capsys):
    assert OBSERVATIONS["hessian_spectrum"] == "overparam.reproduce.hessian_spectrum"
    assert OBSERVATIONS["ggn_split"] == "overparam.reproduce.ggn_split"
    assert reproduce_command.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "hessian_spectrum" in listed and "ggn_split" in listed
    assert set(hessian_spectrum.SCALES) == {"small", "full"}


def test_outlier_counts():
    lam = np.array([24.2, 17.1, 13.1, 12.4, 9.4, 8.1, 7.1, 5.9, 4.8, 2.4, 2.1, 2.0, 1.7, 1.6, 1.6, 1.6, 1.5, 1.4, 1.4, 1.4, 1.3])
    c = hessian_spectrum.counts(lam, classes=10)
    assert c == {"rule_k21": 9, "rule_k2C+1": 9, "largest_log_gap": 9}
    # parity (k = 5): the rule compares with the 5th value, so it sees at most 4 outliers
    assert hessian_spectrum.counts(np.array([9.0, 3.0, 2.8, 2.7, 2.6, 0.5]), classes=2)["rule_k2C+1"] == 1
    assert hessian_spectrum.gap_count(np.array([1.0, 0.9, 0.8])) == 2  # no gap: whatever is largest, a weak count


@pytest.mark.slow
def test_hessian_and_ggn_tiny(tmp_path, mnist_env):
    runs = tmp_path / "runs"
    numbers = hessian_spectrum.run("small", tmp_path / "out", runs, settings=TINY)
    json.dumps(numbers)
    for name in ("hessian_spectrum_start_end.png", "hessian_spectrum_batch_size.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000
    digits, parity = numbers["runs"]["digits_b32"], numbers["runs"]["parity_b32"]
    assert digits["end"]["top"][0] > 1.3 * digits["start"]["top"][0], "the top eigenvalue should grow during training"
    # the count with the callback's default k = 2C + 1 (tiny run: digits 10, parity 1; gaps 9 and 1)
    assert digits["end"]["outliers"]["rule_k2C+1"] >= 5
    assert parity["end"]["outliers"]["rule_k2C+1"] <= 2 and parity["end"]["outliers"]["largest_log_gap"] == 1

    split = ggn_split.run("small", tmp_path / "out", runs, settings=TINY)  # reuses the runs
    json.dumps(split)
    assert (tmp_path / "out" / "ggn_split_digits_b32.png").stat().st_size > 10_000
    d = split["runs"]["digits_b32"]
    assert d["outlier_rel_diff_G_vs_H"] < 0.1, "the outliers of H should be those of G"
    assert d["R_largest"] > 0 > d["R_smallest"], "R should have eigenvalues of both signs"
    assert d["R_norm_over_H_top1"] < 0.5
    assert d["G_slq_min_node"] > -1e-3 * d["H_top"][0], "G is positive semi-definite"
    t = d["traces"]
    assert abs(t["ggn_trace"] + t["residual_trace"] - t["trace"]) < 1e-3 * abs(t["trace"]) + 1e-6
