"""BatchSizeSwitch: exact switch epoch/step, resume after the switch, full-batch GD (chunked)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from overparam.callbacks.batch_size import BatchSizeSwitch
from overparam.errors import ConfigError
from overparam.plugins.teacher_student import TeacherStudent, TeacherStudentData

P = 100


class Recorder(pl.Callback):
    """(epoch, step, global batch size n, chunk rows) of every chunk of every optimizer step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, int]] = []

    def on_train_step(self, trainer, pl_module, record) -> None:
        for x, _ in record.data.chunks:
            self.seen.append((record.epoch, record.index, record.data.global_size, x.shape[0]))


def make(batch_size=20, lr=0.1, momentum=0.0, **data_kwargs):
    data = TeacherStudentData(num_train=P, num_test=50, batch_size=batch_size, **data_kwargs)
    task = TeacherStudent(width=8, depth=1, input_shape=data.input_shape, num_outputs=data.num_outputs, num_train=P, lr=lr, momentum=momentum)
    return task, data


def trainer(tmp_path, callbacks, **kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        reload_dataloaders_every_n_epochs=1,
        default_root_dir=tmp_path,
        **kwargs,
    )


def sizes_by_epoch(seen):
    out: dict[int, set[int]] = {}
    for epoch, _, n, _ in seen:
        out.setdefault(epoch, set()).add(n)
    return out


def test_epoch_switch_happens_at_the_exact_epoch(tmp_path):
    task, data = make(batch_size=20)
    rec = Recorder()
    switch = BatchSizeSwitch(schedule={0: 50, 2: 10}, lr_rule="linear")
    t = trainer(tmp_path, [switch, rec], max_epochs=4, logger=CSVLogger(tmp_path))
    t.fit(task, datamodule=data)
    assert sizes_by_epoch(rec.seen) == {0: {50}, 1: {50}, 2: {10}, 3: {10}}
    assert [e for e, *_ in rec.seen].count(2) == P // 10, "epoch 2 must have P/10 batches"
    assert switch.switches == [{"epoch": 2, "step": 4, "from": 50, "to": 10, "lr_factor": 0.2}]
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 10 / 50)
    assert float(t.callback_metrics["batch_size"]) == 10
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "batch_size" in metrics.splitlines()[0]


def test_step_switch_lands_on_the_exact_step_mid_epoch(tmp_path):
    task, data = make(batch_size=20)
    rec = Recorder()
    t = trainer(tmp_path, [BatchSizeSwitch(step_schedule={7: 30}, lr_rule="sqrt"), rec], max_epochs=3)
    t.fit(task, datamodule=data)
    by_step = {step: n for _, step, n, _ in rec.seen}
    assert all(by_step[s] == 20 for s in range(7)), by_step
    # Epoch 1 starts at step 5: 20, 20, then the rest of its permutation cut at 30 (30, 30).
    assert [n for e, _, n, _ in rec.seen if e == 1] == [20, 20, 30, 30]
    assert by_step[7] == 30 and by_step[8] == 30
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * (30 / 20) ** 0.5)


def test_resumed_run_continues_with_the_small_batch(tmp_path):
    """Killed after the switch (max_epochs=3, switch at 2), resumed from last.ckpt to epoch 5."""
    ckpt_dir = tmp_path / "ckpt"
    task, data = make(batch_size=20, momentum=0.9)
    first = BatchSizeSwitch(schedule={0: 50, 2: 10}, lr_rule="linear", reset_optimizer=True)
    t = trainer(tmp_path, [first, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], max_epochs=3, enable_checkpointing=True)
    t.fit(task, datamodule=data)
    assert first.current == 10

    task, data = make(batch_size=20, momentum=0.9)  # the config's batch size again, as on a restart
    second, rec = BatchSizeSwitch(schedule={0: 50, 2: 10}, lr_rule="linear", reset_optimizer=True), Recorder()
    t = trainer(tmp_path, [second, rec, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], max_epochs=5, enable_checkpointing=True)
    t.fit(task, datamodule=data, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert sizes_by_epoch(rec.seen) == {3: {10}, 4: {10}}
    assert len(second.switches) == 1, "the switch (and its lr rule) must not be repeated after resume"
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 10 / 50)


