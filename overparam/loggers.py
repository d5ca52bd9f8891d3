"""Loggers: a W&B logger that cannot take a run down with it, a CSV logger that resumes.

Lightning's ``WandbLogger`` raises when W&B fails to start (no network, no or bad API key)
and again on any failed call mid-run, which ends training. ``ResilientWandbLogger`` catches
those failures, says once and clearly that W&B is off for the rest of the run and where the
local logs are, and turns itself into a no-op, so training, the CSV logs and checkpoints go on.
Use it next to the CSV logger (``configs/wandb.yaml``); the W&B mode is set by ``WANDB_MODE``
alone (``offline``, ``disabled``, ``online``), never by the config.

``RunCSVLogger`` is the run folder's logger: Lightning's ``CSVLogger`` that writes nothing
before the run's first result and continues a resumed run's ``metrics.csv``.
"""

from __future__ import annotations

import functools
import os
import socket
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_warn

from overparam.runs import cut_metrics_after, metrics_header


class _Disabled:
    """Stands in for the W&B run after a failure: every attribute is a no-op."""

    def __getattr__(self, name: str) -> Any:
        if name in ("id", "name", "dir", "project"):
            return None
        return _Disabled()

    def __call__(self, *args: Any, **kwargs: Any) -> "_Disabled":
        return self


def _guarded(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self: "ResilientWandbLogger", *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any W&B failure must not end the run
            self._fail(exc)
            return None

    return wrapper


#: Seconds to wait for the W&B server to accept a connection before W&B is switched off. W&B's
#: own start-up waits 90 s and retries (about two minutes of a stalled run, measured); a
#: server that answers at all answers in well under this.
CONNECT_SECONDS = 5.0


def _unreachable_server() -> Optional[str]:
    """Why the W&B server cannot be reached (online mode only), or None when it answers.

    One TCP connection to ``$WANDB_BASE_URL`` (default ``https://api.wandb.ai``), at most
    ``CONNECT_SECONDS``: the run then goes on without W&B at once instead of after W&B's own
    timeouts. Offline and disabled modes need no server.
    """
    if os.environ.get("WANDB_MODE", "online").lower() in ("offline", "disabled", "dryrun"):
        return None
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=CONNECT_SECONDS):
            return None
    except OSError as exc:
        return f"cannot reach the W&B server {url.scheme}://{url.netloc}: {exc.strerror or exc or 'timed out'}"


class ResilientWandbLogger(WandbLogger):
    """``WandbLogger`` whose failures switch W&B off instead of ending the run.

    In online mode the W&B server is tried first (``CONNECT_SECONDS``), so an unreachable one
    costs seconds, not W&B's own two minutes of retries. Accepts every ``WandbLogger`` argument (``project``, ``entity``, ``group``, ``save_dir``,
    ...); unset ones fall back to W&B's environment variables (``WANDB_PROJECT``,
    ``WANDB_ENTITY``, ``WANDB_RUN_GROUP``).
    """

    failed = False

    def _fail(self, exc: Exception) -> None:
        self.failed = True
        self._experiment = _Disabled()
        rank_zero_warn(
            f"W&B failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "W&B logging is off for the rest of this run, which goes on: metrics, config and checkpoints "
            "are in the local run folder (CSV logger). Set WANDB_MODE=offline to keep W&B files locally."
        )

    @property
    def experiment(self) -> Any:
        if self.failed:
            return self._experiment
        if self._experiment is None:
            unreachable = _unreachable_server()
            if unreachable:
                self._fail(ConnectionError(unreachable))
                return self._experiment
        try:
            return super().experiment
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)
            return self._experiment

    log_metrics = _guarded(WandbLogger.log_metrics)
    log_hyperparams = _guarded(WandbLogger.log_hyperparams)
    log_image = _guarded(WandbLogger.log_image)
    log_table = _guarded(WandbLogger.log_table)
    after_save_checkpoint = _guarded(WandbLogger.after_save_checkpoint)
    finalize = _guarded(WandbLogger.finalize)


class _RunWriter(ExperimentWriter):
    """Lightning's CSV writer, except that nothing touches the folder before the first write.

    Then the folder is made and an existing ``metrics.csv`` (a resumed run's) is cut at the
    checkpoint and continued under its header, where Lightning's writer deletes it.
    """

    def __init__(self, log_dir: str, resumed_at: Optional[tuple[int, int]] = None) -> None:
        # Not super().__init__(): it makes the folder and deletes metrics.csv at once, and the
        # Trainer creates the writer before the data and the callbacks are set up, so a run
        # that fails there would leave an empty folder or cut a resumed run's history.
        self.log_dir, self.resumed_at = log_dir, resumed_at
        self._fs = get_filesystem(log_dir)
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self.metrics: list[dict[str, float]] = []
        self.metrics_keys: list[str] = []
        self.hparams: dict[str, Any] = {}
        self._opened = False

    def _open(self) -> None:
        if self._opened:
            return
        self._fs.makedirs(self.log_dir, exist_ok=True)
        if self.resumed_at is not None:
            cut_metrics_after(self.log_dir, *self.resumed_at)
        # New columns make the writer rewrite the file with its old rows, so it knows the old ones.
        self.metrics_keys = metrics_header(self.log_dir)
        self._opened = True

    def log_hparams(self, params: dict[str, Any]) -> None:
        self._open()
        super().log_hparams(params)

    def save(self) -> None:
        if self.metrics:
            self._open()
        super().save()


class RunCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` that writes nothing before a run's first result and resumes runs.

    The default logger of ``overparam fit`` (and what the CLI puts in place of Lightning's
    ``CSVLogger`` when a config names it). Same arguments and files (``metrics.csv``,
    ``hparams.yaml`` in ``<save_dir>/<name>/<version>``), two differences:

    * the folder is made at the first write, so a run refused while its data, model or
      callbacks are set up leaves no empty ``version_N`` behind;
    * a run resumed into its own folder (``overparam fit --ckpt_path <run>/checkpoints/last.ckpt``)
      keeps ``metrics.csv`` and goes on in it; rows after the checkpoint (``resumed_at``: its
      epoch and global step, set by the CLI) came from training that was lost and is now done
      again, so they are dropped (``overparam.runs.cut_metrics_after``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resumed_at: Optional[tuple[int, int]] = None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._experiment = _RunWriter(self.log_dir, self.resumed_at)
        return self._experiment
