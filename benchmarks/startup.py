"""Start-up time of commands that train nothing, beside the imports that bound them.

Each command runs ``--runs`` times as a fresh process (``python -m overparam``: the console
script's code path) and the median wall time is printed, with the fastest and slowest run and
the median CPU time (user + system), which moves less than wall time when other jobs share the
cores. Beside them: the bare interpreter, ``import torch`` and ``import lightning``, the floors
of a command that imports nothing, torch, or Lightning; ratios are to ``import lightning``.
``--python`` times other installs too (e.g. a worktree of an older commit with its own
environment), side by side; ``--only`` keeps the commands whose label holds one of its words.
Runs go round-robin over installs and commands and the figure is the median, because the
machines this runs on are shared: a neighbour's job then shows as a slow outlier in every
column alike, not as a shift of one median.

    python benchmarks/startup.py                                  # this install
    python benchmarks/startup.py --runs 9 --python /old/.venv/bin/python   # old vs this
    python benchmarks/startup.py --only plugins "overparam --help"
"""

from __future__ import annotations

import argparse
import resource
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


def timed(python: str, args: list[str]) -> tuple[float, float, int]:
    """Wall and CPU seconds (user + system) of one fresh process ``python ARGS``, and its exit code."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    code = subprocess.run([python, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="processes per command and install (default 5)")
    parser.add_argument("--python", nargs="*", default=[], help="interpreters of other installs, timed first")
    parser.add_argument("--only", nargs="*", default=[], help="commands whose label contains one of these words "
                        f"(with {REFERENCE!r}, the reference)")
    args = parser.parse_args()
    pythons = [*args.python, sys.executable]
    cases = [(label, case) for label, case in CASES
             if label == REFERENCE or not args.only or any(word in label for word in args.only)]
    wall = {(py, label): [] for py in pythons for label, _ in cases}
    cpu = {key: [] for key in wall}
    codes = {}
    for _ in range(args.runs):
        for label, case in cases:
            for py in pythons:
                w, c, codes[py, label] = timed(py, case)
                wall[py, label].append(w)
                cpu[py, label].append(c)
    median = {key: statistics.median(t) for key, t in wall.items()}
    for i, py in enumerate(pythons):
        print(f"[{i}] {py}")
    header = "".join(f" | [{i}] wall median (min-max)   cpu  /lightning exit" for i in range(len(pythons)))
    print(f"{'command':27s}{header}")
    for label, _ in cases:
        cells = ""
        for py in pythons:
            w = wall[py, label]
            ratio = median[py, label] / median[py, REFERENCE]
            cells += (f" | {median[py, label]:7.2f}s ({min(w):5.2f}-{max(w):5.2f}) {statistics.median(cpu[py, label]):6.2f}s"
                      f" {ratio:9.2f}x {codes[py, label]:4d}")
        print(f"{label:27s}{cells}")
    print(f"{args.runs} runs per cell, round-robin; cpu: median user + system seconds; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
