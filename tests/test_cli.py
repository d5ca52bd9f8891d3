"""The overparam command end to end: fit, print_config, test from a checkpoint, where runs go, resuming."""

import csv
import os
from pathlib import Path

import pytest
import yaml

from overparam.cli import main
from tests.conftest import CONFIGS

TS = str(CONFIGS / "teacher_student.yaml")
FAST = ["--trainer.max_epochs", "2", "--data.num_train", "200", "--data.num_test", "200"]


def test_fit_leaves_a_run_folder_and_prints_a_summary(cli, tmp_path):
    result = cli("fit", "-c", TS, "--model.width", "32", "--trainer.max_epochs", "3")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "teacher_student" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["width"] == 32 and config["trainer"]["max_epochs"] == 3
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    epochs = {r["epoch"] for r in rows if r.get("train/loss")}
    assert epochs == {"0", "1", "2"}
    assert any(r.get("test/error") for r in rows), "the summary's test pass is logged too"
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["N"] == 32 * 11 + 33 * 32 + 33 and hparams["P"] == 1000
    assert "overparam summary: N = 1,441  P = 1,000" in result.stdout
    assert "test  loss" in result.stdout and "train loss" in result.stdout

    # test from the checkpoint reproduces the summary's test error
    tested = cli("test", "-c", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert tested.returncode == 0, tested.stderr
    final = [r for r in rows if r.get("test/error")][-1]["test/error"]
    assert f"{float(final):.6f}"[:6] in tested.stdout


def test_print_config_and_help(cli):
    printed = cli("fit", "-c", TS, "--model.width", "7", "--print_config")
    assert printed.returncode == 0
    config = yaml.safe_load(printed.stdout)
    assert config["model"]["init_args"]["width"] == 7
    assert "input_shape" not in config["model"]["init_args"], "linked from the DataModule"
    helped = cli("--help")
    for sub in ("fit", "validate", "test", "predict", "plugins"):
        assert sub in helped.stdout


def test_any_torch_optimizer_replaces_sgd(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", TS, *FAST, "--optimizer", "Adam", "--optimizer.lr", "0.01", "--summary", "false"]) == 0
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    import torch

    state = torch.load(checkpoint, weights_only=False)["optimizer_states"][0]
    assert state["param_groups"][0]["lr"] == 0.01 and "betas" in state["param_groups"][0]


def test_console_script_is_installed(tmp_path):
    import shutil
    import subprocess

    exe = shutil.which("overparam") or str(Path(os.sys.executable).parent / "overparam")
    out = subprocess.run([exe, "plugins"], capture_output=True, text=True, cwd=tmp_path)
    assert "TeacherStudent" in out.stdout


# Bad inputs (one line, exit code 2, nothing written) are the table of tests/test_cli_errors.py.


def test_earlier_run_folder_untouched_by_a_rejected_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", TS, *FAST]) == 0
    run = tmp_path / "runs" / "teacher_student"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert _exit_code(lambda: main(["fit", "-c", TS, "--model.depth", "0", *FAST])) == 2
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_divergence_stops_naming_the_step(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", TS, "--model.lr", "100", "--model.loss", "mse", "--data.target", "regression", *FAST]
    assert _exit_code(lambda: main(args)) == 3
    err = capsys.readouterr().err
    assert "overparam: error: training diverged: non-finite loss at step" in err
    assert not list(tmp_path.rglob("*.ckpt")), "no checkpoint of a diverged network"


def _exit_code(run) -> int:
    try:
        return run()
    except SystemExit as exc:
        return exc.code


def test_default_root_dir_decides_where_the_run_folder_goes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", TS, *FAST, "--trainer.default_root_dir", "elsewhere/out", "--summary", "false"]) == 0
    assert (tmp_path / "elsewhere" / "out" / "teacher_student" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"], "nothing in ./runs"


def test_resume_continues_in_the_run_folder_and_names_what_the_checkpoint_overrides(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", TS, *FAST, "--summary", "false"]) == 0
    run = tmp_path / "runs" / "teacher_student" / "version_0"
    # Rows of an epoch trained after the last checkpoint and lost (a kill): the resume redoes it.
    header = next(csv.reader((run / "metrics.csv").open()))
    with open(run / "metrics.csv", "a", newline="") as f:
        csv.DictWriter(f, header).writerow({"epoch": 2, "step": 99, "train/loss": 9.9, "train/error": 0.5})
    capsys.readouterr()
    resume = ["fit", "-c", TS, *FAST, "--trainer.max_epochs", "4", "--model.lr", "0.01", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    assert main(resume) == 0
    err = capsys.readouterr().err
    assert "overparam: warning: --ckpt_path: resuming the checkpoint's model, whose values replace the config's: model.lr = 0.1 (config: 0.01)" in err
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"], "no second folder for one run"
    assert sorted(p.name for p in (run / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    epochs = [r["epoch"] for r in rows if r.get("train/loss")]
    assert epochs == ["0", "1", "2", "3"], epochs
    assert "9.9" not in {r.get("train/loss") for r in rows}, "the lost epoch's row was dropped"


def test_testing_a_checkpoint_of_another_width_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", TS, *FAST, "--model.width", "8", "--summary", "false"]) == 0
    checkpoint = tmp_path / "runs" / "teacher_student" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(["test", "-c", TS, *FAST, "--ckpt_path", str(checkpoint)]) == 0
    err = capsys.readouterr().err
    assert "overparam: warning: --ckpt_path: test runs the checkpoint's model, whose values replace the config's: model.width = 8 (config: 64)" in err
