"""``overparam reproduce NAME [--scale small|full]``: one observation of the talk, end to end.

Trains what the observation needs, writes its figures (PNG) and numbers (``NAME.json``) into
``--out`` (default ``reproduce/NAME``), and prints the numbers. ``--scale small`` runs on a
laptop CPU in minutes; ``--scale full`` is the talk's scale, for one GPU. ``overparam reproduce
list`` names the observations. Runs are kept under ``--runs`` and reused when rerun.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

from overparam.errors import ConfigError
from overparam.reproduce import OBSERVATIONS


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="overparam reproduce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help=f"one of: list, {', '.join(OBSERVATIONS)}")
    parser.add_argument("--scale", choices=("small", "full"), default="small")
    parser.add_argument("--out", default=None, help="figures and numbers (default reproduce/NAME)")
    parser.add_argument("--runs", default=None, help="training runs (default <out>/runs)")
    args = parser.parse_args(argv)
    if args.name == "list":
        for name, module in OBSERVATIONS.items():
            print(f"{name:19s}{importlib.import_module(module).TITLE}")
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
    print(json.dumps(numbers, indent=1))
    return 0
