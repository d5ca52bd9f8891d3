"""``overparam sweep SWEEP.yaml``: run a W&B sweep's grid locally, one run folder per point.

For machines without W&B access. Each point runs the command the W&B agent would run
(``overparam.sweeps.command_for``) with the same Python, in ``<runs-dir>/<point>/``, its
output in ``log.txt``; a finished point gets a ``DONE`` marker and is skipped next time, so an
interrupted sweep resumes where it stopped (an unfinished point restarts from scratch).
Arguments after ``--`` are appended to every command (e.g. ``-- --trainer.max_epochs=1``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from importlib import resources
from typing import Any

from overparam.errors import ConfigError
from overparam.progress import format_seconds
from overparam.sweeps import command_for, expand, load_sweep, point_id

DONE, FAILED = "DONE", "FAILED"


def _config_file(path: str) -> str:
    """A ``--config`` path as an absolute file: relative to here, else among the shipped configs
    (``configs/X.yaml`` of a checkout is ``overparam/configs/X.yaml`` of an install)."""
    if Path(path).is_file():
        return str(Path(path).resolve())
    shipped = resources.files("overparam.configs").joinpath(path.removeprefix("configs/"))
    if shipped.is_file():
        return str(shipped)
    raise ConfigError(f"--config {path}: no such file here ({Path.cwd()}) nor among the configs shipped with overparam")


def _absolute_paths(command: list[str]) -> list[str]:
    """Relative file arguments (the config) as absolute paths: each point runs in its own folder."""
    out = []
    for i, part in enumerate(command):
        key, eq, value = part.partition("=")
        candidate = value if eq else part
        if (eq and key == "--config") or (i and command[i - 1] in ("--config", "-c")):
            candidate = _config_file(candidate)
            part = f"{key}={candidate}" if eq else candidate
        elif candidate and not candidate.startswith("-") and Path(candidate).is_file():
            candidate = str(Path(candidate).resolve())
            part = f"{key}={candidate}" if eq else candidate
        out.append(part)
    return out


def local_command(command: list[str]) -> list[str]:
    """``/usr/bin/env overparam fit ...`` -> ``python -m overparam fit ...`` (this interpreter)."""
    rest = command[2:] if command[:1] == ["/usr/bin/env"] else command[1:]
    return [sys.executable, "-m", "overparam", *_absolute_paths(rest)]


def run_point(folder: Path, command: list[str], point: dict[str, Any]) -> tuple[int, float, str]:
    """Run one point in ``folder``; returns (exit code, seconds, last error line)."""
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished point restarts from scratch
    folder.mkdir(parents=True)
    start = time.time()
    with open(folder / "log.txt", "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        code = subprocess.call(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    text = (folder / "log.txt").read_text().splitlines()
    error = next((line for line in reversed(text) if "error" in line.lower()), text[-1] if text else "")
    marker = {"point": point, "command": command, "exit_code": code, "seconds": round(seconds, 2)}
    (folder / (DONE if code == 0 else FAILED)).write_text(json.dumps(marker, indent=1))
    return code, seconds, error


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(prog="overparam sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="a W&B sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("--runs-dir", default=None, help="where point folders go (default runs/sweeps/<name>)")
    parser.add_argument("--parallel", type=int, default=1, help="points run at once (default 1)")
    parser.add_argument("--count", type=int, default=None, help="points to sample for method: random")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N points of the grid")
    parser.add_argument("--dry-run", action="store_true", help="print the agent commands, run nothing")
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error(f"--parallel must be a positive integer, got {args.parallel}")

    sweep = load_sweep(args.sweep)
    points = expand(sweep, count=args.count)[: args.limit]
    runs_dir = Path(args.runs_dir or Path("runs") / "sweeps" / sweep.name)
    jobs = []
    for point in points:
        command = command_for(sweep, point) + extra
        if args.dry_run:
            print(" ".join(command))
            continue
        folder = runs_dir / point_id(point)
        if (folder / DONE).exists():
            print(f"skip {folder.name}: finished earlier")
            continue
        jobs.append((folder, local_command(command), point))
    if args.dry_run or not jobs:
        return 0

    print(f"overparam sweep {sweep.name}: {len(jobs)} of {len(points)} points to run, {args.parallel} at a time, in {runs_dir}", flush=True)
    failures, start = 0, time.time()
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {pool.submit(run_point, *job): job[0] for job in jobs}
        # In the order points finish, so a slow point never hides the ones done after it.
        for i, future in enumerate(as_completed(futures), 1):
            code, seconds, error = future.result()
            status = f"done in {format_seconds(seconds)}" if code == 0 else f"FAILED (exit {code}): {error}"
            failures += code != 0
            left = len(jobs) - i
            eta = f"; {left} left, ~{format_seconds((time.time() - start) / i * left)}" if left else ""
            print(f"[{i}/{len(jobs)}] {futures[future].name}: {status}{eta}", flush=True)
    if failures:
        print(f"{failures} point(s) failed; their log.txt says why; rerun the same command to retry them")
    return 1 if failures else 0
