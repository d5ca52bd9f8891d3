"""W&B sweep YAMLs without W&B: expand the grid and build each run's command as the agent does.

A sweep file (``configs/sweeps/*.yaml``) is a W&B sweep configuration::

    program: overparam
    method: grid
    metric: {name: test/error, goal: minimize}
    parameters:
      model.width: {values: [4, 8, 16]}
      seed_everything: {values: [0, 1]}
    command: ["${env}", "${program}", fit, --config, configs/experiments/X.yaml, "${args}"]

The W&B agent replaces ``${env}`` by ``/usr/bin/env``, ``${program}`` by ``program`` and
``${args}`` by ``--key=value`` for each parameter, where ``value`` is Python's ``str`` of the
sampled value (``wandb.sdk.launch.sweeps.utils.create_sweep_command_args``). Flags must come after
``--config`` so they override it. ``command_for`` reproduces that exactly, so the local runner
(``overparam sweep``) and the tests run what an agent would run.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from overparam.errors import ConfigError

AGENT_ENV = "/usr/bin/env"
METHODS = ("grid", "random")


@dataclass
class Sweep:
    path: Path
    name: str
    program: str
    method: str
    command: list[str]
    parameters: dict[str, dict[str, Any]]
    metric: dict[str, Any]


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep YAML (one-line ConfigError for what the agent would reject)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path}: the top level must be a mapping (program, method, parameters, command), got a {type(spec).__name__}")
    method = spec.get("method", "grid")
    if method not in METHODS:
        raise ConfigError(f"{path}: method {method!r} cannot run locally; allowed: {', '.join(METHODS)}")
    command = spec.get("command")
    if not isinstance(command, list) or "${args}" not in command:
        raise ConfigError(f"{path}: 'command' must be a list containing \"${{args}}\" (after --config)")
    if "--config" in command and command.index("${args}") < command.index("--config"):
        raise ConfigError(f"{path}: \"${{args}}\" must come after --config, or the config overrides the sweep")
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ConfigError(f"{path}: 'parameters' must be a mapping of option -> {{values: [...]}}, got a {type(parameters).__name__}")
    for key, rule in parameters.items():
        for value in _declared_values(key, rule):
            check_agent_value(key, value)
    return Sweep(
        path=path,
        name=spec.get("name") or path.stem,
        program=spec.get("program", "overparam"),
        method=method,
        command=[str(c) for c in command],
        parameters=parameters,
        metric=spec.get("metric") or {},
    )


def _declared_values(key: str, rule: Any) -> list[Any]:
    if not isinstance(rule, dict):
        raise ConfigError(f"sweep parameter {key}: expected a mapping with 'values' or 'value', got {rule!r}")
    if "values" in rule:
        return list(rule["values"])
    if "value" in rule:
        return [rule["value"]]
    return []  # a distribution (random search): checked when sampled


def check_agent_value(key: str, value: Any) -> None:
    """Reject values whose ``str`` the CLI would read back as something else (``None`` -> 'None')."""
    text = str(value)
    if isinstance(value, float):
        ok = math.isfinite(value) and float(text) == value
    else:
        try:
            ok = yaml.safe_load(text) == value
        except yaml.YAMLError:
            ok = False
    if not ok:
        raise ConfigError(
            f"sweep parameter {key}: value {value!r} reaches the command line as '--{key}={text}', "
            f"which the CLI cannot read back as {value!r}; use another value (e.g. leave the key out for a default)"
        )


def expand(sweep: Sweep, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The sweep's points: the full grid, or ``count`` random samples (``method: random``)."""
    if sweep.method == "grid":
        keys = list(sweep.parameters)
        grids = [_declared_values(k, sweep.parameters[k]) for k in keys]
        for key, values in zip(keys, grids):
            if not values:
                raise ConfigError(f"sweep parameter {key}: grid search needs 'values' or 'value'")
        return [dict(zip(keys, combo)) for combo in itertools.product(*grids)]
    rng = random.Random(seed)
    points = []
    for _ in range(count or 10):
        point = {k: _sample(k, rule, rng) for k, rule in sweep.parameters.items()}
        for k, v in point.items():
            check_agent_value(k, v)
        points.append(point)
    return points


def _sample(key: str, rule: dict[str, Any], rng: random.Random) -> Any:
    values = _declared_values(key, rule)
    if values:
        return rng.choice(values)
    distribution = rule.get("distribution", "uniform")
    low, high = rule.get("min"), rule.get("max")
    if distribution == "int_uniform":
        return rng.randint(int(low), int(high))
    if distribution == "uniform":
        return rng.uniform(float(low), float(high))
    if distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(float(low)), math.log(float(high))))
    raise ConfigError(f"sweep parameter {key}: distribution {distribution!r} is not supported locally")


def agent_args(point: dict[str, Any]) -> list[str]:
    """``${args}`` exactly as the W&B agent writes it: ``--key=str(value)``."""
    return [f"--{key}={value}" for key, value in point.items()]


def command_for(sweep: Sweep, point: dict[str, Any], program: str | None = None) -> list[str]:
    """The whole command an agent runs for ``point``."""
    out = []
    for part in sweep.command:
        if part == "${args}":
            out += agent_args(point)
        elif part == "${env}":
            out.append(AGENT_ENV)
        elif part == "${program}":
            out.append(program or sweep.program)
        else:
            out.append(part)
    return out


def point_id(point: dict[str, Any]) -> str:
    """A folder name for a point: ``model.width=8,seed_everything=1`` made filesystem-safe."""
    text = ",".join(f"{k}={v}" for k, v in point.items()) or "default"
    return re.sub(r"[^\w.,=+-]", "_", text)[:200]
