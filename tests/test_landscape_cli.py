"""``InterpolationBarrier`` in a Trainer, and ``overparam interpolate`` / ``connect`` on real runs."""

from __future__ import annotations

import copy
import csv
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from overparam.callbacks.barriers import InterpolationBarrier
from overparam.cli import main as overparam
from overparam.errors import ConfigError
from overparam.losses import errors
from overparam.plugins.teacher_student import TeacherStudent, TeacherStudentData

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "teacher_student.yaml"
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


def small_data(**kwargs):
    return TeacherStudentData(input_dim=8, num_train=256, num_test=300, batch_size=64, **kwargs)


def fit(task, data, callback, tmp_path, epochs=2):
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(task, datamodule=data)
    return trainer


def mean_loss_error(task, x, y, params=None, member=0):
    view = task.functional_view().member(member)
    with torch.no_grad():
        out = view.fn(params or view.params, view.buffers, x)
    return task.loss_fn(out, y).item(), errors(out, y).mean().item()


# --- the callback ---------------------------------------------------------------------------------
def test_callback_from_init_logs_barriers_and_saves_the_curve(tmp_path):
    torch.manual_seed(0)
    data = small_data()
    task = TeacherStudent(width=32, input_shape=(8,), num_outputs=1, num_train=256, lr=0.2, momentum=0.9)
    initial = {n: p.detach().clone() for n, p in task.functional_view().params.items()}
    callback = InterpolationBarrier(reference="init", points=5, t_min=-0.5, t_max=1.5)
    trainer = fit(task, data, callback, tmp_path)
    for key in ("train/loss/barrier", "train/loss/barrier_linear", "test/error/barrier"):
        assert f"barriers/{key}" in trainer.callback_metrics, f"{key} not logged: {sorted(trainer.callback_metrics)}"
    folder = Path(trainer.log_dir) / "barriers"
    curve = np.load(folder / "curve_end.npz")
    assert (folder / "curve_end.png").stat().st_size > 1000
    assert curve["t"].tolist() == [-0.5, 0.0, 0.5, 1.0, 1.5]
    for split in ("train", "test"):
        x, y = data.split(split)
        start, end = mean_loss_error(task, x, y, initial), mean_loss_error(task, x, y)
        assert curve[f"{split}_loss"][1] == pytest.approx(start[0], rel=1e-5), "t = 0 is the initial network"
        assert curve[f"{split}_loss"][3] == pytest.approx(end[0], rel=1e-5), "t = 1 is the trained network"
        assert curve[f"{split}_error"][3] == pytest.approx(end[1], abs=1e-6)
    assert callback.history[-1]["tag"] == "end"
    assert "initial" in callback.state_dict(), "the initial weights travel with the checkpoint"


