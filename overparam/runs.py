"""What a run leaves behind, read back: its checkpoint, its folder, its ``metrics.csv``.

A run folder (``<default_root_dir>/<task>/version_N/``) holds ``config.yaml``,
``hparams.yaml``, ``metrics.csv`` and ``checkpoints/last.ckpt``, and
``trajectory/trajectory.npz`` when it was trained with ``TrajectorySnapshots``. These helpers
turn every way a given checkpoint or trajectory can be wrong (missing, truncated, not a
checkpoint) into one ``ConfigError`` line, find the folder a checkpoint belongs to (a resumed
run continues there), cut the rows a resumed run will log again out of its ``metrics.csv``, and
read its metrics, hyperparameters and config (the one reader for commands and ``reproduce``).
"""

from __future__ import annotations

import csv
import importlib
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import yaml

from overparam.errors import ConfigError
from overparam.parser_errors import LINKED

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.yaml"
CHECKPOINT_FOLDER = "checkpoints"
#: A run's latest state, ``LastCheckpoint``'s file, relative to the run folder.
LAST_CHECKPOINT = os.path.join(CHECKPOINT_FOLDER, "last.ckpt")
#: Where ``TrajectorySnapshots`` (its default name) keeps the parameter snapshots of a run.
TRAJECTORY_FILE = Path("trajectory") / "trajectory.npz"
TRAJECTORY_KEYS = ("step", "epoch", "params", "names", "numels")


