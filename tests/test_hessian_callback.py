"""HessianSpectrum: logged values and files, exact agreement, K > 1, subspace option, errors."""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from overparam.callbacks import HessianSpectrum
from overparam.curvature.outliers import count_outliers
from overparam.curvature import dense_hessian, eigvalsh
from overparam.errors import ConfigError
from overparam.plugins.teacher_student import TeacherStudent, TeacherStudentData

try:
    from tests.conftest import CONFIGS
except ImportError:  # tests/ not a package
    from conftest import CONFIGS


def _fit(tmp_path, callbacks, width=8, ensemble_size=1, init_seed=0, max_epochs=1, target="multiclass", **trainer_kw):
    data = TeacherStudentData(input_dim=5, num_train=96, num_test=32, target=target, num_classes=3, batch_size=32)
    task = TeacherStudent(
        width=width, depth=1, input_shape=data.input_shape, num_outputs=data.num_outputs, num_train=data.num_train,
        lr=0.2, ensemble_size=ensemble_size, init_seed=init_seed,
    )
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=max_epochs, callbacks=callbacks, logger=CSVLogger(tmp_path), accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **trainer_kw,
    )
    trainer.fit(task, datamodule=data)
    return trainer, task, data


def test_count_outliers_rule():
    for eigenvalues, expected in [
        ([24.2, 17.1, 13.1, 12.4, 9.4, 8.1, 7.1, 5.9, 4.8, 2.4, 2.1, 2.0, 1.7, 1.3], 9),  # MNIST, fit end
        ([10.0, 9.0, 1.0, 0.9, 0.8], 2),
        ([1.0, 0.9, 0.8], 0),  # all bulk
        ([3.0, 0.5, -0.1, -0.2], 2),  # bulk edge below zero: the positive ones stand out
        ([-1.0, -2.0], 0),
        ([5.0], 0),  # no edge to compare with
    ]:
        assert count_outliers(eigenvalues, ratio=2.0) == expected, eigenvalues


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hvp_mode": "magic"}, "HessianSpectrum.hvp_mode must be one of auto"),
        ({"top_k": 0}, "HessianSpectrum.top_k must be positive"),
        ({"outlier_ratio": 1.0}, "HessianSpectrum.outlier_ratio must be greater than 1"),
        ({"density_steps": 1}, "HessianSpectrum.density_steps must be at least 2"),
        ({"subspace_every_n_steps": -3}, "HessianSpectrum.subspace_every_n_steps must be positive"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HessianSpectrum(**kwargs)


def test_exact_refuses_a_large_model(tmp_path):
    with pytest.raises(ConfigError, match="exact needs N <= exact_max_params = 10"):
        _fit(tmp_path, [HessianSpectrum(exact=True, exact_max_params=10)])


def test_spectrum_matches_the_dense_hessian_and_leaves_training_untouched(tmp_path):
    callback = HessianSpectrum(top_k=4, bottom_k=1, density_steps=20, ggn_split=True, exact=True, trace_probes=4)
    trainer, task, data = _fit(tmp_path / "with", [callback])
    _, plain, _ = _fit(tmp_path / "without", [])
    for (name, p), q in zip(task.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), f"the callback changed training ({name})"
    # Fit end: Lanczos top-4 against eigvalsh of the dense Hessian on the same (whole) data.
    view = task.functional_view()
    H = dense_hessian(view.fn, view.params, task.loss_fn, data.analysis_batches(), view.buffers, dtype=torch.float64)
    exact = eigvalsh(H)
    end = callback.history[-1]
    assert end["tag"] == "end" and [h["tag"] for h in callback.history] == ["start", "end"]
    np.testing.assert_allclose(end["eigenvalues"], exact[:4].numpy(), rtol=1e-4)
    assert end["bottom1"] == pytest.approx(float(exact[-1]), rel=1e-4, abs=1e-6 * float(exact[0]))
    assert end["exact_top1"] == pytest.approx(float(exact[0]), rel=1e-5)
    assert end["ggn_trace"] + end["residual_trace"] == pytest.approx(end["trace"], rel=1e-5)
    assert end["outliers"] == count_outliers(end["eigenvalues"])
    # Logged to the logger and to callback_metrics.
    assert float(trainer.callback_metrics["hessian/top1"]) == pytest.approx(end["top1"], rel=1e-6)
    rows = list(csv.DictReader(open(f"{trainer.log_dir}/metrics.csv")))
    logged = [float(r["hessian/top1"]) for r in rows if r.get("hessian/top1")]
    assert logged == pytest.approx([h["top1"] for h in callback.history], rel=1e-6)
    # Files: one npz per analysis, PNGs.
    arrays = np.load(f"{trainer.log_dir}/hessian/end.npz")
    assert arrays["eigenvalues"].shape == (1, 4) and arrays["exact_eigenvalues"].shape == (1, task.N)
    assert np.all(np.diff(arrays["eigenvalues"][0]) <= 0)
    assert arrays["density_nodes"].shape == (1, 10, 20) and int(arrays["density_probes"]) == 10
    np.testing.assert_allclose(arrays["density_weights"].sum(-1), 1.0, rtol=1e-5)
    # Every value has its uncertainty beside it: residuals and converged flags, SEs, the band.
    for key in ("converged", "bottom_converged", "ggn_converged", "residual_extremes_converged"):
        assert np.all(arrays[key] == 1), key
    assert arrays["ritz_residuals"].shape == (1, 4) and arrays["residual_extremes_ritz_residuals"].shape == (1, 2)
    assert np.all(arrays["ritz_residuals"] <= float(arrays["tol"]) * abs(exact[0].item()) * 1.01)
    assert arrays["trace_stderr"][0] > 0 and arrays["density_moments"].shape == arrays["density_moment_stderr"].shape == (1, 4)
    assert np.all(arrays["density_moment_stderr"] > 0)
    N = task.N
    exact_moments = [float((exact**j).mean()) for j in (1, 2, 3, 4)]
    within = np.abs(arrays["density_moments"][0] - exact_moments) < 4 * arrays["density_moment_stderr"][0]
    assert within.all(), (arrays["density_moments"][0], exact_moments, arrays["density_moment_stderr"][0])
    assert arrays["density"].shape == arrays["density_stderr"].shape == arrays["density_grid"].shape
    assert end["unconverged"] == 0 and N == arrays["N"]
    for name in ("start.npz", "start.png", "end.png"):
        assert (tmp_path / "with").joinpath(*trainer.log_dir.split("/")[-2:], "hessian", name).exists(), name


def test_unconverged_eigenvalues_are_flagged_and_warned_about(tmp_path):
    callback = HessianSpectrum(top_k=4, bottom_k=3, lanczos_steps=4, density=False, trace_probes=0, at_fit_start=False)
    message = r"HessianSpectrum \(end\): eigenvalues not converged to tol = 1e-06: top: \d.*bottom: 3 .*lanczos_steps"
    with pytest.warns(UserWarning, match=message):
        trainer, _, _ = _fit(tmp_path, [callback])
    arrays = np.load(f"{trainer.log_dir}/hessian/end.npz")
    assert not np.all(arrays["converged"] == 1) and np.all(arrays["bottom_converged"] == 0)
    assert callback.history[-1]["unconverged"] >= 3
    assert float(trainer.callback_metrics["hessian/unconverged"]) == callback.history[-1]["unconverged"]


def test_ensemble_members_are_analysed_separately(tmp_path):
    callback = HessianSpectrum(top_k=3, density=False, trace_probes=0, at_fit_end=False, hvp_mode="double_backward")
    trainer, _, _ = _fit(tmp_path / "k2", [callback], ensemble_size=2, max_epochs=1)
    assert {"hessian/top1/member_0", "hessian/top1/member_1"} <= set(trainer.callback_metrics)
    single = HessianSpectrum(top_k=3, density=False, trace_probes=0, at_fit_end=False, hvp_mode="double_backward")
    _fit(tmp_path / "k1", [single], init_seed=1)  # member 1 of the ensemble is init_seed + 1
    member1 = [h for h in callback.history if h["member"] == 1][0]
    np.testing.assert_allclose(member1["eigenvalues"], single.history[0]["eigenvalues"], rtol=1e-4)
    arrays = np.load(f"{trainer.log_dir}/hessian/start.npz")
    assert arrays["eigenvalues"].shape == (2, 3)


def test_gradient_subspace_series_reuses_ritz_vectors(tmp_path):
    callback = HessianSpectrum(
        top_k=3, density=False, trace_probes=0, at_fit_start=False, plot=True,
        subspace_every_n_steps=1, subspace_refresh_every_n_steps=2, subspace_k=2,
    )
    trainer, _, _ = _fit(tmp_path, [callback], max_epochs=2)  # 3 steps per epoch: steps 0..5
    rows = callback.subspace_history
    assert [r["step"] for r in rows] == list(range(6))
    assert [r["refreshed"] for r in rows] == [True, False] * 3, "eigenvectors recomputed every 2 steps only"
    assert math.isnan(rows[0]["overlap"]) and all(math.isnan(r["overlap"]) for r in rows[1::2])
    assert all(0.0 <= r["overlap"] <= 1.0 + 1e-9 for r in rows[2::2])
    assert all(0.0 <= r[key] <= 1.0 + 1e-9 for r in rows for key in ("fraction_full", "fraction_batch"))
    arrays = np.load(f"{trainer.log_dir}/hessian/subspace.npz")
    np.testing.assert_array_equal(arrays["step"], np.arange(6))
    assert (tmp_path.joinpath(*trainer.log_dir.split("/")[-2:], "hessian", "subspace_overlap.png")).exists()
    assert "hessian/subspace_fraction_full" in trainer.callback_metrics


def test_projection_is_exact_when_k_equals_n(tmp_path):
    # width 1: N = 5 + 1 + 3 + 3 = 12; with k = N the gradient lies wholly in the subspace.
    callback = HessianSpectrum(top_k=2, density=False, trace_probes=0, at_fit_start=False, at_fit_end=False,
                               subspace_every_n_steps=2, subspace_k=12, tol=0.0)
    _fit(tmp_path, [callback], width=1)
    for row in callback.subspace_history:
        assert row["fraction_full"] == pytest.approx(1.0, abs=1e-5)
        assert row["fraction_batch"] == pytest.approx(1.0, abs=1e-5)


def test_subspace_non_convergence_is_warned_about_once(tmp_path):
    callback = HessianSpectrum(top_k=3, density=False, trace_probes=0, at_fit_start=False, at_fit_end=False,
                               subspace_every_n_steps=1, subspace_k=3, lanczos_steps=2)
    with pytest.warns(UserWarning, match=r"HessianSpectrum \(subspace, step 0\): 3 top eigenvectors not converged") as record:
        trainer, _, _ = _fit(tmp_path, [callback])
    assert sum("not converged" in str(w.message) for w in record) == 1, "one warning per run, not per step or rank"
    assert [r["unconverged"] for r in callback.subspace_history] == [3, 3, 3]
    assert callback.subspace_steps.last == 2 and trainer.lightning_module._direct, "no optimizer hook: the Task steps itself"


def test_block_spectra_match_the_diagonal_blocks_of_the_dense_hessian(tmp_path):
    callback = HessianSpectrum(top_k=3, blocks={"hidden": "layers.1.*"}, density_steps=12, density_probes=3, trace_probes=3,
                               at_fit_start=False)
    trainer, task, data = _fit(tmp_path, [callback])
    view = task.functional_view()
    H = dense_hessian(view.fn, view.params, task.loss_fn, data.analysis_batches(), view.buffers, dtype=torch.float64)
    sizes = {"hidden": (5 + 1) * 8, "rest": (8 + 1) * 3}  # layers.1 (5 -> 8), the head layers.3 (8 -> 3)
    start, blocks = 0, {}
    for name in ("hidden", "rest"):
        blocks[name] = eigvalsh(H[start : start + sizes[name], start : start + sizes[name]])
        start += sizes[name]
    end = callback.history[-1]
    for name, exact in blocks.items():
        np.testing.assert_allclose(end["blocks"][name], exact[:3].numpy(), rtol=1e-4, err_msg=name)
        assert end[f"block/{name}/top1"] == pytest.approx(float(exact[0]), rel=1e-4)
    merged = torch.cat(list(blocks.values())).sort(descending=True).values[:3]
    np.testing.assert_allclose([end[f"block_diagonal_top{i}"] for i in (1, 2, 3)], merged.numpy(), rtol=1e-4)
    arrays = np.load(f"{trainer.log_dir}/hessian/end.npz")
    assert list(arrays["block_names"]) == ["hidden", "rest"] and list(arrays["block_sizes"]) == [48, 27]
    assert arrays["block_eigenvalues"].shape == (1, 2, 3) and np.all(arrays["block_converged"] == 1)
    assert arrays["block_trace"].shape == arrays["block_trace_stderr"].shape == (1, 2)
    assert arrays["block_density_nodes"].shape == (1, 2, 3, 12)
    assert arrays["block_diagonal_density"].shape == arrays["density"].shape
    assert (tmp_path.joinpath(*trainer.log_dir.split("/")[-2:], "hessian", "end_blocks.png")).stat().st_size > 10_000
    with pytest.raises(ConfigError, match=r"HessianSpectrum.blocks: block 'head': \['net.6.\*'\] matches no parameter"):
        _fit(tmp_path / "bad", [HessianSpectrum(blocks={"head": "net.6.*"})])


def test_state_dict_keeps_history_and_done_tags():
    callback = HessianSpectrum()
    callback.history = [{"tag": "start", "top1": 1.0}]
    callback.done = ["start"]
    callback.subspace_history = [{"step": 0}]
    callback.subspace_steps.mark(4)
    restored = HessianSpectrum()
    restored.load_state_dict(callback.state_dict())
    assert restored.history == callback.history and restored.done == ["start"] and restored.subspace_history == [{"step": 0}]
    assert restored.subspace_steps.last == 4
    old = {k: v for k, v in callback.state_dict().items() if k != "subspace_last_step"}  # before the shared schedule
    restored.load_state_dict(old)
    assert restored.subspace_steps.last == 0, "falls back to the subspace history's last step"


def test_cli_run_writes_files_and_logs_values(cli, tmp_path):
    result = cli(
        "fit", "-c", str(CONFIGS / "teacher_student.yaml"),
        "--trainer.callbacks+=HessianSpectrum",
        "--trainer.callbacks.init_args.top_k=3",
        "--trainer.callbacks.init_args.density_steps=20",
        "--trainer.callbacks.init_args.exact=true",
        "--trainer.max_epochs=1", "--data.num_train=128", "--model.width=8", "--summary=false",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs" / "teacher_student" / "version_0"
    for name in ("start.npz", "end.npz", "start.png", "end.png"):
        assert (run / "hessian" / name).exists(), name
    end = np.load(run / "hessian" / "end.npz")
    np.testing.assert_allclose(end["eigenvalues"][0], end["exact_eigenvalues"][0, :3], rtol=1e-4)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    logged = [float(r["hessian/top1"]) for r in rows if r.get("hessian/top1")]
    assert len(logged) == 2 and logged[-1] == pytest.approx(float(end["eigenvalues"][0, 0]), rel=1e-6)
    assert any(r.get("hessian/outliers") for r in rows) and any(r.get("hessian/trace") for r in rows)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    # Under ddp_fork the ranks run in child processes: compare the files rank 0 wrote.
    kwargs = dict(top_k=3, density_steps=10, trace_probes=2, at_fit_end=False, hvp_mode="double_backward")
    one, _, _ = _fit(tmp_path / "one", [HessianSpectrum(**kwargs)], max_epochs=1)
    _fit(tmp_path / "two", [HessianSpectrum(**kwargs)], max_epochs=1, strategy="ddp_fork", devices=2)
    a = np.load(next((tmp_path / "one").rglob("hessian/start.npz")))
    b = np.load(next((tmp_path / "two").rglob("hessian/start.npz")))
    for key in ("eigenvalues", "trace", "density_nodes", "density_weights"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