class BatchNormStudent(TeacherStudent):
    """A student with BatchNorm: the callback must recompute its statistics along the path."""

    def make_network(self):
        return torch.nn.Sequential(torch.nn.Linear(self.in_dim, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def test_callback_recomputes_batchnorm_statistics(tmp_path):
    data = small_data()
    task = BatchNormStudent(input_shape=(8,), num_outputs=1, num_train=256, lr=0.2)
    callback = InterpolationBarrier(reference="init", points=3, splits=["test"])  # statistics still from train
    trainer = fit(task, data, callback, tmp_path, epochs=1)
    curve = np.load(Path(trainer.log_dir) / "barriers" / "curve_end.npz")
    x, y = data.split("train")
    xt, yt = data.split("test")
    before = {n: b.clone() for n, b in task.net.named_buffers()}
    precise = copy.deepcopy(task.net)
    torch.optim.swa_utils.update_bn([x], precise)  # statistics of all 256 points at the trained weights
    precise.eval()
    with torch.no_grad():
        assert curve["test_loss"][-1] == pytest.approx(task.loss_fn(precise(xt), yt).item(), rel=1e-5)
    callback._run(trainer, task, "again")
    assert all(torch.equal(b, before[n]) for n, b in task.net.named_buffers()), "the net's own statistics are untouched"


def test_callback_between_two_ensemble_members(tmp_path):
    data = small_data()
    task = TeacherStudent(width=16, input_shape=(8,), num_outputs=1, num_train=256, lr=0.2, ensemble_size=2)
    callback = InterpolationBarrier(reference="member", points=3, splits=["test"])
    from_init = InterpolationBarrier(reference="init", points=3, splits=["test"], name="barriers_init")
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[callback, from_init],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # two instances in one Trainer: their state keys differ
    trainer.fit(task, datamodule=data)
    curve = np.load(Path(trainer.log_dir) / "barriers" / "curve_end.npz")
    x, y = data.split("test")
    assert curve["test_loss"][0] == pytest.approx(mean_loss_error(task, x, y, member=0)[0], rel=1e-5)
    assert curve["test_loss"][-1] == pytest.approx(mean_loss_error(task, x, y, member=1)[0], rel=1e-5)
    assert "barriers/test/loss/barrier" in trainer.callback_metrics
    for k in range(2):
        assert f"barriers_init/member_{k}/test/loss/barrier" in trainer.callback_metrics
    resumed = InterpolationBarrier(reference="init", name="barriers_init")
    resumed.load_state_dict(from_init.state_dict())
    assert resumed.history == from_init.history and all(torch.equal(resumed.initial[n], v.cpu()) for n, v in from_init.initial.items())


@pytest.mark.slow
def test_callback_under_ddp_equals_the_full_data_evaluation(tmp_path):
    """Two CPU ranks (ddp_fork): each evaluates its shard; the saved curve is the full-data one."""
    data = small_data()
    task = TeacherStudent(width=16, input_shape=(8,), num_outputs=1, num_train=256, lr=0.2)
    initial = {n: p.detach().clone() for n, p in task.functional_view().params.items()}
    callback = InterpolationBarrier(reference="init", points=3)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_fork", logger=CSVLogger(tmp_path), callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(task, datamodule=data)
    curve = np.load(Path(tmp_path) / "lightning_logs" / "version_0" / "barriers" / "curve_end.npz")
    # t = 0 (the initial net) on all 256 points, each rank having evaluated its half.
    data.setup()
    x, y = data.split("train")
    assert curve["train_loss"][0] == pytest.approx(mean_loss_error(task, x, y, initial)[0], rel=1e-5)
    # Lightning's launcher hands rank 0's trained weights back to this process.
    assert curve["train_loss"][-1] == pytest.approx(mean_loss_error(task, x, y)[0], rel=1e-5)
    assert np.isfinite(curve["train_loss"]).all() and np.isfinite(curve["test_error"]).all()


def test_callback_rejects_bad_arguments(tmp_path):
    cases = [
        (dict(reference="nowhere.ckpt"), "InterpolationBarrier.reference must be init, member or an existing"),
        (dict(points=1), "InterpolationBarrier.points must be an integer >= 2"),
        (dict(t_min=1.0, t_max=0.0), "InterpolationBarrier.t_min must be smaller"),
        (dict(splits=["dev"]), "InterpolationBarrier.splits must be"),
        (dict(members=[1, 1]), "InterpolationBarrier.members must be two different"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            InterpolationBarrier(**kwargs)
    task = TeacherStudent(width=8, input_shape=(8,), num_outputs=1, num_train=256)
    with pytest.raises(ConfigError, match="reference=member needs an ensemble"):
        fit(task, small_data(), InterpolationBarrier(reference="member"), tmp_path, epochs=1)


# --- the commands on finished runs ------------------------------------------------------------------
def last_logged(run: Path, key: str) -> float:
    with open(run / "metrics.csv") as f:
        values = [row[key] for row in csv.DictReader(f) if row.get(key)]
    return float(values[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three short `overparam fit` runs (in-process): two seeds, and one of another width."""
    root = tmp_path_factory.mktemp("runs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        common = ["fit", "-c", str(CONFIG), "--trainer.max_epochs=2", "--data.num_train=300", "--data.num_test=400", "--model.init_args.width=16"]
        for name, extra in (
            ("a", ["--model.init_args.init_seed=1"]),
            ("b", ["--model.init_args.init_seed=2"]),
            ("wide", ["--model.init_args.width=24"]),
            ("pair", ["--model.init_args.ensemble_size=2", "--trainer.max_epochs=1"]),
        ):
            assert overparam([*common, *extra, f"--trainer.logger.init_args.name={name}"]) == 0
    finally:
        os.chdir(cwd)
    return {name: root / "runs" / name / "version_0" for name in ("a", "b", "wide", "pair")}


def test_callback_from_a_checkpoint_of_another_run(runs, tmp_path):
    from overparam.runs import load_run

    data = TeacherStudentData(input_dim=10, num_train=300, num_test=400, batch_size=64)
    task = TeacherStudent(width=16, input_shape=(10,), num_outputs=1, num_train=300, init_seed=7)
    callback = InterpolationBarrier(reference=str(runs["a"]), points=3, splits=["test"])
    trainer = fit(task, data, callback, tmp_path, epochs=1)
    curve = np.load(Path(trainer.log_dir) / "barriers" / "curve_end.npz")
    x, y = data.split("test")
    reference = load_run(str(runs["a"]), "--a").task
    assert curve["test_loss"][0] == pytest.approx(mean_loss_error(reference, x, y)[0], rel=1e-5), "t = 0 is run a"
    assert curve["test_loss"][-1] == pytest.approx(mean_loss_error(task, x, y)[0], rel=1e-5)
    wide = TeacherStudent(width=8, input_shape=(10,), num_outputs=1, num_train=300)
    with pytest.raises(ConfigError, match=r"different architectures: layers.1.weight is \(16, 10\) in the reference checkpoint and \(8, 10\)"):
        fit(wide, data, InterpolationBarrier(reference=str(runs["a"])), tmp_path, epochs=1)


def test_interpolate_endpoints_reproduce_the_logged_losses(runs, tmp_path, capsys):
    out = tmp_path / "lin"
    assert overparam(["interpolate", "--a", str(runs["a"]), "--b", str(runs["b"] / "checkpoints" / "last.ckpt"), "--points", "5", "--out", str(out)]) == 0
    curve = np.load(out / "curve.npz")
    assert curve["test_loss"][0] == pytest.approx(last_logged(runs["a"], "test/loss"), rel=1e-6)
    assert curve["test_loss"][-1] == pytest.approx(last_logged(runs["b"], "test/loss"), rel=1e-6)
    assert curve["test_error"][0] == pytest.approx(last_logged(runs["a"], "test/error"), abs=1e-7)
    barriers = json.loads((out / "barriers.json").read_text())
    assert barriers["linear/train/loss/barrier"] == pytest.approx(float(curve["barrier:linear/train/loss/barrier"]))
    assert (out / "curve.png").is_file()
    assert "barrier" in capsys.readouterr().out


def test_interpolate_between_the_members_of_one_ensemble_run(runs, tmp_path):
    out = tmp_path / "members"
    assert overparam(["interpolate", "--a", str(runs["pair"]), "--b", str(runs["pair"]), "--points", "3", "--splits", "test", "--out", str(out)]) == 0
    curve = np.load(out / "curve.npz")
    assert curve["test_loss"][0] == pytest.approx(last_logged(runs["pair"], "test/loss/member_0"), rel=1e-6)
    assert curve["test_loss"][-1] == pytest.approx(last_logged(runs["pair"], "test/loss/member_1"), rel=1e-6)


def test_connect_fits_a_curve_that_interpolate_reuses(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "conn"
    args = ["--a", str(runs["a"]), "--b", str(runs["b"]), "--points", "5", "--out", str(out)]
    monkeypatch.setenv("OVERPARAM_PROGRESS_SECONDS", "0")  # a progress line at every step and point
    assert overparam(["connect", *args, "--steps", "150", "--lr", "0.1"]) == 0
    err = capsys.readouterr().err
    assert "overparam connect fitting the bezier curve: 150 steps done in" in err
    assert "overparam connect linear: 3/5 points (60%)" in err and "overparam connect bezier: 5 points done in" in err
    fitted = json.loads((out / "barriers.json").read_text())
    assert fitted["bezier/train/loss/barrier"] <= fitted["linear/train/loss/barrier"] + 1e-6, fitted
    again = tmp_path / "again"
    args[-1] = str(again)
    assert overparam(["interpolate", *args, "--path", "bezier", "--curve", str(out / "curve.npz")]) == 0
    np.testing.assert_allclose(np.load(again / "curve.npz")["train_loss"], np.load(out / "curve.npz")["train_loss"], rtol=1e-6)


def test_line_along_a_filter_normalised_direction(runs, tmp_path):
    out = tmp_path / "line"
    assert overparam(["interpolate", "--a", str(runs["a"]), "--direction", "filter", "--t-min", "-1", "--t-max", "1", "--points", "5", "--out", str(out)]) == 0
    curve = np.load(out / "curve.npz")
    assert curve["t"].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert curve["test_loss"][2] == pytest.approx(last_logged(runs["a"], "test/loss"), rel=1e-6)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("overparam: error: "), err
    return err


def test_bad_inputs_end_with_one_line(runs, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    cases = [
        (["--a", str(tmp_path / "missing"), "--b", str(runs["b"])], "--a: .*missing does not exist"),
        (["--a", str(runs["a"]), "--b", str(empty)], "--b: no checkpoints/last.ckpt in run folder"),
        (["--a", str(runs["a"]), "--b", str(runs["wide"])], r"different architectures: layers.1.weight is \(16, 10\) in --a and \(24, 10\) in --b"),
        (["--a", str(runs["a"])], "exactly one of --b .* and --direction"),
        (["--a", str(runs["a"]), "--b", str(runs["b"]), "--splits", "val"], "--splits: TeacherStudentData has no 'val' split"),
        (["--a", str(runs["a"]), "--b", str(runs["b"]), "--points", "1"], "points must be an integer >= 2"),
        (["--b", str(runs["b"])], "the following arguments are required: --a"),
        (["--a", str(runs["a"]), "--b", str(runs["b"]), "--path", "spline"], "argument --path: invalid choice"),
    ]
    for args, message in cases:
        assert overparam(["interpolate", *args, "--out", str(tmp_path / "never")]) == 2, args
        err = one_line_error(capsys)
        assert __import__("re").search(message, err), err
    assert overparam(["connect", "--a", str(runs["a"]), "--b", str(runs["b"]), "--path=linear"]) == 2
    assert "overparam connect fits a curve" in one_line_error(capsys)
    assert not (tmp_path / "never").exists(), "nothing written on error"


@pytest.mark.slow
def test_connect_two_mnist_fc_runs(mnist_root, tmp_path):
    """The MNIST-FC plugin end to end: two seeds on 2,000 digits, linear barrier vs fitted curve."""
    config = CONFIG.parent / "mnist_fc.yaml"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        common = ["fit", "-c", str(config), f"--data.data_dir={mnist_root}", "--data.n_train=2000", "--data.n_test=2000",
                  "--data.val_size=0", "--model.init_args.width=[64]", "--trainer.max_epochs=8", "--data.batch_size=100"]
        for seed in (1, 2):
            assert overparam([*common, f"--model.init_args.init_seed={seed}", f"--trainer.logger.init_args.name=s{seed}"]) == 0
        a, b = tmp_path / "runs" / "s1" / "version_0", tmp_path / "runs" / "s2" / "version_0"
        out = tmp_path / "conn"
        assert overparam(["connect", "--a", str(a), "--b", str(b), "--points", "11", "--steps", "600", "--lr", "0.05", "--out", str(out)]) == 0
    finally:
        os.chdir(cwd)
    barriers = json.loads((out / "barriers.json").read_text())
    print({k: round(v, 4) for k, v in barriers.items() if "/t_" not in k})
    curve = np.load(out / "curve.npz")
    assert curve["linear_test_loss"][0] == pytest.approx(last_logged(a, "test/loss"), rel=1e-6)
    assert curve["linear_test_loss"][-1] == pytest.approx(last_logged(b, "test/loss"), rel=1e-6)
    assert barriers["linear/train/loss/barrier"] > 0.1, barriers
    assert barriers["bezier/train/loss/barrier"] < 0.5 * barriers["linear/train/loss/barrier"], barriers


@pytest.mark.slow
def test_batchnorm_cnn_runs_reproduce_their_logged_losses_with_stored_endpoints(cifar_root, tmp_path):
    """CIFAR-CNN with BatchNorm end to end: `--bn-endpoints stored` gives the logged test losses."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        common = ["fit", "-c", str(CONFIG.parent / "cifar_cnn.yaml"), f"--data.data_dir={cifar_root}", "--model.init_args.width=8",
                  "--model.init_args.batch_norm=true", "--data.init_args.n_train=1000", "--data.init_args.n_test=500",
                  "--data.init_args.val_size=0", "--data.init_args.verify_integrity=false", "--data.init_args.augment=false",
                  "--trainer.max_epochs=2"]
        for seed in (1, 2):
            assert overparam([*common, f"--model.init_args.init_seed={seed}", f"--trainer.logger.init_args.name=s{seed}"]) == 0
        a, b = tmp_path / "runs" / "s1" / "version_0", tmp_path / "runs" / "s2" / "version_0"
        for mode in ("stored", "recompute"):
            assert overparam(["interpolate", "--a", str(a), "--b", str(b), "--points", "3", "--splits", "test", "--bn-endpoints", mode, "--out", mode]) == 0
    finally:
        os.chdir(cwd)
    stored, recomputed = np.load(tmp_path / "stored" / "curve.npz"), np.load(tmp_path / "recompute" / "curve.npz")
    assert stored["test_loss"][0] == pytest.approx(last_logged(a, "test/loss"), rel=1e-6)
    assert stored["test_loss"][-1] == pytest.approx(last_logged(b, "test/loss"), rel=1e-6)
    assert stored["test_loss"][1] == pytest.approx(recomputed["test_loss"][1], rel=1e-6), "the middle is recomputed in both"
    assert abs(recomputed["test_loss"][0] - stored["test_loss"][0]) > 1e-4, "after 4 steps the EMA statistics are not the data's"
