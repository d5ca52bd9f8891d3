"""``TrajectorySnapshots`` in a Trainer and through a resume, and ``overparam landscape`` on real runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from overparam.callbacks.surface import LossSurface
from overparam.callbacks.trajectory import TrajectorySnapshots
from overparam.cli import main as overparam
from overparam.errors import ConfigError
from overparam.functional import flatten
from overparam.plugins.teacher_student import TeacherStudent, TeacherStudentData
from overparam.runs import read_trajectory
from tests.test_landscape_cli import last_logged, one_line_error

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "teacher_student.yaml"
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


# --- the callback ---------------------------------------------------------------------------------
class Recorder(pl.Callback):
    """The parameters before every update (theta_t at step t), from the Task's step hook."""

    def __init__(self) -> None:
        self.seen: dict[int, torch.Tensor] = {}

    def on_train_step(self, trainer, pl_module, record) -> None:
        self.seen[record.index] = torch.stack([flatten(m.params).detach().clone() for m in pl_module.functional_view().members()])


@pytest.mark.parametrize("K", [1, 2])
def test_snapshots_are_the_parameters_at_their_steps(tmp_path, K):
    torch.manual_seed(0)
    data = TeacherStudentData(input_dim=8, num_train=256, num_test=64, batch_size=64)  # 4 steps per epoch
    task = TeacherStudent(width=8, input_shape=(8,), num_outputs=1, num_train=256, lr=0.2, ensemble_size=K)
    snapshots, recorder = TrajectorySnapshots(every_n_epochs=None, every_n_steps=3), Recorder()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[recorder, snapshots],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(task, datamodule=data)
    arrays = read_trajectory(Path(trainer.log_dir))
    final = torch.stack([flatten(m.params).detach() for m in task.functional_view().members()])
    assert arrays["step"].tolist() == [0, 3, 6, 8], "every 3 steps from theta_0, and the final network (8 updates)"
    assert arrays["epoch"].tolist() == [0, 0, 1, 1]
    assert arrays["params"].shape == (4, K, final.shape[1]) and arrays["params"].dtype == np.float32
    for row, step in zip(arrays["params"][:3], (0, 3, 6)):
        np.testing.assert_array_equal(row, recorder.seen[step].numpy())
    np.testing.assert_array_equal(arrays["params"][-1], final.numpy())
    assert arrays["numels"].sum() == final.shape[1] and arrays["names"].tolist() == list(task.functional_view().params)


def test_a_resumed_run_keeps_the_trajectory_of_an_uninterrupted_one(tmp_path):
    """Snapshots taken after the checkpoint a run resumes from are dropped (that training is redone)."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        common = ["fit", "-c", str(CONFIG), "--data.num_train=128", "--data.num_test=64", "--model.init_args.width=8",
                  "--trainer.callbacks+=TrajectorySnapshots", "--summary=false"]
        assert overparam([*common, "--trainer.max_epochs=4", "--trainer.logger.init_args.name=straight"]) == 0
        assert overparam([*common, "--trainer.max_epochs=2", "--trainer.logger.init_args.name=cut"]) == 0
        cut = tmp_path / "runs" / "cut" / "version_0"
        # Training lost after the checkpoint (a kill): a snapshot the resumed run must not keep.
        kept = read_trajectory(cut)
        kept["step"], kept["epoch"] = np.append(kept["step"], 99), np.append(kept["epoch"], 2)
        kept["params"] = np.concatenate([kept["params"], kept["params"][-1:] + 1])
        np.savez(cut / "trajectory" / "trajectory.npz", **kept)
        assert overparam([*common, "--trainer.max_epochs=4", "--ckpt_path", str(cut / "checkpoints" / "last.ckpt")]) == 0
    finally:
        os.chdir(cwd)
    straight, resumed = read_trajectory(tmp_path / "runs" / "straight" / "version_0"), read_trajectory(cut)
    assert resumed["step"].tolist() == straight["step"].tolist() == [0, 2, 4, 6, 8]
    np.testing.assert_array_equal(resumed["params"], straight["params"])


def test_rejects_bad_periods():
    with pytest.raises(ConfigError, match="TrajectorySnapshots.every_n_steps must be positive, got 0"):
        TrajectorySnapshots(every_n_steps=0)


class ImageLogger(CSVLogger):
    """A CSV logger that records ``log_image`` calls, as W&B's logger would receive them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.images: list[str] = []

    def log_image(self, key, images, step=None) -> None:
        self.images.append(key)