def read_checkpoint(path: Union[str, Path], option: str = "--ckpt_path") -> dict[str, Any]:
    """A Lightning checkpoint as a dict, or a one-line ConfigError saying what is wrong with it.

    Loaded with ``weights_only=True``, as LightningCLI and the Trainer load it, so a file this
    accepts is one they accept.

    Raises:
        ConfigError: the file is missing, unreadable, truncated or not a Lightning checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{option}: {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{option}: {path} is not a file (give a .ckpt, e.g. <run>/checkpoints/last.ckpt)")
    # torch.save writes a zip archive (since torch 1.6); a cut one has no central directory.
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{option}: {path} is not a readable checkpoint (not a complete PyTorch file: truncated, or another kind of file)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{option}: {path} is not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{option}: {path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def run_folder(checkpoint: Union[str, Path]) -> Optional[Path]:
    """The run folder ``<run>`` of ``<run>/checkpoints/X.ckpt`` when it holds ``config.yaml``, else None."""
    path = Path(checkpoint).resolve()
    if path.parent.name != CHECKPOINT_FOLDER:
        return None
    folder = path.parent.parent
    return folder if (folder / CONFIG_FILE).is_file() else None


def cut_metrics_after(folder: Union[str, Path], epoch: int, global_step: int) -> int:
    """Drop the rows of ``<folder>/metrics.csv`` left by training after a checkpoint.

    A run resumed from the checkpoint of epoch ``epoch`` (``global_step`` updates done) trains
    again whatever followed it and logs it again; rows of that lost training (a kill between
    two checkpoints) would repeat. Lost rows are the training and validation rows of a later
    epoch (Lightning's rows carry the epoch, and a step that counts blocks of steps) and rows
    logged at a later optimizer step without an epoch (the analysis callbacks'). Evaluations
    after training (``test/*``, ``final/*``) stay: they follow only a finished run, whose last
    checkpoint is this one. Rewritten atomically. Returns the number of rows dropped.
    """
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)

    def lost(row: dict[str, str]) -> bool:
        if row.get("epoch"):
            trains = any(value and name.startswith(("train/", "val/")) for name, value in row.items())
            return float(row["epoch"]) > epoch and trains
        return bool(row.get("step")) and float(row["step"]) > global_step

    kept = [row for row in rows if not lost(row)]
    if len(kept) == len(rows):
        return 0
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(tmp, path)
    return len(rows) - len(kept)


def metrics_header(folder: Union[str, Path]) -> list[str]:
    """The column names of ``<folder>/metrics.csv`` (empty when there is none)."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def read_metrics(metrics_csv: Union[str, Path]) -> list[dict[str, float]]:
    """The rows of a Lightning ``metrics.csv``, numbers parsed, empty and non-numeric cells dropped."""
    rows = []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for key, value in row.items():
                if key and value not in (None, ""):
                    try:
                        parsed[key] = float(value)
                    except ValueError:
                        pass
            rows.append(parsed)
    return rows


def last_values(metrics_csv: Union[str, Path]) -> dict[str, float]:
    """The last logged value of every column of a Lightning ``metrics.csv``."""
    last: dict[str, float] = {}
    for row in read_metrics(metrics_csv):
        last.update(row)
    return last


def read_yaml(path: Union[str, Path]) -> dict[str, Any]:
    """A run's ``hparams.yaml`` or ``config.yaml`` (``{}`` when absent). Lightning writes tuples
    (``input_shape``) as python tags; ``FullLoader`` reads them and runs no code."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return yaml.load(f, Loader=yaml.FullLoader) or {}


def read_trajectory(path: Union[str, Path], option: str = "--trajectory") -> dict[str, np.ndarray]:
    """The parameter snapshots of a run (``TrajectorySnapshots``), or a one-line ConfigError.

    Args:
        path: a run folder (its ``trajectory/trajectory.npz``) or the ``.npz`` itself.

    Returns:
        ``step`` (T,) optimizer updates done at each snapshot, ``epoch`` (T,), ``params``
        (T, K, N) float32 flat parameters of each ensemble member, ``names`` and ``numels``
        (the flat layout: the functional view's parameters in order).

    Raises:
        ConfigError: no trajectory (the run was trained without the callback), or a file that
            is not one.
    """
    path = Path(path)
    file = path / TRAJECTORY_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"{option}: {file} does not exist; train the run with --trainer.callbacks+=TrajectorySnapshots "
            "to keep parameter snapshots along training"
        )
    try:
        with np.load(file, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ConfigError(f"{option}: {file} is not a readable trajectory ({str(exc).strip()[:200] or type(exc).__name__})") from None
    missing = [key for key in TRAJECTORY_KEYS if key not in arrays]
    if missing or arrays["params"].ndim != 3 or arrays["params"].shape[2] != int(arrays["numels"].sum()):
        raise ConfigError(f"{option}: {file} is not a TrajectorySnapshots file (missing {', '.join(missing) or 'a consistent (T, K, N) params array'})")
    return arrays


@dataclass
class Run:
    """A finished run rebuilt from its checkpoint: the task (weights loaded) and its data."""

    task: Any
    datamodule: Any
    checkpoint: str
    config: dict
    dtype: torch.dtype


def resolve_run(spec: str, option: str) -> tuple[Path, Path]:
    """``(checkpoint, config.yaml)`` of a run folder or a checkpoint file."""
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"{option}: {spec} does not exist; give a run folder (with checkpoints/last.ckpt and config.yaml) or a .ckpt file")
    if path.is_dir():
        ckpt = path / LAST_CHECKPOINT
        if not ckpt.is_file():
            raise ConfigError(f"{option}: no checkpoints/last.ckpt in run folder {spec} (was it trained with checkpointing on?)")
        run_dir = path
    else:
        ckpt = path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{option}: no config.yaml in {run_dir} for checkpoint {ckpt}; the DataModule is rebuilt from it")
    return ckpt, config


def import_class(class_path: str, option: str) -> type:
    """A class from its dotted path, or by short name from the installed plugins."""
    if "." in class_path:
        module_name, name = class_path.rsplit(".", 1)
        try:
            return getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{option}: cannot import {class_path} ({exc})") from None
    from overparam.registry import load_plugins

    for plugin in load_plugins().values():
        if class_path in plugin.tasks + plugin.datamodules:
            return getattr(importlib.import_module(plugin.module), class_path)
    raise ConfigError(f"{option}: unknown class {class_path!r}")


def load_run(spec: str, option: str, device: torch.device | str = "cpu") -> Run:
    """Rebuild the task and DataModule of a finished run and load its weights.

    Raises:
        ConfigError: missing checkpoint or config, unreadable checkpoint, unknown classes.
    """
    ckpt_path, config_path = resolve_run(spec, option)
    checkpoint = read_checkpoint(ckpt_path, option)
    config = read_yaml(config_path)
    data_cfg = config.get("data") or {}
    if not isinstance(data_cfg, dict) or "class_path" not in data_cfg:
        raise ConfigError(f"{option}: {config_path} has no data.class_path")
    datamodule = import_class(data_cfg["class_path"], f"{option} data")(**(data_cfg.get("init_args") or {}))
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "_class_path" in hparams:
        task_cls = import_class(hparams.pop("_class_path"), f"{option} model")
        hparams.pop("_instantiator", None)
    else:
        model_cfg = config.get("model") or {}
        task_cls = import_class(model_cfg.get("class_path", ""), f"{option} model")
        hparams = {**(model_cfg.get("init_args") or {}), **{k: getattr(datamodule, k) for k in LINKED}}
    task = task_cls(**hparams)
    task.setup_network()
    try:
        task.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ConfigError(f"{option}: checkpoint {ckpt_path} does not fit {task_cls.__name__}: {' '.join(first[:3])[:300]}") from None
    precision = str((config.get("trainer") or {}).get("precision") or "")
    dtype = torch.float64 if precision.startswith("64") else torch.float32
    task.to(device=device, dtype=dtype).eval()
    return Run(task, datamodule, str(ckpt_path), config, dtype)
