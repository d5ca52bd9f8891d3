"""``overparam reproduce``: stages reported as they go, a failed run retried, the summary table."""

from __future__ import annotations

import pytest

from overparam.commands.reproduce import format_numbers
from overparam.reproduce import _runs
from tests.conftest import CONFIGS

TINY = ["-c", str(CONFIGS / "teacher_student.yaml"), "--trainer.max_epochs=1", "--data.num_train=64", "--data.num_test=32"]


def test_numbers_print_as_a_table_of_runs_and_key_value_lines():
    numbers = {
        "observation": "x", "seconds": 12.25, "settings": {"hidden": 1},
        "runs": {"sgd": {"test/error": 0.0615, "N": 89610, "top": [3.0, 2.0, 1.0, 0.5, 0.25]},
                 "gd": {"test/error": 0.07, "N": 89610, "top": [4.0, 1.0]}},
        "groups": [{"N": 301, "sat": 0.0}, {"N": 465, "sat": 1.0}],
    }
    text = format_numbers(numbers)
    assert "hidden" not in text, "settings stay in the JSON file"
    lines = text.splitlines()
    assert lines[:2] == [f"{'observation':32s} x", f"{'seconds':32s} 12.25"]
    assert lines[3].split() == ["runs", "sgd", "gd"]
    assert lines[4].split() == ["test/error", "0.0615", "0.07"] and lines[5].split() == ["N", "89,610", "89,610"]
    assert lines[6].split() == ["top", "3", "..", "0.25", "(5)", "4,", "1"]
    assert [line.split() for line in lines[8:]] == [["groups", "0", "1"], ["N", "301", "465"], ["sat", "0", "1"]]


def test_a_run_reports_its_stages_and_a_failed_one_is_trained_again(tmp_path, capsys):
    runs = tmp_path / "runs"
    with pytest.raises(RuntimeError, match=r"run 'r' failed \(exit 2\): overparam: error: model.width must be positive, got 0; log: "):
        _runs.fit("r", [*TINY, "--model.width=0"], runs)
    (runs / "r").mkdir()
    (runs / "r" / "config.yaml").write_text("left by a killed attempt\n")
    folder = _runs.fit("r", TINY, runs)
    assert (folder / "DONE").is_file() and (folder / "metrics.csv").is_file()
    assert "epoch 1/1" in (runs / "r.log").read_text(), "the run's progress lines are in its log"
    assert _runs.fit("r", TINY, runs) == folder
    err = capsys.readouterr().err
    assert "overparam reproduce: r: training (log: " in err and "overparam reproduce: r: done in " in err
    assert "overparam reproduce: r: finished earlier, reused" in err
