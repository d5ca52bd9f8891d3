"""Shared fixtures: a writable data root holding the real MNIST/CIFAR-10 files, CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _prepare_data_root(root: Path) -> Path:
    """Copy MNIST's .gz files (torchvision extracts them offline) and link CIFAR-10."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    source = SHARED_DATA / "MNIST" / "raw"
    for gz in source.glob("*.gz") if source.is_dir() else ():
        if not (raw / gz.name).exists():
            shutil.copy(gz, raw / gz.name)
    cifar = SHARED_DATA / "cifar-10-batches-py"
    if cifar.is_dir() and not (root / "cifar-10-batches-py").exists():
        (root / "cifar-10-batches-py").symlink_to(cifar)
    return root


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: the test tensors are small, and on 2 (shared) cores torch's thread
    pool only adds contention (measured: tiny products 10-50x slower with 2 threads under load).
    Subprocesses get ``OMP_NUM_THREADS=1`` from ``run_cli``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """In-process ``main(argv)`` stands for the command line: pytest's own flags must not look
    like extra arguments to LightningCLI."""
    monkeypatch.setattr("sys.argv", ["overparam"])


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$OVERPARAM_DATA_DIR`` when set (CI prepares it), else a session copy of ../shared/data."""
    env = os.environ.get("OVERPARAM_DATA_DIR")
    root = Path(env) if env else _prepare_data_root(tmp_path_factory.mktemp("data"))
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip(f"no MNIST under {root}; set OVERPARAM_DATA_DIR (see README)")
    return root


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m overparam ARGS`` in a subprocess (the installed command's code path)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "overparam", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli(tmp_path: Path):
    """``cli(*args)`` runs the command in a fresh folder and returns the CompletedProcess."""

    def _run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        return run_cli(*args, cwd=tmp_path, env=env, timeout=timeout)

    return _run


CONFIGS = REPO / "configs"
