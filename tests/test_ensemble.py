"""Ensembles: metrics on hand-made outputs, vmap = K separate runs, EnsembleEvaluation, `overparam ensemble`."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from overparam.callbacks.ensemble import EnsembleEvaluation, ensemble_metrics
from overparam.metrics import EnsembleStatistics
from overparam.errors import ConfigError
from overparam.losses import squared_hinge
from overparam.plugins.teacher_student import TeacherStudent, TeacherStudentData


def test_metrics_on_hand_made_binary_outputs():
    # Two members, three points, labels +1, -1, +1.
    outputs = torch.tensor([[[1.0], [1.0], [-2.0]], [[3.0], [-3.0], [1.0]]], dtype=torch.float64)
    y = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    got = ensemble_metrics(outputs, y, squared_hinge)
    # f_bar = 2, -1, -0.5: wrong on point 3 only. Members: member 0 wrong on 2 and 3, member 1 right.
    assert got["ensemble_error"] == pytest.approx(1 / 3)
    assert got["member_error"].tolist() == pytest.approx([2 / 3, 0.0])
    assert got["mean_member_error"] == pytest.approx(1 / 3)
    # |f_k - f_bar|^2: member 0: 1, 4, 2.25; member 1 the same (two members are symmetric).
    assert got["member_fluctuation"].tolist() == pytest.approx([7.25 / 3, 7.25 / 3])
    assert got["fluctuation"] == pytest.approx(7.25 / 3)
    # Loss of f_bar: margins 2, 1, -0.5 -> 0.5 * 1.5^2 on the last point.
    assert got["ensemble_loss"] == pytest.approx(0.5 * 2.25 / 3)
    assert got["member_loss"].tolist() == pytest.approx([0.5 * (4 + 9) / 3, 0.0])


def test_metrics_on_hand_made_multiclass_outputs_in_chunks():
    outputs = torch.tensor(
        [[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 4.0], [0.0, 3.0, 1.0]]], dtype=torch.float64
    )  # (K=2, B=2, C=3)
    y = torch.tensor([0, 1])
    # f_bar = [1, 0, 2] (wrong), [0, 2, 0.5] (right)
    whole = ensemble_metrics(outputs, y)
    assert whole["ensemble_error"] == 0.5 and whole["member_error"].tolist() == [0.0, 0.5]
    # |f_k - f_bar|^2 summed over C: point 1: 1+0+4 = 5 for each member; point 2: 0+1+0.25 = 1.25 each
    assert whole["fluctuation"] == pytest.approx((5 + 1.25) / 2)
    chunked = EnsembleStatistics(2)
    chunked.update(outputs[:, :1], y[:1])
    chunked.update(outputs[:, 1:], y[1:])
    again = chunked.compute()
    assert again["fluctuation"] == whole["fluctuation"] and again["ensemble_error"] == whole["ensemble_error"]


def _data(P=40, batch_size=8, target="binary"):
    return TeacherStudentData(input_dim=5, num_train=P, num_test=60, target=target, batch_size=batch_size, seed=3)


def _task(K=1, init_seed=0, width=6):
    return TeacherStudent(width=width, depth=2, input_shape=(5,), num_outputs=1, num_train=40, loss="squared_hinge",
                          lr=0.05, momentum=0.9, ensemble_size=K, init_seed=init_seed)


def _trainer(tmp_path, callbacks=(), max_epochs=3):
    return pl.Trainer(max_epochs=max_epochs, precision="64-true", accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=list(callbacks), default_root_dir=tmp_path)


def test_vmapped_ensemble_equals_separate_runs(tmp_path):
    """Member k of a K = 3 ensemble (vmap, SGD + momentum, minibatches) = a single run with init_seed + k."""
    K = 3
    pl.seed_everything(0)
    ensemble = _task(K=K, init_seed=5)
    _trainer(tmp_path).fit(ensemble, _data())
    x, y = _data().load_splits()["test"]
    x = x.double()
    stacked = ensemble.member_outputs(x).detach()  # (K, B, 1)
    view = ensemble.functional_view()
    for k in range(K):
        pl.seed_everything(0)
        single = _task(K=1, init_seed=5 + k)
        trainer = _trainer(tmp_path)
        trainer.fit(single, _data())
        for name, p in single.net.named_parameters():
            torch.testing.assert_close(view.params[name][k], p, rtol=1e-12, atol=1e-13, msg=f"member {k}: {name}")
        torch.testing.assert_close(stacked[k], single(x).detach(), rtol=1e-12, atol=1e-13)
        assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(
            float(ensemble.trainer.callback_metrics[f"train/loss/member_{k}"]), rel=1e-6
        )  # logged as float32


def test_ensemble_evaluation_logs_fluctuation_and_loss_of_the_average(tmp_path):
    K = 4
    task = _task(K=K)
    data = _data()
    trainer = _trainer(tmp_path, [EnsembleEvaluation()], max_epochs=2)
    trainer.fit(task, data)
    results = trainer.test(task, data, verbose=False)[0]
    x, y = data.split("test")
    expected = ensemble_metrics(task.member_outputs(x).detach(), y, task.loss_fn)
    assert results["test/ensemble_fluctuation"] == pytest.approx(expected["fluctuation"], rel=1e-6)
    assert results["test/ensemble_loss"] == pytest.approx(expected["ensemble_loss"], rel=1e-6)
    for k in range(K):
        assert results[f"test/ensemble_fluctuation/member_{k}"] == pytest.approx(float(expected["member_fluctuation"][k]), rel=1e-6)
    # The Task's own numbers agree with the same computation (not duplicated by the callback).
    assert results["test/ensemble_error"] == pytest.approx(expected["ensemble_error"], rel=1e-6)
    assert results["test/error"] == pytest.approx(expected["mean_member_error"], rel=1e-6)
    saved = np.load(tmp_path / "ensemble" / "test.npz")
    np.testing.assert_allclose(saved["member_fluctuation"], expected["member_fluctuation"].numpy())


def test_ensemble_evaluation_scheduled_on_the_test_split(tmp_path):
    task = _task(K=2)
    callback = EnsembleEvaluation(every_n_epochs=1)
    _trainer(tmp_path, [callback], max_epochs=2).fit(task, _data())
    assert [h["tag"] for h in callback.history] == ["epoch=0", "epoch=1"]
    x, y = _data().load_splits()["test"]
    expected = ensemble_metrics(task.member_outputs(x.double()).detach(), y.double(), task.loss_fn)
    assert callback.history[-1]["test_ensemble_error"] == pytest.approx(expected["ensemble_error"])
    assert callback.history[-1]["test_fluctuation"] == pytest.approx(expected["fluctuation"])


def test_bad_split_is_a_config_error():
    with pytest.raises(ConfigError, match="EnsembleEvaluation.splits must be taken from val, test"):
        EnsembleEvaluation(splits=("train",))


def test_ensemble_command_averages_separate_runs(tmp_path, monkeypatch):
    """`overparam ensemble` on two CLI runs equals the hand-computed average of their outputs."""
    from overparam.cli import main
    from overparam.commands.ensemble import evaluate

    monkeypatch.chdir(tmp_path)
    common = ["fit", "--model", "TeacherStudent", "--model.width", "4", "--model.loss", "squared_hinge",
              "--data", "TeacherStudentData", "--data.num_train", "30", "--data.num_test", "50", "--data.input_dim", "4",
              "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false", "--summary", "false",
              "--trainer.enable_model_summary", "false"]
    folders = []
    for seed, K in ((0, 1), (1, 2)):
        assert main([*common, "--model.init_seed", str(seed), "--model.ensemble_size", str(K),
                     "--trainer.logger.init_args.version", f"s{seed}"]) == 0
        folders.append(str(tmp_path / "runs" / "teacher_student" / f"s{seed}"))
    result = evaluate(folders, None, "test", "cpu", 16)  # chunks of 16: sums must not depend on chunking
    data = TeacherStudentData(input_dim=4, num_train=30, num_test=50)
    x, y = data.load_splits()["test"]
    # the reference loads the runs Lightning's own way, not with the command's loader
    tasks = [TeacherStudent.load_from_checkpoint(f + "/checkpoints/last.ckpt", weights_only=False).eval() for f in folders]
    outputs = torch.cat([t.member_outputs(x).detach() for t in tasks])  # (3, 50, 1)
    expected = ensemble_metrics(outputs, y, tasks[0].loss_fn)
    assert result["members"] == 3 and result["points"] == 50
    for key in ("ensemble_error", "mean_member_error", "fluctuation", "ensemble_loss"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6), key
    assert main(["ensemble", "--ckpts", *folders, "--output", "e.json"]) == 0
    assert main(["ensemble", "--ckpts", str(tmp_path / "nowhere")]) == 2


def test_ensemble_evaluation_under_ddp_equals_one_process(tmp_path):
    """Two ranks (ddp_fork) reduce their test shards to the one-process numbers (and do not hang)."""
    import json
    import os

    class Record(EnsembleEvaluation):
        def on_test_epoch_end(self, trainer, pl_module):
            super().on_test_epoch_end(trainer, pl_module)
            values = {k: float(v) for k, v in trainer.callback_metrics.items() if "ensemble" in k}
            with open(os.path.join(tmp_path, f"rank{trainer.global_rank}.json"), "w") as fh:
                json.dump(values, fh)

    task = _task(K=3).double()
    data = _data()
    x, y = data.load_splits()["test"]
    expected = ensemble_metrics(task.member_outputs(x.double()).detach(), y.double(), task.loss_fn)
    trainer = pl.Trainer(precision="64-true", accelerator="cpu", strategy="ddp_fork", devices=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[Record()])
    trainer.test(task, data, verbose=False)
    for rank in range(2):
        got = json.load(open(tmp_path / f"rank{rank}.json"))
        assert got["test/ensemble_fluctuation"] == pytest.approx(expected["fluctuation"], rel=1e-6), f"rank {rank}"
        assert got["test/ensemble_loss"] == pytest.approx(expected["ensemble_loss"], rel=1e-6), f"rank {rank}"
    assert (tmp_path / "ensemble" / "test.npz").is_file()


def test_frozen_members_keep_their_parameters_and_the_checkpoint_keeps_them_frozen(tmp_path):
    task, data = _task(K=3), _data()
    before = {n: p.detach().clone() for n, p in task.member_params.items()}
    task.freeze_members([1])
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(task, data)
    for name, p in task.member_params.items():
        assert torch.equal(p[1], before[name][1]), f"{name}: the frozen member moved"
        assert not torch.equal(p[0], before[name][0]), f"{name}: member 0 must train"
    checkpoint = {}
    task.on_save_checkpoint(checkpoint)
    again = _task(K=3)
    again.on_load_checkpoint(checkpoint)
    assert again.frozen_members == [1]
