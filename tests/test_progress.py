"""Progress: throttled lines for long loops, and training progress as epoch lines or a bar."""

import io
import re

import lightning.pytorch as pl
import pytest

from overparam.callbacks.progress import MetricsProgressBar, ProgressLines, format_metrics
from overparam.cli import main
from overparam.errors import ConfigError
from overparam.plugins.teacher_student import TeacherStudent, TeacherStudentData
from overparam.progress import Progress, interval_from_env, track
from tests.conftest import CONFIGS

TS = str(CONFIGS / "teacher_student.yaml")


def test_a_loop_reports_count_rate_and_fields_then_a_closing_line():
    out = io.StringIO()
    progress = Progress("interpolate linear", every_seconds=0, stream=out)
    report = track(progress, total=4, unit="points")
    for _ in range(4):
        report.update(loss=0.125)
    report.finish(barrier=0.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5, lines
    assert re.match(r"interpolate linear: 2/4 points \(50%\), [\d.,]+ points/s, ~.* left, loss 0.125$", lines[1]), lines[1]
    assert re.match(r"interpolate linear: 4 points done in .* s, barrier 0.5$", lines[-1]), lines[-1]


def test_a_short_loop_and_a_missing_progress_stay_silent():
    out = io.StringIO()
    report = track(Progress("Lanczos", every_seconds=60, stream=out), total=3)
    for _ in range(3):
        report.update()
    report.finish()
    assert out.getvalue() == "", "a loop faster than the interval prints nothing"
    silent = track(None, total=3)
    silent.update(loss=1.0)
    silent.finish()
    silent.note("nothing")


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("OVERPARAM_PROGRESS_SECONDS", "off")
    assert interval_from_env() == float("inf")
    monkeypatch.setenv("OVERPARAM_PROGRESS_SECONDS", "0.5")
    assert Progress("x").every_seconds == 0.5
    monkeypatch.setenv("OVERPARAM_PROGRESS_SECONDS", "soon")
    with pytest.raises(ConfigError, match=r"OVERPARAM_PROGRESS_SECONDS must be a number of seconds >= 0 or 'off', got 'soon'"):
        interval_from_env()


def test_metrics_are_grouped_by_split_with_errors_in_percent():
    text = format_metrics({"train/loss": 0.12345, "train/error": 0.05, "val/error": 0.1, "constraints/N_delta": 3.0})
    assert text == "train loss 0.1235 error 5.00% | val error 10.00% | constraints N_delta 3"


def _fit(tmp_path, callbacks, epochs=3, **data):
    dm = TeacherStudentData(input_dim=3, num_train=64, num_test=32, batch_size=8, **data)
    task = TeacherStudent(width=4, input_shape=dm.input_shape, num_outputs=dm.num_outputs, num_train=dm.num_train)
    bar = any(isinstance(c, MetricsProgressBar) for c in callbacks)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=bar,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(task, datamodule=dm)
    return trainer


def test_progress_lines_give_the_first_and_last_epoch_with_their_metrics(tmp_path, capsys):
    _fit(tmp_path, [ProgressLines()], num_val=16)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    # Epochs this fast are closer than EPOCH_LINE_SECONDS: only the first and the last are shown.
    assert [line.split(",")[0] for line in lines] == ["epoch 1/3", "epoch 3/3"], lines
    assert re.match(r"epoch 1/3, step 8: train loss [\d.]+ error [\d.]+% \| val loss [\d.]+ error [\d.]+% \(.* s, .* steps/s\)$", lines[0]), lines[0]


def test_progress_lines_report_within_a_long_epoch(tmp_path, capsys):
    # One block of STEPS_PER_BLOCK steps per line: a full epoch of 64 steps gives 4 blocks.
    _fit(tmp_path, [ProgressLines(every_n_seconds=1e-9)], epochs=1, passes_per_epoch=8)
    lines = capsys.readouterr().err.splitlines()
    within = [line for line in lines if "so far" in line]
    assert len(within) == 4, lines
    assert re.match(r"epoch 1/1, step 16 \(25%\): train loss [\d.]+ error [\d.]+% so far \([\d,]+ steps/s\)$", within[0]), within[0]


@pytest.mark.parametrize("mode,expected", [("lines", "epoch 2/2, step"), ("none", None)])
def test_the_cli_shows_lines_or_nothing(mode, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", TS, "--trainer.max_epochs", "2", "--data.num_train", "100", "--summary", "false", "--progress", mode]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert (expected in err) if expected else "epoch " not in err, err


def test_the_bar_shows_the_key_metrics(tmp_path, capsys):
    trainer = _fit(tmp_path, [MetricsProgressBar()], epochs=1)
    shown = MetricsProgressBar().get_metrics(trainer, trainer.lightning_module)
    assert set(shown) >= {"train/loss", "train/error"} and "v_num" not in shown


def test_lanczos_slq_and_the_exact_hessian_report_their_progress():
    import torch

    from overparam.curvature import eigsh, slq
    from overparam.curvature.exact import COLUMNS_PER_CALL, dense_hessian
    from overparam.functional import module_fn
    from overparam.losses import get_loss

    diagonal = torch.linspace(1.0, 2.0, 50, dtype=torch.float64)
    out = io.StringIO()
    result = eigsh(lambda v: diagonal * v, 50, k=2, dtype=torch.float64, progress=Progress("Lanczos", every_seconds=0, stream=out))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Lanczos: 1/") and "products" in lines[0] and lines[0].endswith("converged 0/2")
    assert lines[-1] == f"Lanczos: {result.num_matvecs} products done in {lines[-1].split(' done in ')[1].split(',')[0]}, converged 2/2"

    out = io.StringIO()
    slq(lambda v: diagonal * v, 50, num_probes=3, num_steps=10, dtype=torch.float64, progress=Progress("SLQ", every_seconds=0, stream=out))
    assert [line.split(",")[0] for line in out.getvalue().splitlines()[:3]] == ["SLQ: 1/3 probes (33%)", "SLQ: 2/3 probes (67%)", "SLQ: 3/3 probes (100%)"]

    net = torch.nn.Sequential(torch.nn.Linear(20, 14), torch.nn.Tanh(), torch.nn.Linear(14, 3)).double()  # N = 339
    batches = [(torch.randn(8, 20, dtype=torch.float64), torch.randint(3, (8,)))]
    out = io.StringIO()
    dense_hessian(module_fn(net), dict(net.named_parameters()), get_loss("cross_entropy"), batches,
                  progress=Progress("exact", every_seconds=0, stream=out))
    blocks = -(-339 // COLUMNS_PER_CALL)
    assert out.getvalue().splitlines()[0].startswith(f"exact: 1/{blocks} column blocks")
