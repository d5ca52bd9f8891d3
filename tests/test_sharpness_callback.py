"""SharpnessTracker: exact values on a quadratic loss, warm starts, thresholds, Adam, blocks, K > 1, DDP."""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from overparam.callbacks import SharpnessTracker
from overparam.curvature import adam_preconditioner, block_indices, dense_hessian, eigvalsh, parameter_blocks, sgd_threshold
from overparam.errors import ConfigError
from overparam.plugins.teacher_student import TeacherStudent, TeacherStudentData


class LinearTask(TeacherStudent):
    """f(x) = W x + b: with the squared loss the Hessian is Z^T Z / P (Z = [x, 1]), the same at every theta."""

    def make_network(self) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(self.in_dim, self.num_outputs))


def _fit(tmp_path, callbacks, task_cls=TeacherStudent, input_dim=5, batch_size=32, max_epochs=2, optimizer=None,
         ensemble_size=1, loss="cross_entropy", **trainer_kw):
    data = TeacherStudentData(input_dim=input_dim, num_train=96, num_test=32, target="multiclass", num_classes=3,
                              batch_size=batch_size)
    task = task_cls(width=6, depth=1, input_shape=data.input_shape, num_outputs=data.num_outputs,
                    num_train=data.num_train, lr=0.1, momentum=0.5, loss=loss, ensemble_size=ensemble_size)
    if optimizer is not None:
        task.configure_optimizers = lambda: optimizer(task.parameters())
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=CSVLogger(tmp_path), accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, **trainer_kw)
    trainer.fit(task, datamodule=data)
    return trainer, task, data


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 0}, "SharpnessTracker.top_k must be positive"),
        ({"every_n_steps": 0}, "SharpnessTracker.every_n_steps must be positive"),
        ({"blocks": "per-layer"}, "SharpnessTracker.blocks must be 'layers' or a mapping"),
        ({"hvp_mode": "fast"}, "SharpnessTracker.hvp_mode must be one of auto"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SharpnessTracker(**kwargs)


def test_a_block_glob_that_matches_nothing_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"SharpnessTracker.blocks: block 'head': \['net.6.\*'\] matches no parameter"):
        _fit(tmp_path, [SharpnessTracker(blocks={"head": "net.6.*"})])


def test_quadratic_loss_tracked_exactly_at_every_measurement_and_warm_is_cheaper(tmp_path):
    # Full-batch GD on a linear model with the squared loss: H = Z^T Z / P at every step.
    callback = SharpnessTracker(top_k=2, every_n_steps=2, tol=1e-10, hvp_mode="double_backward")
    trainer, task, data = _fit(tmp_path, [callback], task_cls=LinearTask, input_dim=30, batch_size="full",
                               max_epochs=7, loss="mse", precision="64-true")
    Z = torch.cat([torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) for x, _ in data.analysis_batches()])
    exact = eigvalsh(Z.T @ Z / Z.shape[0])[:2]
    rows = callback.history
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    for r in rows:
        np.testing.assert_allclose(r["eigenvalues"], exact.numpy(), rtol=1e-9, err_msg=f"step {r['step']}")
        assert all(r["converged"])
    assert [r["warm"] for r in rows] == [False, True, True, True]
    assert all(r["hvps"] < rows[0]["hvps"] for r in rows[1:]), [r["hvps"] for r in rows]
    assert all(r["overlap"] == pytest.approx(1.0, abs=1e-9) for r in rows[1:]), "the same operator: the same eigenvectors"


