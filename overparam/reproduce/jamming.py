"""Observation 6: the jamming transition at N* (Spigler et al. 2019; Geiger et al. 2019, 2020).

A width sweep at fixed P with the squared hinge loss in float64, every run trained until SAT
(N_Delta = 0) or jammed (a loss plateau with N_Delta > 0) by ``ConstraintCounter``; each run
trains K seeds at once (``model.ensemble_size``, vmap), every member a sample of the phase
diagram. ``overparam report jamming`` (``overparam.commands.report.jamming``) then gives the
SAT fraction vs N/P, N_Delta/N vs P/N, N* (SAT fraction crossing 1/2, bootstrap over seeds)
and the test error vs N, single nets and the K-member average.

Two datasets:

* ``random``: teacher-student inputs on the sphere with random +-1 labels
  (``configs/experiments/jamming_random.yaml``): the phase diagram and N*; the test error is
  0.5 at every N (nothing to generalise) and is reported as a control;
* ``mnist``: MNIST parity on whitened PCA components (``configs/experiments/jamming_mnist.yaml``):
  the test error vs N around N*, and the ensemble average past N*.

``small`` runs on one CPU thread in about half an hour (random: P = 100, d = h, 6 widths; MNIST: P = 100,
8 widths; K = 4 seeds per width); ``full`` is the configs' grid (random: P = 600, d = h, the
widths of ``configs/sweeps/jamming_random.yaml``; MNIST: P = 2,000 with the widths of
``configs/sweeps/jamming_mnist.yaml``; K = 8). Every run ends on ConstraintCounter's verdict
(SAT, jammed, or undecided at the step budget), never on a fixed number of epochs.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from overparam.commands.report import jamming as jamming_report
from overparam.reproduce import _runs

TITLE = "Jamming: N_Delta phase diagram, N*, test error vs N and the ensemble average (random labels, MNIST parity)"

# Per dataset: widths swept, K seeds per run (vmap), the data/optimizer overrides, the step budget
# (an upper bound: ConstraintCounter's verdict ends each run) and the verdict's plateau window.
# small: epochs of 50 steps, so the lr endgame (10 epochs per decay) ends within ~4k steps at P = 100.
SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "small": {
        "random": dict(config="experiments/jamming_random.yaml", widths=[2, 3, 4, 5, 6, 8], K=4,
                       data={"num_train": 100, "num_test": 1000, "passes_per_epoch": 50}, lr=None, max_steps=100_000,
                       min_plateau_steps=1000),
        "mnist": dict(config="experiments/jamming_mnist.yaml", widths=[1, 2, 3, 4, 5, 6, 8, 16], K=4,
                      data={"n_train": 100, "n_test": 2000, "passes_per_epoch": 50}, lr=None, max_steps=100_000,
                      min_plateau_steps=1000),
    },
    "full": {
        "random": dict(config="experiments/jamming_random.yaml", widths=[6, 8, 9, 10, 11, 12, 14, 16], K=8,
                       data={}, lr=None, max_steps=None, min_plateau_steps=None, accelerator="auto"),
        "mnist": dict(config="experiments/jamming_mnist.yaml", widths=[2, 4, 8, 12, 16, 24, 32, 40, 48, 64], K=8,
                      data={}, lr=None, max_steps=None, min_plateau_steps=None),
    },
}


def _config(s: dict[str, Any], runs: Path, name: str) -> Path:
    """The shipped config with this scale's plateau window (the callback list cannot be patched from the CLI)."""
    config = yaml.safe_load(Path(_runs.config_path(s["config"])).read_text())
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"] == "ConstraintCounter":
            if s["min_plateau_steps"] is not None:
                cb["init_args"]["min_plateau_steps"] = s["min_plateau_steps"]
            cb["init_args"]["save_every"] = 100000  # histograms at the end only
    path = runs / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sweep(name: str, s: dict[str, Any], runs: Path) -> Path:
    """One run of K vmapped seeds per width under ``runs/<name>/``; returns that folder."""
    root = runs / name
    root.mkdir(parents=True, exist_ok=True)
    config = _config(s, runs, name)
    for width in s["widths"]:
        args = ["-c", str(config), f"--model.init_args.width={width}", f"--model.init_args.ensemble_size={s['K']}",
                "--trainer.enable_model_summary=false"]
        if s["max_steps"] is not None:
            args.append(f"--trainer.max_steps={s['max_steps']}")
        args += [f"--data.init_args.{k}={v}" for k, v in s["data"].items()]
        if s["lr"] is not None:
            args.append(f"--optimizer.init_args.lr={s['lr']}")
        if s.get("accelerator"):
            args.append(f"--trainer.accelerator={s['accelerator']}")
        _runs.fit(f"w{width}", args, root)
    return root


def _steps(run: Path) -> int:
    """Optimizer steps a run trained (the last logged step)."""
    return int(max(r.get("step", 0) for r in _runs.metrics(run)))


def _clean(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else x


def analyse(name: str, root: Path, s: dict[str, Any], out: Path) -> dict[str, Any]:
    """``report jamming`` on one sweep; its figures are copied to ``out/jamming_<name>_*.png``."""
    report = jamming_report(str(root), str(out / f"report_{name}"))
    figures = []
    for path in report["figures"]:
        target = out / f"jamming_{name}_{Path(path).name}"
        shutil.copyfile(path, target)
        figures.append(target.name)
    groups = []
    for g in report["groups"]:
        width = next(w for w in s["widths"] if (root / f"w{w}" / "hparams.yaml").exists()
                     and int(_runs.hparams(root / f"w{w}")["N"]) == g["N"])
        run = root / f"w{width}"
        groups.append({**{k: _clean(v) for k, v in g.items()}, "width": width, "steps": _steps(run),
                       "seconds": _runs.seconds(run)})
    nstar = {k: _clean(v) for k, v in report["nstar"][0].items()}
    return {"groups": groups, "nstar": nstar, "figures": figures}


def run(scale: str, out: Path, runs: Path, settings: dict[str, Any] | None = None,
        datasets: tuple[str, ...] = ("random", "mnist")) -> dict[str, Any]:
    """Sweep and report each dataset; ``settings`` (dataset -> overrides) shrinks a scale for tests."""
    if scale == "small":
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny float64 matmuls: one thread (shared CPUs)
    numbers: dict[str, Any] = {"figures": []}
    for name in datasets:
        s = {**SCALES[scale][name], **((settings or {}).get(name) or {})}
        root = sweep(name, s, runs)
        result = analyse(name, root, s, out)
        numbers[name] = {"settings": s, **result}
        numbers["figures"] += result["figures"]
    return numbers
