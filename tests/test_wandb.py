"""W&B: offline runs write their run file; W&B failures never lose the local run."""

import csv
import time

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger

from overparam.loggers import ResilientWandbLogger
from overparam.plugins.teacher_student import TeacherStudent, TeacherStudentData
from tests.conftest import CONFIGS

ARGS = ["-c", str(CONFIGS / "teacher_student.yaml"), "-c", str(CONFIGS / "wandb.yaml"),
        "--trainer.max_epochs", "2", "--data.num_train", "200"]


def test_offline_run_writes_its_wandb_file_media_and_the_local_run(cli, tmp_path):
    result = cli("fit", *ARGS, "--trainer.callbacks+=HessianSpectrum", "--trainer.callbacks.density=false",
                 env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert list((tmp_path / "runs" / "wandb").glob("offline-run-*/files/media/images/hessian/spectrum_*.png"))
    run = tmp_path / "runs" / "teacher_student" / "version_0"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


def test_wandb_failing_at_start_keeps_training_and_local_logs(cli, tmp_path):
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "WANDB_BASE_URL": "http://127.0.0.1:9"}
    result = cli("fit", *ARGS, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "W&B failed" in result.stderr and "W&B logging is off for the rest of this run" in result.stderr
    run = tmp_path / "runs" / "teacher_student" / "version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert {r["epoch"] for r in rows if r.get("train/loss")} == {"0", "1"}
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_an_unreachable_server_switches_wandb_off_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://overparam-no-such-host.invalid")
    logger = ResilientWandbLogger(save_dir=str(tmp_path))
    start = time.monotonic()
    with pytest.warns(UserWarning, match="cannot reach the W&B server http://overparam-no-such-host.invalid"):
        logger.experiment
    # wandb.init itself retries such a server for 90 s (measured) before it gives up.
    assert logger.failed and time.monotonic() - start < 10


def test_wandb_failing_mid_run_switches_it_off_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb_logger = ResilientWandbLogger(save_dir=str(tmp_path))
    calls = {"n": 0}

    class Flaky(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                def broken(*args, **kwargs):
                    calls["n"] += 1
                    raise ConnectionError("network went away")
                monkeypatch.setattr(wandb_logger.experiment, "log", broken)

    data = TeacherStudentData(num_train=128, num_test=64, batch_size=32)
    task = TeacherStudent(width=8, input_shape=data.input_shape, num_outputs=data.num_outputs, num_train=data.num_train)
    csv_logger = CSVLogger(tmp_path, name="run")
    trainer = pl.Trainer(max_epochs=3, logger=[csv_logger, wandb_logger], callbacks=[Flaky()],
                         enable_progress_bar=False, enable_checkpointing=False, log_every_n_steps=1)
    with pytest.warns(UserWarning, match="W&B failed \\(ConnectionError: network went away\\)"):
        trainer.fit(task, datamodule=data)
    assert trainer.current_epoch == 3 and wandb_logger.failed and calls["n"] == 1
    rows = list(csv.DictReader(open(csv_logger.log_dir + "/metrics.csv")))
    assert {r["epoch"] for r in rows if r.get("train/loss")} == {"0", "1", "2"}