def test_logs_files_threshold_and_training_untouched(tmp_path):
    class HalveLr(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            for group in trainer.optimizers[0].param_groups:
                group["lr"] /= 2

    callback = SharpnessTracker(every_n_steps=2)
    trainer, task, _ = _fit(tmp_path / "with", [callback, HalveLr()])
    _, plain, _ = _fit(tmp_path / "without", [HalveLr()])
    for (name, p), q in zip(task.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), f"the callback changed training ({name})"
    rows = callback.history
    # 3 steps per epoch, 2 epochs: theta_0, theta_2, theta_4 and, at fit end, theta_6 (on the schedule).
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    # The lr halves after each epoch: the threshold (2 + 2 beta) / lr follows it.
    lrs = [0.1, 0.1, 0.05, 0.025]
    assert [r["lr"] for r in rows] == pytest.approx(lrs)
    assert [r["threshold"] for r in rows] == pytest.approx([sgd_threshold(lr, momentum=0.5) for lr in lrs])
    assert float(trainer.callback_metrics["sharpness/2_over_lr"]) == pytest.approx(80.0)
    assert float(trainer.callback_metrics["sharpness/ratio"]) == pytest.approx(rows[-1]["eigenvalues"][0] / rows[-1]["threshold"], rel=1e-6)
    logged = [float(r["sharpness/lambda_1"]) for r in csv.DictReader(open(f"{trainer.log_dir}/metrics.csv")) if r.get("sharpness/lambda_1")]
    assert logged == pytest.approx([r["eigenvalues"][0] for r in rows], rel=1e-6)
    assert "sharpness/hvps" in trainer.callback_metrics and "sharpness/overlap" in trainer.callback_metrics
    arrays = np.load(f"{trainer.log_dir}/sharpness/sharpness.npz")
    np.testing.assert_array_equal(arrays["step"], [0, 2, 4, 6])
    assert arrays["eigenvalues"].shape == arrays["ritz_residuals"].shape == arrays["converged"].shape == (4, 1)
    assert np.all(arrays["converged"] == 1) and np.all(arrays["ritz_residuals"] <= float(arrays["tol"]))
    np.testing.assert_allclose(arrays["two_over_lr"], [20.0, 20.0, 40.0, 80.0])
    assert (tmp_path / "with").joinpath(*trainer.log_dir.split("/")[-2:], "sharpness", "sharpness.png").stat().st_size > 5000
    assert "preconditioned_eigenvalues" not in arrays.files, "SGD has no preconditioner"


def test_adam_preconditioned_sharpness_per_member_equals_eigvalsh(tmp_path):
    callback = SharpnessTracker(top_k=2, every_n_steps=3, at_fit_end=True, tol=1e-8, blocks="layers")
    adam = lambda params: torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.99))  # noqa: E731
    trainer, task, data = _fit(tmp_path, [callback], optimizer=adam, ensemble_size=2, max_epochs=2)
    rows = callback.history
    assert [(r["step"], r["member"]) for r in rows] == [(0, 0), (0, 1), (3, 0), (3, 1), (6, 0), (6, 1)]
    assert rows[0].get("preconditioned_eigenvalues") is None, "no preconditioner before the first update"
    optimizer, view = trainer.optimizers[0], task.functional_view()
    for k in range(2):
        member = view.member(k)
        H = dense_hessian(member.fn, member.params, task.loss_fn, data.analysis_batches(), member.buffers, dtype=torch.float64)
        P = torch.cat([adam_preconditioner(optimizer.state[p]["exp_avg_sq"][k].double(), float(optimizer.state[p]["step"]), 0.8, 0.99, 1e-8).reshape(-1)
                       for p in view.params.values()])
        end = rows[-2 + k]
        assert end["step"] == 6 and end["member"] == k
        np.testing.assert_allclose(end["eigenvalues"], eigvalsh(H)[:2].numpy(), rtol=1e-5)
        np.testing.assert_allclose(end["preconditioned_eigenvalues"], eigvalsh(H / P.sqrt()[:, None] / P.sqrt()[None])[:2].numpy(), rtol=1e-5)
        assert end["preconditioned_threshold"] == pytest.approx((2 + 2 * 0.8) / (0.2 * 0.01))
        for name, names in parameter_blocks(list(member.params), "layers").items():
            idx = block_indices(member.params, names)
            np.testing.assert_allclose(end["blocks"][name]["eigenvalues"], eigvalsh(H[idx][:, idx])[:2].numpy(), rtol=1e-5, err_msg=name)
    assert {"sharpness/preconditioned_lambda_1/member_1", "sharpness/block/layers.1/lambda_1/member_0"} <= set(trainer.callback_metrics)
    arrays = np.load(f"{trainer.log_dir}/sharpness/sharpness.npz")
    assert arrays["preconditioned_eigenvalues"].shape == (6, 2) and np.isnan(arrays["preconditioned_eigenvalues"][0]).all()
    assert arrays["block_eigenvalues"].shape == (6, 2, 2) and list(arrays["block_names"]) == ["layers.1", "layers.3"]


def test_unconverged_values_are_warned_about_once(tmp_path):
    callback = SharpnessTracker(top_k=3, every_n_steps=1, lanczos_steps=2, tol=1e-8)
    with pytest.warns(UserWarning, match=r"SharpnessTracker \(step 0\): \d tracked eigenvalue\(s\) did not converge") as record:
        trainer, _, _ = _fit(tmp_path, [callback], max_epochs=1)
    assert sum("did not converge" in str(w.message) for w in record) == 1
    assert all(not any(r["converged"]) or not all(r["converged"]) for r in callback.history)
    assert float(trainer.callback_metrics["sharpness/unconverged"]) >= 1


def test_state_dict_keeps_the_history_not_the_vectors():
    callback = SharpnessTracker()
    callback.history = [{"step": 0, "member": 0, "eigenvalues": [1.0]}]
    callback.steps.mark(0)
    callback._previous[("hessian", 0)] = object()
    restored = SharpnessTracker()
    restored.load_state_dict(callback.state_dict())
    assert restored.history == callback.history and restored.steps.last == 0 and not restored._previous


def test_ddp_two_processes_equal_one_process(tmp_path):
    # Under ddp_fork the ranks run in child processes: compare the files rank 0 wrote.
    kwargs = dict(top_k=2, every_n_steps=2, hvp_mode="double_backward", tol=1e-6, blocks="layers")
    adam = lambda params: torch.optim.Adam(params, lr=0.01)  # noqa: E731
    _fit(tmp_path / "one", [SharpnessTracker(**kwargs)], max_epochs=2, optimizer=adam)
    _fit(tmp_path / "two", [SharpnessTracker(**kwargs)], max_epochs=2, optimizer=adam, strategy="ddp_fork", devices=2)
    a = np.load(next((tmp_path / "one").rglob("sharpness/sharpness.npz")))
    b = np.load(next((tmp_path / "two").rglob("sharpness/sharpness.npz")))
    np.testing.assert_array_equal(a["step"], b["step"])
    for key in ("eigenvalues", "preconditioned_eigenvalues", "block_eigenvalues"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
    assert not math.isnan(float(a["preconditioned_eigenvalues"][-1, 0]))
