"""Start-up time of commands that train nothing, beside the imports that bound them.

Each command runs ``--runs`` times as a fresh process (``python -m overparam``: the console
script's code path) and the median wall time is printed, with the fastest and slowest run.
Beside them: the bare interpreter, ``import torch`` and ``import lightning``, the floors of a
command that imports nothing, torch, or Lightning; ratios are to ``import lightning``.
``--python`` times other installs too (e.g. a worktree of an older commit with its own
environment), side by side. Runs go round-robin over installs and commands, and the figure is
the median, because the machines this runs on are shared: a neighbour's job then shows as a
slow outlier in every column alike, not as a shift of one median.

    python benchmarks/startup.py                                  # this install
    python benchmarks/startup.py --runs 9 --python /old/.venv/bin/python   # old vs this
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

# (label, arguments after the interpreter)
CASES: list[tuple[str, list[str]]] = [
    ("python -c pass", ["-c", "pass"]),
    ("import torch", ["-c", "import torch"]),
    ("import lightning", ["-c", "import lightning"]),
    ("overparam --help", ["-m", "overparam", "--help"]),
    ("overparam plugins", ["-m", "overparam", "plugins"]),
    ("overparam reproduce list", ["-m", "overparam", "reproduce", "list"]),
    ("overparam fit --help", ["-m", "overparam", "fit", "--help"]),
    ("overparam fit (no such -c)", ["-m", "overparam", "fit", "-c", "no-such-config.yaml"]),
]
REFERENCE = "import lightning"


def wall_time(python: str, args: list[str]) -> tuple[float, int]:
    """Wall seconds of one fresh process ``python ARGS``, and its exit code."""
    start = time.perf_counter()
    code = subprocess.run([python, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - start, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="processes per command and install (default 5)")
    parser.add_argument("--python", nargs="*", default=[], help="interpreters of other installs, timed first")
    args = parser.parse_args()
    pythons = [*args.python, sys.executable]
    times = {(py, label): [] for py in pythons for label, _ in CASES}
    codes = {}
    for _ in range(args.runs):
        for label, case in CASES:
            for py in pythons:
                seconds, codes[py, label] = wall_time(py, case)
                times[py, label].append(seconds)
    medians = {key: statistics.median(t) for key, t in times.items()}
    for i, py in enumerate(pythons):
        print(f"[{i}] {py}")
    header = "".join(f" | [{i}] median  min-max  /lightning exit" for i in range(len(pythons)))
    print(f"{'command':27s}{header}")
    for label, _ in CASES:
        cells = ""
        for py in pythons:
            t = times[py, label]
            ratio = medians[py, label] / medians[py, REFERENCE]
            cells += f" | {medians[py, label]:7.2f}s {min(t):4.1f}-{max(t):<4.1f} {ratio:9.2f}x {codes[py, label]:4d}"
        print(f"{label:27s}{cells}")
    print(f"{args.runs} runs per cell, round-robin; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
