"""Progress of long loops as plain lines on stderr, readable in a terminal and in a log file.

Engines (landscape paths and curve fits, the curvature solvers) and commands (sweeps,
``reproduce``) take an optional ``progress`` argument: a ``Progress`` made by the caller, which
names the work. The engine announces the loop (``track(progress, total, unit)``), counts its
items and may add a few fields (a loss, a residual); a line goes to stderr at most every
``every_seconds``, so a loop shorter than that prints nothing, and a long one prints e.g.::

    interpolate linear: 12/27 points (44%), 1.9 points/s, ~8 s left

No bar and no carriage returns: the same lines suit a terminal, ``log.txt`` of a sweep point
and a batch system's output file. ``$OVERPARAM_PROGRESS_SECONDS`` sets the interval for a whole
process (``0``: every item, ``off``: never). Training has its own display
(``overparam.callbacks.progress``); this module imports neither Lightning nor torch.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Optional, TextIO

from overparam.errors import ConfigError

#: Default seconds between two lines: long enough that a fast loop stays silent, short
#: enough that a user never waits long without knowing the work goes on.
EVERY_SECONDS = 5.0
ENV = "OVERPARAM_PROGRESS_SECONDS"


def interval_from_env(default: float = EVERY_SECONDS) -> float:
    """The interval from ``$OVERPARAM_PROGRESS_SECONDS`` (``off``: infinite), else ``default``.

    Raises:
        ConfigError: the variable is neither a non-negative number nor ``off``.
    """
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return default
    if value == "off":
        return math.inf
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"${ENV} must be a number of seconds >= 0 or 'off', got {value!r}")
    return seconds


def format_fields(fields: dict[str, Any]) -> str:
    """``loss 0.1234, residual 3.1e-05``: floats to 4 significant digits, in the given order."""
    return ", ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}" for name, value in fields.items())


def format_rate(rate: float) -> str:
    """``2,345`` above 100 a second, else three digits (``12.5``)."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def format_seconds(seconds: float) -> str:
    """``0.04 s``, ``4.2 s``, ``42 s``, ``3.5 min``, ``2.1 h``."""
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """One loop's progress, reported as a line on stderr at most every ``every_seconds``.

    Args:
        label: what the loop does, first on every line (``"Lanczos"``, ``"sweep jamming"``).
        every_seconds: shortest time between two lines; default ``$OVERPARAM_PROGRESS_SECONDS``,
            else ``EVERY_SECONDS``.
        stream: where lines go (default ``sys.stderr``, looked up at each line so a captured
            stderr sees them).

    Example::

        progress = Progress("interpolate linear")
        evaluate_path(fn, path, data, loss_fn, progress=progress)  # the engine calls track()
    """

    def __init__(self, label: str, every_seconds: Optional[float] = None, stream: Optional[TextIO] = None) -> None:
        self.label = label
        self.every_seconds = interval_from_env() if every_seconds is None else every_seconds
        self.stream = stream
        self.start(None)

    def start(self, total: Optional[int], unit: str = "steps") -> "Progress":
        """Begin (or restart) the count: ``total`` items (None: unknown) named ``unit``."""
        self.total, self.unit, self.done = total, unit, 0
        self.started = self.last_line = time.monotonic()
        self.lines = 0
        return self

    def update(self, advance: int = 1, **fields: Any) -> None:
        """Count ``advance`` more items; print a line when ``every_seconds`` have passed.

        ``fields`` (e.g. ``loss=0.12``) are added to the line; floats show 4 digits.
        """
        self.done += advance
        now = time.monotonic()
        if now - self.last_line >= self.every_seconds:
            self._write(self._line(now, fields))
            self.last_line = now

    def finish(self, **fields: Any) -> None:
        """A closing line (count, time, ``fields``), only when the loop printed a line before."""
        if self.lines:
            elapsed = time.monotonic() - self.started
            extra = f", {format_fields(fields)}" if fields else ""
            self._write(f"{self.label}: {self.done:,} {self.unit} done in {format_seconds(elapsed)}{extra}")

    def note(self, message: str) -> None:
        """A line now, whatever the interval (a stage starts or ends); silent when progress is off."""
        if math.isfinite(self.every_seconds):
            self._write(f"{self.label}: {message}")

    def _line(self, now: float, fields: dict[str, Any]) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.done:,}/{self.total:,} {self.unit} ({self.done / self.total:.0%})" if self.total else f"{self.done:,} {self.unit}"]
        parts.append(f"{format_rate(rate)} {self.unit}/s" if rate >= 1 else f"{1 / rate if rate else math.inf:.3g} s per {self.unit.rstrip('s')}")
        if self.total and 0 < self.done < self.total:
            parts.append(f"~{format_seconds((self.total - self.done) / rate)} left")
        if fields:
            parts.append(format_fields(fields))
        return f"{self.label}: {', '.join(parts)}"

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()
        self.lines += 1


class _Silent:
    """Stands in for a missing ``Progress``: every call does nothing."""

    def update(self, advance: int = 1, **fields: Any) -> None:
        pass

    def finish(self, **fields: Any) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def track(progress: Optional[Progress], total: Optional[int], unit: str = "steps") -> Progress | _Silent:
    """What an engine calls at the top of its loop: ``progress`` started on ``total`` items, or a
    silent stand-in when the caller gave none (library use stays quiet)."""
    return progress.start(total, unit) if progress is not None else _Silent()
