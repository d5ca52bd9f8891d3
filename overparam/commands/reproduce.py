"""``overparam reproduce NAME [--scale small|full]``: one observation of the talk, end to end.

Trains what the observation needs, writes its figures (PNG) and numbers (``NAME.json``) into
``--out`` (default ``reproduce/NAME``), and prints a summary table of the numbers; each stage
(a training run, its latest epoch, a path evaluated) is reported on stderr as it goes.
``--scale small`` runs on a
laptop CPU in minutes; ``--scale full`` is the talk's scale, for one GPU. ``overparam reproduce
list`` names the observations. Runs are kept under ``--runs`` and reused when rerun.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import time
from pathlib import Path
from typing import Any

from overparam.errors import ConfigError
from overparam.reproduce import OBSERVATIONS, title


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="overparam reproduce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help=f"one of: list, {', '.join(OBSERVATIONS)}")
    parser.add_argument("--scale", choices=("small", "full"), default="small")
    parser.add_argument("--out", default=None, help="figures and numbers (default reproduce/NAME)")
    parser.add_argument("--runs", default=None, help="training runs (default <out>/runs)")
    args = parser.parse_args(argv)
    if args.name == "list":
        for name in OBSERVATIONS:
            print(f"{name:19s}{title(name)}")
        return 0
    if args.name not in OBSERVATIONS:
        raise ConfigError(f"reproduce: unknown observation {args.name!r}; allowed: {', '.join(OBSERVATIONS)}")
    module = importlib.import_module(OBSERVATIONS[args.name])
    out = Path(args.out or Path("reproduce") / args.name)
    runs = Path(args.runs or out / "runs")
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    start = time.time()
    numbers = module.run(args.scale, out, runs.resolve())
    numbers = {"observation": args.name, "scale": args.scale, "seconds": round(time.time() - start, 1), **numbers}
    (out / f"{args.name}.json").write_text(json.dumps(numbers, indent=1))
    print(format_numbers(numbers))
    print(f"\nall numbers and the settings: {out / (args.name + '.json')}; figures in {out}")
    return 0


#: Tables with at most this many entries put them in columns (fields down the side).
MAX_COLUMNS = 6


def format_numbers(numbers: dict[str, Any]) -> str:
    """An observation's numbers as text: ``key  value`` lines, and a table for each group of
    runs (a mapping of mappings, or a list of mappings). Settings are left to the JSON file;
    lists longer than four values show their ends and length."""
    lines: list[str] = []
    _render("", numbers, lines)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def _render(key: str, value: Any, lines: list[str]) -> None:
    if key.rsplit("/", 1)[-1] == "settings":
        return
    if isinstance(value, dict) and len(value) > 1 and all(isinstance(v, dict) for v in value.values()):
        _table(key, {str(name): _flat(entry) for name, entry in value.items()}, lines)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        _table(key, {str(i): _flat(entry) for i, entry in enumerate(value)}, lines)
    elif isinstance(value, dict):
        for name, inner in value.items():
            _render(f"{key}/{name}" if key else str(name), inner, lines)
    else:
        lines.append(f"{key:32s} {_cell(value)}")


def _flat(entry: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in entry.items():
        if name == "settings":
            continue
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{name}/"))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _table(title: str, entries: dict[str, dict[str, Any]], lines: list[str]) -> None:
    """Entries as columns and fields as rows when there are few entries, else the transpose."""
    fields = list(dict.fromkeys(f for entry in entries.values() for f in entry))
    names = list(entries)
    if len(names) <= MAX_COLUMNS:
        header, rows = [title, *names], [[f, *(_cell(entries[n].get(f)) for n in names)] for f in fields]
    else:
        header, rows = [title, *fields], [[n, *(_cell(entries[n].get(f)) for f in fields)] for n in names]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines.append("")
    for row in [header, *rows]:
        lines.append("  ".join(f"{str(c):{w}s}" if i == 0 else f"{str(c):>{w}s}" for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    lines.append("")


def _cell(value: Any) -> str:
    """4 significant digits, thousands separated; a long list as its ends and length."""
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if len(value) <= 4:
            return ", ".join(_cell(v) for v in value)
        return f"{_cell(value[0])} .. {_cell(value[-1])} ({len(value)})"
    return str(value)