def test_resume_before_the_switch_switches_at_the_same_epoch(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    task, data = make()
    t = trainer(tmp_path, [BatchSizeSwitch(schedule={0: 50, 2: 10}), ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], max_epochs=1, enable_checkpointing=True)
    t.fit(task, datamodule=data)
    task, data = make()
    switch, rec = BatchSizeSwitch(schedule={0: 50, 2: 10}), Recorder()
    t = trainer(tmp_path, [switch, rec], max_epochs=3)
    t.fit(task, datamodule=data, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert sizes_by_epoch(rec.seen) == {1: {50}, 2: {10}}
    assert [s["epoch"] for s in switch.switches] == [2]


def _gd_step_by_hand(task, data, lr):
    x, y = data.split("train")
    net = task.net
    loss = task.loss_fn(net(x), y, reduction="mean")
    grads = torch.autograd.grad(loss, list(net.parameters()))
    return [p.detach() - lr * g for p, g in zip(net.parameters(), grads)]


@pytest.mark.parametrize("chunk_size", [None, 30])
def test_full_batch_is_one_exact_gd_step(tmp_path, chunk_size):
    task, data = make(batch_size="full", lr=0.5)
    data.setup()
    expected = _gd_step_by_hand(task, data, 0.5)
    rec = Recorder()
    callbacks = [rec] if chunk_size is None else [BatchSizeSwitch(chunk_size=chunk_size), rec]
    t = trainer(tmp_path, callbacks, max_steps=1)
    t.fit(task, datamodule=data)
    assert t.global_step == 1
    # One optimizer step over all P points: one batch, or ceil(P / chunk) = 4 chunks.
    assert [r[3] for r in rec.seen] == ([P] if chunk_size is None else [30, 30, 30, 10])
    assert all(r[2] == P for r in rec.seen)
    for p, e in zip(task.net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


def test_chunked_sgd_equals_unchunked(tmp_path):
    """A chunked global batch of 50 gives the same trajectory as the plain batch of 50."""
    results = []
    for chunk in (None, 16):
        task, data = make(batch_size=50)
        cbs = [BatchSizeSwitch(chunk_size=chunk)] if chunk else []
        trainer(tmp_path, cbs, max_epochs=2).fit(task, datamodule=data)
        results.append(torch.cat([p.detach().reshape(-1) for p in task.net.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"schedule": {-1: 10}}, "schedule keys"),
        ({"schedule": {0: 0}}, r"schedule\[0\]"),
        ({"schedule": {0: "half"}}, r"schedule\[0\]"),
        ({"schedule": {0: 10}, "step_schedule": {5: 2}}, "not both"),
        ({"lr_rule": "cubic"}, "lr_rule"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BatchSizeSwitch(**kwargs)


class RankRecorder(Recorder):
    """Writes each rank's (epoch, step, n, local rows) to a file (ddp_fork returns no callbacks)."""

    def __init__(self, folder) -> None:
        super().__init__()
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        (self.folder / f"rank{trainer.global_rank}.txt").write_text(repr(self.seen))


def test_ddp_sizes_are_global_and_match_one_process(tmp_path):
    """2 CPU ranks: each gets half of every global batch and chunk; the trajectory is the 1-process one."""
    finals = []
    for devices in (1, 2):
        task, data = make(batch_size=20)
        switch = BatchSizeSwitch(schedule={0: "full", 1: 40}, chunk_size=30)
        strategy = "ddp_fork" if devices == 2 else "auto"
        t = trainer(tmp_path, [switch, RankRecorder(tmp_path)], max_epochs=2, accelerator="cpu", devices=devices, strategy=strategy)
        t.fit(task, datamodule=data)
        finals.append(torch.cat([p.detach().reshape(-1) for p in task.net.parameters()]))
    ranks = [eval((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)]
    for seen in ranks:
        # Epoch 0: GD, 4 chunks of the global 100 (30, 30, 30, 10), halves per rank; epoch 1:
        # global batches 40, 40, 20, chunked (30, 10), (30, 10), (20).
        assert [(e, n, rows) for e, _, n, rows in seen] == [
            (0, 100, 15), (0, 100, 15), (0, 100, 15), (0, 100, 5),
            (1, 40, 15), (1, 40, 5), (1, 40, 15), (1, 40, 5), (1, 20, 10),
        ]
        assert [s for _, s, _, _ in seen] == [0, 0, 0, 0, 1, 1, 2, 2, 3]
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cli_run_killed_after_the_switch_resumes_with_the_small_batch(cli, tmp_path):
    """The real command: 3 epochs (switch at 2), then resumed from last.ckpt to 5 epochs."""
    from .conftest import CONFIGS

    args = [
        "fit", "-c", str(CONFIGS / "teacher_student.yaml"),
        "--trainer.callbacks+=BatchSizeSwitch", "--trainer.callbacks.schedule={0: 250, 2: 50}",
        "--trainer.callbacks.lr_rule=linear", "--summary=false",  # the CLI's default ModelCheckpoint saves last.ckpt
    ]
    first = cli(*args, "--trainer.max_epochs=3")
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = next(tmp_path.glob("runs/*/version_0/checkpoints/last.ckpt"))
    second = cli(*args, "--trainer.max_epochs=5", f"--ckpt_path={ckpt}")
    assert second.returncode == 0, second.stderr[-2000:]
    import csv

    # The resumed run continues in its own folder and its metrics.csv.
    rows = list(csv.DictReader(next(tmp_path.glob("runs/*/version_0/metrics.csv")).open()))
    sizes = {int(r["epoch"]): float(r["batch_size"]) for r in rows if r.get("batch_size")}
    assert sizes == {0: 250.0, 1: 250.0, 2: 50.0, 3: 50.0, 4: 50.0}, sizes
    state = torch.load(ckpt.parent / "last.ckpt", weights_only=False)
    lrs = [g["lr"] for g in state["optimizer_states"][0]["param_groups"]]
    assert lrs == [pytest.approx(0.1 * 50 / 250)], "lr scaled once, not again after resume"
