"""A W&B logger that cannot take a run down with it.

Lightning's ``WandbLogger`` raises when W&B fails to start (no network, no or bad API key)
and again on any failed call mid-run, which ends training. ``ResilientWandbLogger`` catches
those failures, says once and clearly that W&B is off for the rest of the run and where the
local logs are, and turns itself into a no-op, so training, the CSV logs and checkpoints go on.
Use it next to the CSV logger (``configs/wandb.yaml``); the W&B mode is set by ``WANDB_MODE``
alone (``offline``, ``disabled``, ``online``), never by the config.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn


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


class ResilientWandbLogger(WandbLogger):
    """``WandbLogger`` whose failures switch W&B off instead of ending the run.

    Accepts every ``WandbLogger`` argument (``project``, ``entity``, ``group``, ``save_dir``,
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