def test_loss_surface_callback_at_fit_end(tmp_path):
    torch.manual_seed(0)
    data = TeacherStudentData(input_dim=8, num_train=256, num_test=64, batch_size=64)
    task = TeacherStudent(width=8, input_shape=(8,), num_outputs=1, num_train=256, lr=0.2)
    pca, filter_ = LossSurface(plane="pca", points=5), LossSurface(points=5, range=[-0.5, 0.5], splits=["train", "test"], name="surface_filter")
    logger = ImageLogger(tmp_path)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=logger, callbacks=[TrajectorySnapshots(), pca, filter_],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(task, datamodule=data)
    folder = Path(trainer.log_dir)
    surface = np.load(folder / "surface" / "surface_end.npz")
    assert str(surface["plane"]) == "pca" and surface["trajectory"].shape[1] == 2
    exact = task.evaluate(data.analysis_batches("train"))["loss"].item()
    assert trainer.callback_metrics["surface/centre/train/loss"].item() == pytest.approx(exact, rel=1e-6)
    assert 0.5 < trainer.callback_metrics["surface/explained_variance_1"].item() <= 1
    filtered = np.load(folder / "surface_filter" / "surface_end.npz")
    assert filtered["a"].tolist() == [-0.5, -0.25, 0.0, 0.25, 0.5] and filtered["test_loss"].shape == (5, 5)
    assert "surface_filter/curvature/L_aa" in trainer.callback_metrics
    assert logger.images == ["surface/contour", "surface/surface", "surface_filter/contour", "surface_filter/surface"], "sent to W&B"
    assert (folder / "surface" / "contour_end.png").stat().st_size > 10_000


@pytest.mark.slow
def test_loss_surface_under_ddp_equals_the_full_data_evaluation(tmp_path):
    """Two CPU ranks (ddp_fork): rank 0's snapshots are broadcast, each rank evaluates its shard."""
    data = TeacherStudentData(input_dim=8, num_train=256, num_test=64, batch_size=64)
    task = TeacherStudent(width=8, input_shape=(8,), num_outputs=1, num_train=256, lr=0.2)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp_fork", logger=CSVLogger(tmp_path),
                         callbacks=[TrajectorySnapshots(), LossSurface(plane="pca", points=3)],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(task, datamodule=data)
    surface = np.load(Path(tmp_path) / "lightning_logs" / "version_0" / "surface" / "surface_end.npz")
    data.setup()
    exact = task.evaluate([data.split("train")])["loss"].item()  # the launcher hands rank 0's weights back
    i0, j0 = int(np.flatnonzero(surface["a"] == 0)[0]), int(np.flatnonzero(surface["b"] == 0)[0])
    assert surface["train_loss"][i0, j0] == pytest.approx(exact, rel=1e-6), "the centre over both ranks' shards"
    assert surface["trajectory"].shape == (4, 2), "theta_0 and three epoch ends, broadcast from rank 0"


