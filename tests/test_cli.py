"""The overparam command end to end: fit, print_config, test from a checkpoint, errors."""

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


BAD_INPUTS = [
    (["--model.width", "0"], "model.width must be positive, got 0"),
    (["--model.loss", "l1"], "model.loss must be one of cross_entropy, squared_hinge, hinge, mse; got 'l1'"),
    (["--data.num_train", "-5"], "data.num_train must be positive, got -5"),
    (["--model", "TeacherStudnt"], "--model: unknown class 'TeacherStudnt'; did you mean TeacherStudent?"),
    (["--data", "NoSuchData"], "--data: unknown class 'NoSuchData'; installed:"),
    (["--model.widht", "3"], "--model.widht: no such option of TeacherStudent; did you mean width?"),
    (["--trainer.max_epochs", "abc"], "--trainer.max_epochs: expected int or None, got 'abc'"),
    (["--trainer.callbacks+=ModelCheckpont"], "unknown class 'ModelCheckpont'; did you mean ModelCheckpoint"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[a[0] for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _exit_code(lambda: main(["fit", "-c", TS, *FAST, *args]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("overparam: error:")]
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists(), "nothing written for a rejected config"


@pytest.mark.parametrize(
    "yaml_text,message",
    [
        ("trainer:\n  max_epochz: 3\n", "--trainer.max_epochz: no such option; did you mean max_epochs"),
        ("model:\n  init_args: [unclosed\n", "Problems parsing config"),
        ("foo: 1\n", "--foo: no such option; allowed: model, data, trainer"),
    ],
)
def test_bad_yaml_is_one_line_and_exit_2(yaml_text, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(yaml_text)
    code = _exit_code(lambda: main(["fit", "-c", TS, "-c", "bad.yaml", *FAST]))
    err = capsys.readouterr().err
    assert code == 2 and message in err


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
