"""Observation 7: two independently trained nets, the straight line between them vs a Bezier curve.

One ``overparam fit`` of ``configs/experiments/mode_connectivity.yaml``: two MNIST-FC nets from
different initial seeds trained side by side (an ensemble of K = 2, SGD with momentum), with
``InterpolationBarrier`` measuring the segment between them during training and each one's
line from its initialisation at the end. Then ``overparam connect`` fits a quadratic Bezier
curve between the two (one bend, Garipov et al. 2018, Sec. 3.2) and evaluates it and the linear
path on the training and test sets.

The talk (after Garipov et al. 2018; Draxler et al. 2018): the linear path between two
solutions crosses a barrier, while a simple curve joins them at (near) constant low loss.

``small`` is a CPU version (2,000 training digits, 10 epochs, 400 curve steps); ``full`` the
config's scale (all 60,000 digits, 20 epochs; 2,000 curve steps, as its header says).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from overparam.commands import connect
from overparam.reproduce import _runs

TITLE = "Mode connectivity: linear path between two independently trained nets vs a fitted Bezier curve (MNIST-FC)"

# n_train/n_test None: all of MNIST; analysis_size None keeps the config's 10,000.
SCALES: dict[str, dict[str, Any]] = {
    "small": dict(n_train=2000, n_test=2000, analysis_size=2000, width=[500, 100], epochs=10, steps=400, points=21),
    "full": dict(n_train=None, n_test=None, analysis_size=None, width=[500, 100], epochs=20, steps=2000, points=25),
}


def train(s: dict[str, Any], runs: Path) -> Path:
    args = ["-c", _runs.config_path("experiments/mode_connectivity.yaml"), f"--model.init_args.width={s['width']}",
            f"--trainer.max_epochs={s['epochs']}"]  # the segment every 5 epochs (the config)
    args += [f"--data.init_args.{k}={s[k]}" for k in ("n_train", "n_test", "analysis_size") if s[k] is not None]
    return _runs.fit("pair", args, runs)


def connection(s: dict[str, Any], run: Path, out: Path) -> dict[str, np.ndarray]:
    """``overparam connect`` between members 0 and 1 of ``run``; its ``curve.npz`` as arrays."""
    folder = out / "connection"
    if not (folder / "curve.npz").exists():
        connect.main(["--a", str(run), "--b", str(run), "--steps", str(s["steps"]), "--points", str(s["points"]),
                      "--out", str(folder)])  # on the GPU when there is one
    with np.load(folder / "curve.npz") as f:
        return {k: f[k] for k in f.files if k != "controls"}


def barrier_history(run: Path) -> dict[str, np.ndarray]:
    """The member-to-member segment's heights that ``InterpolationBarrier`` logged during training.

    Rows are logged at optimizer steps (no epoch column); the evaluation at fit end repeats the
    last scheduled one when training ends on a scheduled epoch, so steps are kept once.
    """
    keys = ("barriers/train/loss/barrier", "barriers/test/loss/barrier", "barriers/train/error/barrier", "barriers/test/error/barrier")
    rows = {int(r["step"]): r for r in _runs.metrics(run) if keys[0] in r}
    steps = sorted(rows)
    return {"step": np.array(steps), **{k: np.array([rows[i][k] for i in steps]) for k in keys}}


def plot(curve: dict[str, np.ndarray], history: dict[str, np.ndarray], out: Path) -> list[str]:
    from overparam.plots import save_figure, subplots

    fig, axes = subplots(1, 3, figsize=(13, 3.6))
    t = curve["t"]
    for ax, what in zip(axes[:2], ("loss", "error")):
        for prefix, color, label in (("linear_", "C3", "linear path"), ("", "C0", "Bezier curve")):
            ax.plot(t, curve[f"{prefix}train_{what}"], color=color, ls="--", label=f"{label}, train")
            ax.plot(t, curve[f"{prefix}test_{what}"], color=color, label=f"{label}, test")
        ax.set(xlabel="t (net 1 at t=0, net 2 at t=1)", ylabel=what)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[0].set_title("loss along the paths")
    axes[1].set_title("error along the paths")
    ax = axes[2]
    for key, style in (("barriers/train/loss/barrier", "C3--"), ("barriers/test/loss/barrier", "C3")):
        ax.plot(history["step"], history[key], style, marker="o", label=key.split("/")[1] + " loss")
    ax.set(xlabel="optimizer step", ylabel="barrier of the linear path", title="linear barrier during training")
    ax.legend(fontsize=7)
    name = "mode_connectivity.png"
    save_figure(fig, out / name, dpi=110)
    return [name]


def run(scale: str, out: Path, runs: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the pair, fit the curve, plot; ``settings`` overrides the scale's (tests)."""
    s = {**SCALES[scale], **(settings or {})}
    pair = train(s, runs)
    curve = connection(s, pair, out)
    history = barrier_history(pair)
    numbers: dict[str, Any] = {"settings": s, "figures": plot(curve, history, out), "train_seconds": _runs.seconds(pair)}
    # The two nets evaluated exactly (the ends of the path; the logged train/loss is the running
    # mean over the last epoch, the logged test/* equal these).
    ends = {0: int(np.flatnonzero(curve["t"] == 0)[0]), 1: int(np.flatnonzero(curve["t"] == 1)[0])}
    numbers["members"] = {
        f"member_{k}": {f"{split}/{what}": float(curve[f"linear_{split}_{what}"][i]) for split in ("train", "test") for what in ("loss", "error")}
        for k, i in ends.items()
    }
    numbers["ensemble_test_error"] = _runs.last(pair, "test/ensemble_error")
    numbers["barriers"] = {k[len("barrier:"):]: float(v) for k, v in curve.items() if k.startswith("barrier:")}
    numbers["barrier_during_training"] = {f"step_{int(n)}": {k: float(v[i]) for k, v in history.items() if k != "step"}
                                          for i, n in enumerate(history["step"])}
    init = {}
    for k in (0, 1):
        init[f"member_{k}"] = _runs.last(pair, f"barriers_init/member_{k}/train/loss/barrier")
    numbers["line_from_init_train_loss_barrier"] = init
    return numbers
