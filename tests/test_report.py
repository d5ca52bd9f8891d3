"""`overparam report jamming`: N* estimation on known flags, and a real teacher-student width sweep."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from overparam.commands.report import crossing, estimate_nstar, jamming
from overparam.runs import last_values
from overparam.errors import ConfigError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "jamming_random.yaml"


def test_crossing_interpolates_in_log_n():
    Ns = np.array([10.0, 100.0, 1000.0])
    assert crossing(Ns, np.array([0.0, 0.25, 0.75])) == pytest.approx(10 ** 2.5)
    assert crossing(Ns, np.array([0.0, 0.5, 1.0])) == pytest.approx(100.0)  # reaching 1/2 counts
    assert math.isnan(crossing(Ns, np.array([0.0, 0.0, 0.4])))
    assert math.isnan(crossing(Ns, np.array([0.6, 1.0, 1.0])))


def test_nstar_bootstrap_brackets_the_estimate():
    flags = {10: [0, 0, 0, 0], 20: [0, 1, 0, 0], 40: [1, 1, 0, 1], 80: [1, 1, 1, 1]}
    est = estimate_nstar(flags)
    # fractions 0, .25, .75, 1: crossing halfway (in log N) between 20 and 40
    assert est["N_star"] == pytest.approx(20 * 2**0.5)
    assert est["largest_unsat_N"] == 20 and est["smallest_sat_N"] == 40
    assert 10 <= est["N_star_lo"] <= est["N_star"] <= est["N_star_hi"] <= 80


def test_last_values_skips_empty_cells(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,a,b\n0,1.0,\n1,,2.0\n2,3.0,\n")
    assert last_values(str(path)) == {"epoch": 2.0, "a": 3.0, "b": 2.0}


def test_empty_runs_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no run with ConstraintCounter metrics"):
        jamming(str(tmp_path))


def run_sweep(root: Path, widths: list[int], K: int, seeds: list[int], P: int, max_steps: int) -> None:
    """The grid of configs/sweeps/jamming_random.yaml, shrunk, as in-process `overparam fit` runs."""
    import yaml

    from overparam.cli import main

    config = yaml.safe_load(CONFIG.read_text())
    counter = next(c for c in config["trainer"]["callbacks"] if c["class_path"] == "ConstraintCounter")
    counter["init_args"].update(min_plateau_steps=200, save_every=1000)  # a short first window: a test budget
    small = root.parent / "jamming_small.yaml"
    small.write_text(yaml.safe_dump(config))
    for width in widths:
        for seed in seeds:
            args = [
                "fit", "--config", str(small),
                f"--model.init_args.width={width}", f"--model.init_args.init_seed={seed}",
                f"--model.init_args.ensemble_size={K}",
                f"--data.init_args.num_train={P}", "--data.init_args.input_dim=5", "--data.init_args.num_test=200",
                "--data.init_args.passes_per_epoch=50",  # epochs of 50 steps: the lr endgame ends in ~4k steps
                f"--trainer.max_steps={max_steps}", "--trainer.enable_model_summary=false",
                "--optimizer.init_args.lr=0.03",
                f"--trainer.logger.init_args.save_dir={root}", f"--trainer.logger.init_args.name=w{width}",
                f"--trainer.logger.init_args.version=s{seed}",
            ]
            assert main(args) == 0, f"width {width} seed {seed}"


def check_report(root: Path, widths: list[int]) -> dict:
    report = jamming(str(root))
    groups = sorted(report["groups"], key=lambda g: g["N"])
    assert [g["samples"] for g in groups] == [groups[0]["samples"]] * len(widths)
    narrow, wide = groups[0], groups[-1]
    assert narrow["sat_fraction"] == 0.0 and narrow["N_delta_over_N"] > 0, "the narrowest nets must jam"
    assert wide["sat_fraction"] == 1.0 and wide["N_delta_over_N"] == 0.0, "the widest nets must reach N_Delta = 0"
    nstar = report["nstar"][0]
    assert narrow["N"] < nstar["N_star"] < wide["N"]
    assert narrow["N"] <= nstar["largest_unsat_N"] < nstar["smallest_sat_N"] <= wide["N"]
    out = Path(report["out"])
    for name in ("samples.csv", "groups.csv", "nstar.csv", "ndelta.png", "phase_diagram.png", "test_error.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "nstar.csv")))
    assert float(rows[0]["N_star"]) == pytest.approx(nstar["N_star"])
    return report


def test_report_on_a_small_real_sweep(tmp_path):
    """Two widths x one run of K = 3 vmapped seeds (P = 30): the narrow ones jam, the wide ones SAT."""
    widths = [2, 24]
    run_sweep(tmp_path / "runs", widths, K=3, seeds=[0], P=30, max_steps=20_000)
    report = check_report(tmp_path / "runs", widths)
    # K > 1 runs carry the ensemble's test error and the members' own.
    assert all(not math.isnan(g["ensemble_test_error"]) for g in report["groups"])


@pytest.mark.slow
def test_report_on_a_width_sweep_with_seeds(tmp_path):
    """Five widths x two separate seeds x K = 2 (P = 40), and the ensemble of separate runs (--ensemble)."""
    from overparam.cli import main

    widths = [2, 3, 4, 8, 32]
    run_sweep(tmp_path / "runs", widths, K=2, seeds=[0, 1], P=40, max_steps=40_000)
    report = check_report(tmp_path / "runs", widths)
    print("\n".join(f"{g['N']:>6} {g['sat_fraction']:.2f} {g['N_delta_over_N']:.3f} {g['test_error']:.3f}" for g in report["groups"]))
    assert main(["report", "jamming", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--ensemble"]) == 0


def test_a_run_stuck_in_a_dead_region_is_neither_sat_nor_jammed(tmp_path):
    """Every unsatisfied point in a dead region (N_delta_constant = N_delta): counted apart, out of N*."""
    from overparam.commands.report import read_run, summarise

    run = tmp_path / "w4"
    run.mkdir()
    (run / "hparams.yaml").write_text("N: 45\nP: 100\nK: 2\n")
    (run / "config.yaml").write_text("model:\n  init_args:\n    width: 4\n")
    (run / "metrics.csv").write_text(
        "epoch,constraints/N_delta,constraints/N_delta/member_0,constraints/N_delta/member_1,constraints/jammed/member_0,constraints/jammed/member_1,"
        "constraints/sat/member_0,constraints/sat/member_1,constraints/N_delta_constant/member_0,constraints/N_delta_constant/member_1\n"
        "3,8,7,9,1,1,0,0,7,2\n"
    )
    samples = read_run(str(run))
    assert [s["status"] for s in samples] == ["stuck", "jammed"]  # member 1: 2 of its 9 in a dead region
    (group,) = summarise(samples)
    assert group["stuck"] == 1 and group["undecided"] == 0 and group["sat_fraction"] == 0.0
