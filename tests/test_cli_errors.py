"""Bad inputs: each ends with exactly one line on stderr, exit code 2, no traceback, nothing written.

``CASES`` is the table; add to it. Each case runs in process (``overparam.cli.main``: the
command's code path once its imports are paid, ~0.5 s a case) in a fresh working folder
holding only what the case prepared, plus a finished run that no case may touch. A few
cases also run through the real command (``python -m overparam``, ~5-10 s each): the exit code
of the process, and its whole stderr, which in process misses what Lightning logs through its
own handler (e.g. "GPU available", held back until a run writes its folder).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

from overparam.cli import main
from tests.conftest import CONFIGS, REPO, run_cli

TS = str(CONFIGS / "teacher_student.yaml")
MNIST_FC = str(CONFIGS / "mnist_fc.yaml")
FAST = ["--trainer.max_epochs", "1", "--data.num_train", "64", "--data.num_test", "32"]


def fit(*args: str) -> list[str]:
    return ["fit", "-c", TS, *FAST, *args]


def write(name: str, text: str) -> Callable[[Path, Path], None]:
    """A case's preparation: a file in the working folder."""
    return lambda folder, run: (folder / name).write_text(text)


def truncated_checkpoint(folder: Path, run: Path) -> None:
    (folder / "cut.ckpt").write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:2000])


def corrupt_mnist(folder: Path, run: Path) -> None:
    raw = folder / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b cut short")


def taken_run_folder(folder: Path, run: Path) -> None:
    assert main(fit("--trainer.logger.init_args.version=mine", "--summary", "false")) == 0


class Case(NamedTuple):
    id: str
    argv: list[str]
    message: str
    prepare: Callable[[Path, Path], None] = lambda folder, run: None


