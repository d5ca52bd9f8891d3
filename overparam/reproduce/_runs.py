"""Helpers for reproduction scripts: run ``overparam fit`` and read what a run left."""

from __future__ import annotations

import math
from importlib import resources
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional


from overparam.runs import HPARAMS_FILE, METRICS_FILE, read_metrics, read_yaml
from overparam.errors import ConfigError
from overparam.progress import format_seconds, interval_from_env

def config_path(relative: str) -> str:
    """A shipped config (``configs/`` of the checkout, ``overparam/configs/`` in a wheel) as an
    absolute path; ``relative`` as under ``configs/``, e.g. ``experiments/lb_vs_sb.yaml``."""
    try:
        configs = resources.files("overparam.configs")
    except ModuleNotFoundError:  # an editable install made before configs/ became a package
        raise ConfigError("the shipped configs are not installed as overparam.configs; reinstall overparam (pip install -e .)") from None
    path = configs.joinpath(relative)
    if not path.is_file():
        raise ConfigError(f"config {relative!r} is not among the configs shipped with overparam ({path})")
    return str(path)


def fit(name: str, args: list[str], runs: Path) -> Path:
    """Run ``overparam fit ARGS`` as its own process; return its run folder ``runs/<name>``.

    The folder is fixed (CSV logger ``save_dir=runs``, ``name``, ``version=""``) so scripts
    know where to read; a finished run (``DONE`` marker) is reused, not retrained, and an
    unfinished one (killed, or failed) is trained again from scratch. The run's output goes to
    ``runs/<name>.log``; while it trains, its latest epoch line is repeated on stderr every
    ``overparam.progress`` interval, so a long reproduction is never silent.
    """
    folder = runs / name
    if (folder / "DONE").exists():
        progress_line(f"{name}: finished earlier, reused")
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    command = [
        sys.executable, "-m", "overparam", "fit", *args,
        f"--trainer.logger.init_args.save_dir={runs}", f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=", "--progress=lines",
    ]
    log = runs / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    progress_line(f"{name}: training (log: {log})")
    start = time.time()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
        every, shown = interval_from_env(), None
        while True:
            try:
                code = process.wait(timeout=None if math.isinf(every) else max(every, 0.5))
                break
            except subprocess.TimeoutExpired:
                latest = _last_line(log, lambda line: line.startswith("epoch "))
                if latest and latest != shown:
                    progress_line(f"{name}: {latest}")
                    shown = latest
    if code != 0:
        last = _last_line(log, lambda line: line.startswith("overparam: error:")) or _last_line(log, str.strip) or "(no output)"
        raise RuntimeError(f"run {name!r} failed (exit {code}): {last}; log: {log}")
    seconds = time.time() - start
    (folder / "DONE").write_text(f"{seconds:.1f}\n")
    progress_line(f"{name}: done in {format_seconds(seconds)}")
    return folder


def progress_line(message: str) -> None:
    """A stage of a reproduction, on stderr (``overparam reproduce: <message>``)."""
    sys.stderr.write(f"overparam reproduce: {message}\n")
    sys.stderr.flush()


def _last_line(path: Path, keep: Callable[[str], Any]) -> Optional[str]:
    """The last line of a text file that ``keep`` accepts, stripped."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if keep(line)]
    return lines[-1] if lines else None


def metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.csv`` with numbers parsed (empty cells dropped)."""
    return read_metrics(run / METRICS_FILE)


def last(run: Path, key: str) -> float:
    """The last logged value of ``key`` in a run."""
    values = [r[key] for r in metrics(run) if key in r]
    if not values:
        raise KeyError(f"{key} was never logged in {run}")
    return values[-1]


def hparams(run: Path) -> dict[str, Any]:
    return read_yaml(run / HPARAMS_FILE)


def seconds(run: Path) -> float:
    """Wall time of a run made by ``fit``."""
    return float((run / "DONE").read_text())
