"""Helpers for reproduction scripts: run ``overparam fit`` and read what a run left."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from overparam.errors import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def config_path(relative: str) -> str:
    """A config shipped in ``configs/`` (source checkout) as an absolute path."""
    path = REPO_CONFIGS / relative
    if not path.is_file():
        raise ConfigError(f"config {relative!r} not found under {REPO_CONFIGS}; run from a source checkout")
    return str(path)


def fit(name: str, args: list[str], runs: Path) -> Path:
    """Run ``overparam fit ARGS`` as its own process; return its run folder ``runs/<name>``.

    The folder is fixed (CSV logger ``save_dir=runs``, ``name``, ``version=""``) so scripts
    know where to read; a finished run (``DONE`` marker) is reused, not retrained.
    """
    folder = runs / name
    if (folder / "DONE").exists():
        return folder
    command = [
        sys.executable, "-m", "overparam", "fit", *args,
        f"--trainer.logger.init_args.save_dir={runs}", f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=", "--trainer.enable_progress_bar=false",
    ]
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    (runs / f"{name}.log").parent.mkdir(parents=True, exist_ok=True)
    (runs / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        last = [line for line in result.stderr.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"run {name!r} failed (exit {result.returncode}): {last[0]}; log: {runs / (name + '.log')}")
    (folder / "DONE").write_text(f"{time.time() - start:.1f}\n")
    return folder


def metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.csv`` with numbers parsed (empty cells dropped)."""
    rows = []
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def last(run: Path, key: str) -> float:
    """The last logged value of ``key`` in a run."""
    values = [r[key] for r in metrics(run) if key in r]
    if not values:
        raise KeyError(f"{key} was never logged in {run}")
    return values[-1]


def hparams(run: Path) -> dict[str, Any]:
    return yaml.safe_load((run / "hparams.yaml").read_text())


def seconds(run: Path) -> float:
    """Wall time of a run made by ``fit``."""
    return float((run / "DONE").read_text())
