"""Observation 1: GD vs SGD on MNIST-FC (N ~ 450K): test mistakes of each.

The talk: with a large network (784-500-100-10, N = 443,610) both full-batch gradient descent
and SGD fit MNIST and end at similar test error, SGD slightly ahead (SGD 174 vs GD 194 test
mistakes of 10,000, averaged over runs). Here, for each seed (``model.init_args.init_seed``,
the initial weights; the data, its subset and the batch order are the same for every seed),
two ``overparam fit`` runs of
``configs/experiments/gd_vs_sgd.yaml`` from the same initial weights:

* ``sgd_s<seed>``: batch 128 (the config as written);
* ``gd_s<seed>``: ``--data.init_args.batch_size full``, one exact gradient step per epoch
  (``BatchSizeSwitch`` chunking at ``full`` scale so the 60,000-point gradient fits in memory).

Same learning rate (0.1), no momentum, no weight decay: only the batch size differs. Test
mistakes = test error x n_test from each run's final ``test/error`` (evaluated on all n_test
digits after training).

``small``: P = 1,000 training digits, 2,000 test digits, SGD 50 epochs (400 steps), GD 400
epochs (400 steps: as many updates as SGD), 3 seeds. ``full``: all 60,000 / 10,000 digits,
SGD 50 epochs (23,450 steps), GD 2,000 epochs (the config's header), 5 seeds.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from overparam.reproduce import _runs

TITLE = "GD vs SGD on MNIST-FC (N = 443,610): test mistakes of each, same lr, several seeds"

# n_train/n_test None: all of MNIST. parallel: runs trained at the same time (processes).
SCALES: dict[str, dict[str, Any]] = {
    "small": dict(n_train=1000, n_test=2000, width=[500, 100], sgd_batch=128, sgd_epochs=50, gd_epochs=400,
                  seeds=[0, 1, 2], chunk_size=None, parallel=2),
    "full": dict(n_train=None, n_test=None, width=[500, 100], sgd_batch=128, sgd_epochs=50, gd_epochs=2000,
                 seeds=[0, 1, 2, 3, 4], chunk_size=8192, parallel=1),
}


def _args(s: dict[str, Any], seed: int, arm: str) -> list[str]:
    # init_seed: the network's initial weights (Task); seed_everything alone does not change them.
    args = ["-c", _runs.config_path("experiments/gd_vs_sgd.yaml"), f"--model.init_args.init_seed={seed}",
            f"--model.init_args.width={s['width']}"]
    args += [f"--data.init_args.{k}={s[k]}" for k in ("n_train", "n_test") if s[k] is not None]
    if arm == "sgd":
        return args + [f"--data.init_args.batch_size={s['sgd_batch']}", f"--trainer.max_epochs={s['sgd_epochs']}"]
    # GD: one step per epoch; the metrics row of each epoch is then the exact full-batch loss.
    args += ["--data.init_args.batch_size=full", f"--trainer.max_epochs={s['gd_epochs']}", "--trainer.log_every_n_steps=1"]
    if s["chunk_size"] is not None:
        args += ["--trainer.callbacks+=BatchSizeSwitch", f"--trainer.callbacks.chunk_size={s['chunk_size']}"]
    return args


def train(s: dict[str, Any], runs: Path) -> dict[str, Path]:
    """All runs, ``parallel`` at a time (each is its own process); ``{"sgd_s0": folder, ...}``."""
    jobs = {f"{arm}_s{seed}": _args(s, seed, arm) for seed in s["seeds"] for arm in ("gd", "sgd")}
    with ThreadPoolExecutor(max_workers=s["parallel"]) as pool:
        futures = {name: pool.submit(_runs.fit, name, args, runs) for name, args in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def _curve(run: Path) -> dict[str, np.ndarray]:
    """Training loss/error per epoch against optimizer steps done (running mean over the epoch)."""
    rows = [r for r in _runs.metrics(run) if "train/loss" in r]
    return {"step": np.array([r["step"] + 1 for r in rows]), "loss": np.array([r["train/loss"] for r in rows]),
            "error": np.array([r["train/error"] for r in rows])}


def summary(run: Path, n_test: int) -> dict[str, Any]:
    c = _curve(run)
    zero = np.flatnonzero(c["error"] == 0)
    test_error = _runs.last(run, "test/error")
    return {"test/error": test_error, "test_mistakes": int(round(test_error * n_test)), "test/loss": _runs.last(run, "test/loss"),
            "train/loss": float(c["loss"][-1]), "train/error": float(c["error"][-1]), "steps": int(c["step"][-1]),
            "first_step_zero_train_error": int(c["step"][zero[0]]) if zero.size else None, "seconds": _runs.seconds(run)}


def plot(s: dict[str, Any], trained: dict[str, Path], numbers: dict[str, Any], out: Path) -> list[str]:
    from overparam.plots import save_figure, subplots

    fig, axes = subplots(1, 2, figsize=(10.5, 3.8), gridspec_kw={"width_ratios": [1.6, 1]})
    ax = axes[0]
    for arm, color, label in (("sgd", "C0", f"SGD (batch {s['sgd_batch']})"), ("gd", "C3", "GD (full batch)")):
        for i, seed in enumerate(s["seeds"]):
            c = _curve(trained[f"{arm}_s{seed}"])
            ax.plot(c["step"], c["loss"], color=color, lw=1, alpha=0.8, label=label if i == 0 else None)
    ax.set(xlabel="optimizer steps", ylabel="training loss", xscale="log", yscale="log",
           title="training loss (GD: exact; SGD: mean over the epoch), one line per seed")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)
    ax = axes[1]
    n_test = numbers["n_test"]
    for x, arm, color in ((0, "sgd", "C0"), (1, "gd", "C3")):
        mistakes = [numbers["runs"][f"{arm}_s{seed}"]["test_mistakes"] for seed in s["seeds"]]
        ax.scatter([x] * len(mistakes), mistakes, color=color, zorder=3)
        ax.hlines(np.mean(mistakes), x - 0.25, x + 0.25, color=color)
        ax.annotate(f"mean {np.mean(mistakes):.1f}", (x + 0.28, np.mean(mistakes)), fontsize=8, va="center")
    for seed in s["seeds"]:  # pair the two arms of one initialisation
        ax.plot([0, 1], [numbers["runs"][f"{a}_s{seed}"]["test_mistakes"] for a in ("sgd", "gd")], color="0.7", lw=0.8, zorder=1)
    ax.set(xticks=[0, 1], xticklabels=["SGD", "GD"], xlim=(-0.5, 1.8), ylabel=f"test mistakes (of {n_test:,})",
           title="test mistakes per seed (grey: same initialisation)")
    ax.title.set_fontsize(8)
    P = numbers["P"]
    fig.suptitle(f"MNIST-FC 784-500-100-10 (N = 443,610), P = {P:,}, lr 0.1, no momentum", fontsize=9)
    name = "gd_vs_sgd.png"
    save_figure(fig, out / name, dpi=110)
    return [name]


def run(scale: str, out: Path, runs: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train GD and SGD from each seed's initialisation, count test mistakes, plot; ``settings``
    overrides the scale's (tests)."""
    s = {**SCALES[scale], **(settings or {})}
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    trained = train(s, runs)
    first = next(iter(trained.values()))
    n_test = s["n_test"] or 10_000
    numbers: dict[str, Any] = {"settings": s, "P": int(_runs.hparams(first)["P"]), "n_test": n_test,
                               "runs": {name: summary(run_, n_test) for name, run_ in trained.items()}}
    for arm in ("sgd", "gd"):
        mistakes = [numbers["runs"][f"{arm}_s{seed}"]["test_mistakes"] for seed in s["seeds"]]
        numbers[arm] = {"mean_test_mistakes": float(np.mean(mistakes)), "test_mistakes": mistakes,
                        "std_test_mistakes": float(np.std(mistakes, ddof=1)) if len(mistakes) > 1 else math.nan}
    diffs = [numbers["runs"][f"gd_s{seed}"]["test_mistakes"] - numbers["runs"][f"sgd_s{seed}"]["test_mistakes"] for seed in s["seeds"]]
    numbers["gd_minus_sgd_mistakes"] = {"per_seed": diffs, "mean": float(np.mean(diffs))}
    numbers["figures"] = plot(s, trained, numbers, out)
    return numbers