CASES = [
    # values
    Case("width_zero", fit("--model.width", "0"), "model.width must be positive, got 0"),
    Case("loss_unknown", fit("--model.loss", "l1"), "model.loss must be one of cross_entropy, squared_hinge, hinge, mse; got 'l1'"),
    Case("num_train_negative", fit("--data.num_train", "-5"), "data.num_train must be positive, got -5"),
    Case("width_not_int", fit("--model.width", "abc"), "--model.width: TeacherStudent expects int or list of int, got 'abc'"),
    Case("max_epochs_not_int", fit("--trainer.max_epochs", "abc"), "--trainer.max_epochs: expected int or null, got 'abc'"),
    Case("max_epochs_negative", fit("--trainer.max_epochs", "-5"), "`max_epochs` must be a non-negative integer or -1. You passed in -5."),
    Case("width_too_large", fit("--model.width", "1000000"), "model: TeacherStudent would have N = 1,000,013,000,001 parameters per member"),
    Case("progress_unknown", fit("--progress", "fancy"), "--progress: expected one of auto, bar, lines, none; got 'fancy'"),
    # names
    Case("task_misspelt", fit("--model", "TeacherStudnt"), "--model: unknown class 'TeacherStudnt'; did you mean TeacherStudent?"),
    Case("data_unknown", fit("--data", "NoSuchData"), "--data: unknown class 'NoSuchData'; installed:"),
    Case("option_misspelt", fit("--model.widht", "3"), "--model.widht: no such option of TeacherStudent; did you mean width?"),
    Case("callback_misspelt", fit("--trainer.callbacks+=ModelCheckpont"), "unknown class 'ModelCheckpont'; did you mean ModelCheckpoint"),
    # options of a callback added with +=
    Case("callback_option_type", fit("--trainer.callbacks+=HessianSpectrum", "--trainer.callbacks.top_k", "x"),
         "--trainer.callbacks.top_k: HessianSpectrum expects int or null, got 'x'"),
    Case("callback_option_misspelt", fit("--trainer.callbacks+=HessianSpectrum", "--trainer.callbacks.top_kk", "3"),
         "--trainer.callbacks.top_kk: no such option of HessianSpectrum; did you mean top_k?"),
    # config files
    Case("yaml_callback_option_type", fit("-c", "bad.yaml"), "--trainer.callbacks.top_k: HessianSpectrum expects int or null, got 'x'",
         write("bad.yaml", "trainer:\n  callbacks:\n    - class_path: HessianSpectrum\n      init_args:\n        top_k: x\n")),
    Case("yaml_syntax", fit("-c", "bad.yaml"), "--config bad.yaml: not valid YAML, line 3, column 1:",
         write("bad.yaml", "model:\n  init_args: [unclosed\n")),
    Case("yaml_trainer_key_misspelt", fit("-c", "bad.yaml"), "--trainer.max_epochz: no such option; did you mean max_epochs",
         write("bad.yaml", "trainer:\n  max_epochz: 3\n")),
    Case("yaml_unknown_section", fit("-c", "bad.yaml"), "--foo: no such option; allowed: model, data, trainer", write("bad.yaml", "foo: 1\n")),
    Case("sweep_top_level_list", ["sweep", "list.yaml"], "the top level must be a mapping (program, method, parameters, command), got a list",
         write("list.yaml", "- a\n- b\n")),
    # checkpoints
    Case("checkpoint_missing", fit("--ckpt_path", "nope.ckpt"), "--ckpt_path: nope.ckpt does not exist"),
    Case("checkpoint_truncated", fit("--ckpt_path", "cut.ckpt"), "--ckpt_path: cut.ckpt is not a readable checkpoint (not a complete PyTorch file",
         truncated_checkpoint),
    Case("checkpoint_garbage", fit("--ckpt_path", "junk.ckpt"), "--ckpt_path: junk.ckpt is not a readable checkpoint", write("junk.ckpt", "junk\n")),
    Case("checkpoint_folder", fit("--ckpt_path", "."), "--ckpt_path: . is not a file"),
    Case("test_checkpoint_missing", ["test", "-c", TS, "--ckpt_path", "nope.ckpt"], "--ckpt_path: nope.ckpt does not exist"),
    # data and output folders (refused while the run is set up, before its folder is written)
    Case("labels_outside_outputs", ["fit", "--model", "TeacherStudent", "--data", "tests.plugin_bad_labels.SevenOfThree", *FAST[:2]],
         "SevenOfThree train split: labels must be class indices 0..2 for num_outputs = 3, found 7"),
    Case("mnist_file_corrupt", ["fit", "-c", MNIST_FC, "--data.data_dir", "data", "--data.download", "false"],
         "train-images-idx3-ubyte.gz is corrupt (md5 differs from the official file: truncated or altered)", corrupt_mnist),
    Case("output_folder_unwritable", fit("--trainer.default_root_dir", "a_file/runs"), "cannot write the run folder a_file/runs/teacher_student/version_0",
         write("a_file", "")),
    Case("run_folder_taken", fit("--trainer.logger.init_args.version=mine"), "run folder runs/teacher_student/mine already holds a run (config.yaml)",
         taken_run_folder),
    # overparam's own subcommands
    Case("reproduce_unknown", ["reproduce", "gd_vs_sdg"], "reproduce: unknown observation 'gd_vs_sdg'; allowed:"),
    Case("interpolate_checkpoint_garbage", ["interpolate", "--a", "junk.ckpt", "--direction", "filter"], "--a: no config.yaml in",
         write("junk.ckpt", "junk\n")),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run: its checkpoint is cut for one case, and no case may touch it."""
    folder = tmp_path_factory.mktemp("finished")
    cwd, argv = os.getcwd(), sys.argv
    os.chdir(folder)
    sys.argv = ["overparam"]
    try:
        assert main(fit("--summary", "false")) == 0
    finally:
        os.chdir(cwd)
        sys.argv = argv
    return folder / "runs" / "teacher_student" / "version_0"


def snapshot(folder: Path) -> dict[Path, int]:
    """Every path below ``folder`` with its modification time."""
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, finished_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    case.prepare(tmp_path, finished_run)
    capsys.readouterr()
    before, run_before = snapshot(tmp_path), snapshot(finished_run)
    try:
        code = main(case.argv)
    except SystemExit as exc:  # argparse-style parsers exit; the console script returns the code
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("overparam: error: "), lines
    assert case.message in lines[0], lines[0]
    assert snapshot(tmp_path) == before, "a rejected command wrote into the working folder"
    assert snapshot(finished_run) == run_before, "a rejected command touched an earlier run"


SUBPROCESS_CASES = [
    # a parse error, a data error found while the run is set up (after the Trainer logged its
    # devices), and overparam's own subcommand: the real command's exit code and whole stderr
    Case("width_not_int", fit("--model.width", "abc"), "--model.width: TeacherStudent expects int or list of int, got 'abc'"),
    Case("labels_outside_outputs", ["fit", "--model", "TeacherStudent", "--data", "SevenOfThree", *FAST[:2]], "found 7"),
    Case("sweep_top_level_list", ["sweep", "list.yaml"], "the top level must be a mapping", write("list.yaml", "[a, b]\n")),
]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c.id for c in SUBPROCESS_CASES])
def test_the_command_itself_prints_one_line_and_exits_2(case, tmp_path):
    case.prepare(tmp_path, tmp_path)
    before = snapshot(tmp_path)
    env = {"OVERPARAM_PLUGINS": "tests.plugin_bad_labels", "PYTHONPATH": str(REPO)}
    result = run_cli(*case.argv, cwd=tmp_path, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("overparam: error: ") and case.message in lines[0], lines
    assert snapshot(tmp_path) == before