def test_loss_surface_rejects_bad_arguments(tmp_path):
    cases = [
        (dict(plane="sharp"), "LossSurface.plane must be one of filter, hessian, pca; got 'sharp'"),
        (dict(points=1), "LossSurface.points must be an integer >= 2"),
        (dict(range=[1.0, -1.0]), r"LossSurface.range must be \[lo, hi\] with lo < hi, or null; got \[1.0, -1.0\]"),
        (dict(splits=["dev"]), "LossSurface.splits must be a non-empty list"),
        (dict(size=0), "LossSurface.size must be a positive integer or null, got 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            LossSurface(**kwargs)
    task = TeacherStudent(width=8, input_shape=(8,), num_outputs=1, num_train=256)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=[LossSurface(plane="pca")],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ConfigError, match="plane=pca needs a TrajectorySnapshots callback"):
        trainer.fit(task, datamodule=TeacherStudentData(input_dim=8, num_train=256, num_test=64))


# --- the command on finished runs ------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three short `overparam fit` runs (in-process) of one architecture; `a` keeps its trajectory,
    `b` is smooth (tanh: ReLU kinks add curvature that finite differences see and the Hessian does not)."""
    root = tmp_path_factory.mktemp("runs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        common = ["fit", "-c", str(CONFIG), "--trainer.max_epochs=4", "--data.num_train=300", "--data.num_test=400",
                  "--model.init_args.width=12"]
        for name, extra in (("a", ["--model.init_args.init_seed=1", "--trainer.callbacks+=TrajectorySnapshots"]),
                            ("b", ["--model.init_args.init_seed=2", "--model.init_args.activation=tanh"]),
                            ("c", ["--model.init_args.init_seed=3"])):
            assert overparam([*common, *extra, f"--trainer.logger.init_args.name={name}"]) == 0
    finally:
        os.chdir(cwd)
    return {name: root / "runs" / name / "version_0" for name in ("a", "b", "c")}


def test_filter_plane_centre_is_the_runs_exact_train_loss(runs, tmp_path, capsys):
    out = tmp_path / "filter"
    assert overparam(["landscape", "--run", str(runs["a"]), "--grid", "5", "--out", str(out)]) == 0
    surface = np.load(out / "surface.npz")
    assert surface["a"].tolist() == surface["b"].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert surface["train_loss"].shape == surface["test_error"].shape == (5, 5) and str(surface["plane"]) == "filter"
    assert surface["train_loss"][2, 2] == pytest.approx(last_logged(runs["a"], "final/train_loss"), rel=1e-6)
    assert surface["train_error"][2, 2] == pytest.approx(last_logged(runs["a"], "final/train_error"), abs=1e-7)
    assert surface["test_loss"][2, 2] == pytest.approx(last_logged(runs["a"], "test/loss"), rel=1e-6)
    assert surface["directions"].shape[0] == 2 and abs(float(surface["cosine"])) < 0.5
    assert float(surface["curvature:L_aa"]) > 0
    for png in ("contour.png", "surface.png"):
        assert (out / png).stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "centre:  train loss" in printed and "curvature of the train loss at the centre" in printed


def test_pca_plane_of_the_trajectory(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pca"
    monkeypatch.setenv("OVERPARAM_PROGRESS_SECONDS", "0")
    assert overparam(["landscape", "--run", str(runs["a"]), "--plane", "pca", "--grid", "4", "--splits", "train", "--out", str(out)]) == 0
    surface = np.load(out / "surface.npz")
    trajectory = read_trajectory(runs["a"])
    assert trajectory["step"].tolist() == [0, 5, 10, 15, 20], "theta_0 and every epoch end (5 steps each)"
    coords = surface["trajectory"]
    assert coords.shape == (5, 2) and np.abs(coords[-1]).max() < 1e-6, "the final network is the centre"
    ratio = surface["explained_variance_ratio"]
    assert 0.5 < ratio.sum() <= 1 + 1e-9 and ratio[0] >= ratio[1]
    # The default range holds the whole trajectory.
    assert surface["a"].min() < coords[:, 0].min() and surface["a"].max() > coords[:, 0].max()
    assert surface["train_loss"][surface["a"] == 0][0][surface["b"] == 0][0] == pytest.approx(last_logged(runs["a"], "final/train_loss"), rel=1e-6)
    captured = capsys.readouterr()
    assert "PCA of 4 snapshots: explained variance" in captured.out
    assert re.search(r"overparam landscape pca: \d+ points done in", captured.err), captured.err


def test_points_plane_passes_through_the_three_runs(runs, tmp_path):
    out = tmp_path / "points"
    # --b must share a's activation (the network is a's; only parameters move): c is at (1, 0), b is the third.
    assert overparam(["landscape", "--run", str(runs["a"]), "--plane", "points", "--b", str(runs["c"]), "--c", str(runs["b"]),
                      "--grid", "3", "--splits", "train", "--out", str(out)]) == 0
    surface = np.load(out / "surface.npz")
    i0, i1, j0 = (int(np.flatnonzero(axis == v)[0]) for axis, v in ((surface["a"], 0.0), (surface["a"], 1.0), (surface["b"], 0.0)))
    assert surface["train_loss"][i0, j0] == pytest.approx(last_logged(runs["a"], "final/train_loss"), rel=1e-6)
    assert surface["train_loss"][i1, j0] == pytest.approx(last_logged(runs["c"], "final/train_loss"), rel=1e-6), "--b at (1, 0)"
    c = surface["points"][2]
    assert surface["b"].max() > c[1] > 0 and surface["a"].min() < min(0.0, c[0])


def test_hessian_plane(runs, tmp_path, capsys):
    out = tmp_path / "hessian"
    assert overparam(["landscape", "--run", str(runs["b"]), "--plane", "hessian", "--grid", "3", "--range", "-0.1", "0.1",
                      "--splits", "train", "--out", str(out)]) == 0
    surface = np.load(out / "surface.npz")
    assert surface["converged"].all() and surface["eigenvalues"][0] >= surface["eigenvalues"][1] > 0
    # Along the top unit eigenvector the smooth surface bends like lambda_1 (to O(h^2) at h = 0.1).
    assert float(surface["curvature:L_aa"]) == pytest.approx(float(surface["eigenvalues"][0]), rel=0.05)
    assert "Hessian: lambda_1" in capsys.readouterr().out


def test_bad_inputs_end_with_one_line_and_write_nothing(runs, tmp_path, capsys):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, step=np.arange(3), epoch=np.zeros(3), params=np.zeros((3, 1, 7), np.float32), names=np.array(["w"]), numels=np.array([7]))
    never = tmp_path / "never"
    cases = [
        (["--run", str(tmp_path / "missing")], "--run: .*missing does not exist"),
        (["--run", str(runs["b"]), "--plane", "pca"], "--run: .*trajectory.npz does not exist; train the run with --trainer.callbacks\\+=TrajectorySnapshots"),
        (["--run", str(runs["a"]), "--plane", "pca", "--trajectory", str(wrong)], "--trajectory: the snapshots have 7 parameters and the run's network"),
        (["--run", str(runs["a"]), "--plane", "pca", "--trajectory", str(CONFIG)], "--trajectory: .* is not a readable trajectory"),
        (["--run", str(runs["a"]), "--plane", "points", "--b", str(runs["b"])], "--plane points needs --b and --c"),
        (["--run", str(runs["a"]), "--b", str(runs["b"])], "--b and --c go with --plane points, not --plane filter"),
        (["--run", str(runs["a"]), "--trajectory", str(wrong)], "--trajectory goes with --plane pca"),
        (["--run", str(runs["a"]), "--grid", "1"], "--grid must be an integer >= 2, got 1"),
        (["--run", str(runs["a"]), "--range", "1", "-1"], "--range LO HI needs LO < HI, got 1 -1"),
        (["--run", str(runs["a"]), "--splits", "val"], "--splits: TeacherStudentData has no 'val' split"),
        (["--run", str(runs["a"]), "--member", "1"], "--member must be a member index in 0..0"),
        (["--run", str(runs["a"]), "--plane", "sharp"], "argument --plane: invalid choice"),
        (["--run", str(runs["a"]), "--points-per-call", "0"], "--points-per-call must be a positive integer, got 0"),
    ]
    for args, message in cases:
        assert overparam(["landscape", *args, "--out", str(never)]) == 2, args
        err = one_line_error(capsys)
        assert re.search(message, err), err
    assert not never.exists(), "nothing written on error"


@pytest.mark.slow
def test_batchnorm_cnn_centre_reproduces_the_logged_loss_with_stored_statistics(cifar_root, tmp_path):
    """CIFAR-CNN with BatchNorm end to end: `--bn-centre stored` gives the logged test loss at the
    centre; every other point is recomputed the same way in both modes."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert overparam(["fit", "-c", str(CONFIG.parent / "cifar_cnn.yaml"), f"--data.data_dir={cifar_root}", "--model.init_args.width=8",
                          "--model.init_args.batch_norm=true", "--data.init_args.n_train=1000", "--data.init_args.n_test=500",
                          "--data.init_args.val_size=0", "--data.init_args.verify_integrity=false", "--data.init_args.augment=false",
                          "--trainer.max_epochs=2", "--trainer.logger.init_args.name=bn"]) == 0
        run = tmp_path / "runs" / "bn" / "version_0"
        for mode in ("stored", "recompute"):
            assert overparam(["landscape", "--run", str(run), "--grid", "3", "--range", "-0.2", "0.2", "--splits", "test",
                              "--bn-centre", mode, "--out", mode]) == 0
    finally:
        os.chdir(cwd)
    stored, recomputed = np.load(tmp_path / "stored" / "surface.npz"), np.load(tmp_path / "recompute" / "surface.npz")
    assert stored["test_loss"][1, 1] == pytest.approx(last_logged(run, "test/loss"), rel=1e-6)
    assert abs(recomputed["test_loss"][1, 1] - stored["test_loss"][1, 1]) > 1e-4, "after 4 steps the EMA statistics are not the data's"
    mask = np.ones((3, 3), bool)
    mask[1, 1] = False
    np.testing.assert_allclose(stored["test_loss"][mask], recomputed["test_loss"][mask], rtol=1e-6)
