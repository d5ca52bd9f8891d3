"""Shared fixtures: the real MNIST/CIFAR-10 roots (skip or fail when absent), CLI runner.

A test that needs a real data set requests ``mnist_root`` or ``cifar_root`` (``mnist_env`` for
code that reads ``$OVERPARAM_DATA_DIR``; ``data_root_for_config`` for a CLI config), and no other
way: these fixtures own the rule for a missing data set. They look in ``$OVERPARAM_DATA_DIR``
when set, else in a session copy of ``../shared/data`` when the checkout has one beside it, else
in the user cache the library falls back to; a data set absent there is fetched with the
library's own loader. When that fails (offline), the test is skipped with the loader's reason,
or fails when ``OVERPARAM_REQUIRE_DATA=1`` (``.ci/run`` sets it, so CI cannot pass by skipping).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REQUIRE_DATA = "OVERPARAM_REQUIRE_DATA"


def _data_required() -> bool:
    return os.environ.get(REQUIRE_DATA, "") == "1"


def pytest_configure(config: pytest.Config) -> None:
    value = os.environ.get(REQUIRE_DATA, "")
    if value not in ("", "0", "1"):
        raise pytest.UsageError(f"{REQUIRE_DATA} must be 0 or 1, got {value!r}")


def pytest_report_header(config: pytest.Config) -> str:
    where = os.environ.get("OVERPARAM_DATA_DIR") or (
        f"a session copy of {SHARED_DATA}" if SHARED_DATA.is_dir() else "the user cache (~/.cache/overparam/data)"
    )
    rule = f"fail ({REQUIRE_DATA}=1)" if _data_required() else f"skip (set {REQUIRE_DATA}=1 to fail instead)"
    return f"overparam data tests: MNIST/CIFAR-10 from {where}; when absent and not fetchable they {rule}"


def _copy_shared_data(root: Path) -> Path:
    """Copy MNIST's .gz files (torchvision extracts them beside themselves, and ../shared is
    read-only) and link CIFAR-10 (read in place; its cache goes under ``root``)."""
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


@pytest.fixture(scope="session")
def data_search_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where ``mnist_root``/``cifar_root`` look (tests request those, not this): ``$OVERPARAM_DATA_DIR``
    when set (CI prepares it), else a session copy of ../shared/data, else the user cache."""
    from overparam.datasets import default_data_dir

    if os.environ.get("OVERPARAM_DATA_DIR") or not SHARED_DATA.is_dir():
        return default_data_dir()
    return _copy_shared_data(tmp_path_factory.mktemp("data"))


def _has_mnist(root: Path) -> bool:
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    # torchvision extracts each official .gz offline, so either form of a file will do.
    return all((raw / gz).is_file() or (raw / gz.removesuffix(".gz")).is_file() for gz, _ in MNIST.resources)


def _has_cifar10(root: Path) -> bool:
    from overparam.datasets import CIFAR10_FILES, CIFAR10_FOLDER

    return all((root / CIFAR10_FOLDER / name).is_file() for name in CIFAR10_FILES)


def _dataset_root(root: Path, name: str, present: Callable[[Path], bool], fetch: Callable[[Path], object]) -> Path:
    """``root`` once it holds the data set (fetched with the library's loader when absent), else
    skip, or fail under ``OVERPARAM_REQUIRE_DATA=1``, with the loader's one-line reason."""
    from overparam.errors import ConfigError

    if present(root):
        return root
    try:
        fetch(root)
    except ConfigError as exc:
        if _data_required():
            pytest.fail(f"{name} is required ({REQUIRE_DATA}=1) but unavailable: {exc}", pytrace=False)
        pytest.skip(f"{name} unavailable: {exc}")
    return root


@pytest.fixture(scope="session")
def mnist_root(data_search_root: Path) -> Path:
    """A root holding ``MNIST/raw/`` (the four official files), for ``data_dir=``."""
    from overparam.datasets import load_mnist

    return _dataset_root(data_search_root, "MNIST", _has_mnist, load_mnist)


@pytest.fixture(scope="session")
def cifar_root(data_search_root: Path) -> Path:
    """A root holding ``cifar-10-batches-py/``, for ``data_dir=``."""
    from overparam.datasets import load_cifar10

    return _dataset_root(data_search_root, "CIFAR-10", _has_cifar10, load_cifar10)


@pytest.fixture
def mnist_env(mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """For code that finds MNIST through ``$OVERPARAM_DATA_DIR`` (``reproduce``, subprocess runs),
    with W&B off and one thread per run (tiny nets on a shared 2-core machine)."""
    monkeypatch.setenv("OVERPARAM_DATA_DIR", str(mnist_root))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return mnist_root


# A config's DataModule class -> the fixture of the data set it reads.
DATA_FIXTURES = {"MnistData": "mnist_root", "CifarData": "cifar_root"}


def data_root_for_config(request: pytest.FixtureRequest, config: Path) -> Optional[Path]:
    """The root of the data set ``config``'s DataModule reads (skipping or failing as the
    fixtures do), or None when it needs no data set (generated data)."""
    data_class = yaml.safe_load(config.read_text())["data"]["class_path"].rsplit(".", 1)[-1]
    fixture = DATA_FIXTURES.get(data_class)
    return request.getfixturevalue(fixture) if fixture else None


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
