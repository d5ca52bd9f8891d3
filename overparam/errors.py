"""Errors that end a run with one clear line, and the small checks that raise them.

The CLI turns a ``ConfigError`` into ``overparam: error: <message>`` and exit code 2, and a
``DivergenceError`` into the same line with exit code 3, without a traceback.
"""

from __future__ import annotations

from typing import Sequence, Union


class ConfigError(ValueError):
    """A configuration value is wrong: the message names the option, the value and what is allowed."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss."""


def check_positive(option: str, value: Union[int, float, Sequence[int]], allow_zero: bool = False) -> None:
    """Raise a one-line ConfigError unless ``value`` (or each entry of a list) is positive."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and not allow_zero):
            allowed = "non-negative" if allow_zero else "positive"
            raise ConfigError(f"{option} must be {allowed}, got {value!r}")


def check_choice(option: str, value: str, allowed: Sequence[str]) -> None:
    """Raise a one-line ConfigError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{option} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def check_fraction(option: str, value: float) -> None:
    """Raise a one-line ConfigError unless ``0 <= value <= 1``."""
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{option} must be in [0, 1], got {value!r}")
