"""Observation 2: large vs small batch on MNIST-FC, LB then SB, and the lines through them.

Three ``overparam fit`` runs of the same net from the same initialisation (seed 0):

* ``lb``: large batch for all epochs (``configs/experiments/lb_vs_sb.yaml``);
* ``sb``: small batch for all epochs (the same config, ``batch_size`` SB);
* ``lb_to_sb``: large batch, then small batch from epoch ``switch`` on, with the same learning
  rate (``configs/experiments/lb_to_sb.yaml``: ``BatchSizeSwitch``, Sagun et al. 2017, Sec. 4).
  A checkpoint is kept at the end of the LB phase: the LB solution the switch starts from.

Then ``overparam interpolate`` evaluates (train and test loss and error)

* the line from the LB solution to the SB solution, ``t`` in [-0.5, 1.5];
* the line from the LB solution at the switch to where SB training took it (Sagun et al. 2017,
  Fig. 7: no barrier, the SB phase stays in the LB solution's basin);
* a filter-normalised random line away from each of the LB and SB solutions, ``t`` in [-1, 1]
  (Li et al. 2018; Keskar et al. 2017, Fig. 3 use such lines to compare sharpness).

``small`` is a CPU version (2,000 training digits, LB 256 and SB 64, 30 epochs, switch at 15);
``full`` is the talk's (all 60,000 digits, LB 4,096 and SB 64, 60 epochs, switch at 30).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from overparam.commands import interpolate
from overparam.reproduce import _runs

TITLE = "Large vs small batch: train/test gap, LB then SB, lines between and away from the solutions (MNIST-FC)"

# n_train/n_test None: all of MNIST. `size`: training points the lines are evaluated on.
# val_size: held-out training digits evaluated every epoch (the Task evaluates test at the end only).
SCALES: dict[str, dict[str, Any]] = {
    "small": dict(n_train=2000, n_test=2000, val_size=1000, width=[500, 100], lb=256, sb=64, epochs=30, switch=15, points=21, size=None),
    "full": dict(n_train=None, n_test=None, val_size=5000, width=[500, 100], lb=4096, sb=64, epochs=60, switch=30, points=25, size=10000),
}


def _common(s: dict[str, Any]) -> list[str]:
    args = [f"--model.init_args.width={s['width']}", f"--trainer.max_epochs={s['epochs']}"]
    args += [f"--data.init_args.{k}={s[k]}" for k in ("n_train", "n_test", "val_size") if s[k] is not None]
    return args


def _switch_overlay(s: dict[str, Any], runs: Path) -> Path:
    """A config layered over lb_to_sb.yaml: this scale's schedule and a checkpoint at the switch.

    ``every_n_epochs = switch`` with ``save_top_k = -1`` keeps ``epoch=<switch - 1>-...ckpt``,
    the weights after the last LB epoch (Lightning counts epochs from 0), and ``save_last``
    keeps ``last.ckpt`` (the CLI adds it only when no ModelCheckpoint is configured).
    """
    overlay = {"trainer": {"callbacks": [
        {"class_path": "BatchSizeSwitch", "init_args": {"schedule": {0: s["lb"], s["switch"]: s["sb"]}, "lr_rule": "none", "reset_optimizer": False}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_epochs": s["switch"], "save_top_k": -1, "save_last": True}},
    ]}}
    path = runs / "lb_to_sb_overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def train(s: dict[str, Any], runs: Path) -> dict[str, Path]:
    lb_cfg, switch_cfg = _runs.config_path("experiments/lb_vs_sb.yaml"), _runs.config_path("experiments/lb_to_sb.yaml")
    return {
        "lb": _runs.fit("lb", ["-c", lb_cfg, *_common(s), f"--data.init_args.batch_size={s['lb']}"], runs),
        "sb": _runs.fit("sb", ["-c", lb_cfg, *_common(s), f"--data.init_args.batch_size={s['sb']}"], runs),
        "lb_to_sb": _runs.fit("lb_to_sb", ["-c", switch_cfg, "-c", str(_switch_overlay(s, runs)), *_common(s),
                                           f"--data.init_args.batch_size={s['lb']}"], runs),
    }


def switch_checkpoint(run: Path, switch: int) -> Path:
    """The LB-phase checkpoint of the switch run (end of epoch ``switch - 1``, 0-based)."""
    found = sorted((run / "checkpoints").glob(f"epoch={switch - 1}-*.ckpt"))
    if not found:
        raise RuntimeError(f"no checkpoint of epoch {switch - 1} in {run / 'checkpoints'}")
    return found[0]


def lines(s: dict[str, Any], trained: dict[str, Path], out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Each line's ``curve.npz`` (written by ``overparam interpolate`` under ``out/lines``)."""
    common = ["--points", str(s["points"]), "--splits", "train,test"]  # on the GPU when there is one
    if s["size"] is not None:
        common += ["--size", str(s["size"])]
    specs = {
        "lb_sb": ["--a", str(trained["lb"]), "--b", str(trained["sb"]), "--t-min", "-0.5", "--t-max", "1.5"],
        "switch": ["--a", str(switch_checkpoint(trained["lb_to_sb"], s["switch"])), "--b", str(trained["lb_to_sb"]),
                   "--t-min", "-0.5", "--t-max", "1.5"],
        "away_lb": ["--a", str(trained["lb"]), "--direction", "filter", "--t-min", "-1", "--t-max", "1"],
        "away_sb": ["--a", str(trained["sb"]), "--direction", "filter", "--t-min", "-1", "--t-max", "1"],
    }
    curves = {}
    for name, argv in specs.items():
        folder = out / "lines" / name
        if not (folder / "curve.npz").exists():
            interpolate.main([*argv, *common, "--out", str(folder)])
        with np.load(folder / "curve.npz") as f:
            curves[name] = {k: f[k] for k in f.files}
    return curves


def _history(run: Path) -> dict[str, np.ndarray]:
    """Per epoch: the training loss/error (running means over the epoch) and the held-out (val) ones."""
    rows = {}
    for r in _runs.metrics(run):
        if "epoch" in r and ("val/error" in r or "train/error" in r):
            rows.setdefault(int(r["epoch"]), {}).update(r)
    rows = {e: r for e, r in rows.items() if "val/error" in r and "train/error" in r}
    epochs = sorted(rows)
    return {"epoch": np.array(epochs), **{k: np.array([rows[e][k] for e in epochs]) for k in ("train/loss", "train/error", "val/loss", "val/error")}}


def _barriers(curve: dict[str, np.ndarray], label: str = "linear") -> dict[str, float]:
    """The barrier heights ``overparam interpolate`` stored with a path (``barrier:<path>/...``)."""
    prefix = f"barrier:{label}/"
    return {k[len(prefix):]: float(v) for k, v in curve.items() if k.startswith(prefix)}


def plot(s: dict[str, Any], trained: dict[str, Path], curves: dict[str, dict[str, np.ndarray]], out: Path) -> list[str]:
    from overparam.plots import save_figure, subplots

    names = []
    labels = {"lb": f"LB ({s['lb']})", "sb": f"SB ({s['sb']})", "lb_to_sb": f"LB then SB (switch at epoch {s['switch']})"}
    fig, axes = subplots(1, 2, figsize=(10, 3.6))
    for key, color in zip(labels, ("C3", "C0", "C2")):
        h = _history(trained[key])
        epochs = h["epoch"] + 1
        for ax, what in zip(axes, ("error", "loss")):
            ax.plot(epochs, h[f"train/{what}"], color=color, ls="--", label=f"{labels[key]} train")
            ax.plot(epochs, h[f"val/{what}"], color=color, label=f"{labels[key]} held out")
    for ax, what in zip(axes, ("error", "loss")):
        ax.axvline(s["switch"], color="gray", lw=0.8)
        ax.set(xlabel="epoch", ylabel=what)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("MNIST-FC: large vs small batch (dashed: training set, running mean over the epoch; solid: held-out digits)", fontsize=9)
    names.append("lb_vs_sb_training.png")
    save_figure(fig, out / names[-1], dpi=110)

    fig, axes = subplots(1, 3, figsize=(13, 3.6))
    titles = {"lb_sb": "LB (t=0) to SB (t=1)", "switch": "LB at the switch (t=0) to LB then SB (t=1)"}
    for ax, key in zip(axes[:2], titles):
        c = curves[key]
        ax.plot(c["t"], c["train_loss"], "C1--", label="train loss")
        ax.plot(c["t"], c["test_loss"], "C1", label="test loss")
        ax.axvspan(0, 1, color="0.93")
        ax.set(xlabel="t", ylabel="loss", yscale="log", title=titles[key])
        twin = ax.twinx()
        twin.plot(c["t"], c["test_error"], "C4", lw=0.9, label="test error")
        twin.set_ylabel("test error", color="C4")
        ax.legend(fontsize=7, loc="upper center")
    ax = axes[2]
    for key, color, label in (("away_lb", "C3", "from LB"), ("away_sb", "C0", "from SB")):
        c = curves[key]
        ax.plot(c["t"], c["train_loss"], color=color, ls="--", label=f"{label}, train")
        ax.plot(c["t"], c["test_loss"], color=color, label=f"{label}, test")
    ax.set(xlabel="t (filter-normalised random direction)", ylabel="loss", yscale="log", title="lines away from the solutions")
    ax.legend(fontsize=7)
    names.append("lb_vs_sb_lines.png")
    save_figure(fig, out / names[-1], dpi=110)
    return names


def run(scale: str, out: Path, runs: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the three runs, evaluate the four lines, plot; ``settings`` overrides the scale's (tests)."""
    s = {**SCALES[scale], **(settings or {})}
    trained = train(s, runs)
    curves = lines(s, trained, out)
    figures = plot(s, trained, curves, out)
    numbers: dict[str, Any] = {"settings": s, "figures": figures, "runs": {}}
    # The nets at the end, evaluated exactly: the lines' ends (the whole test set; the training
    # points the lines use: all at small, `size` at full). The logged train/loss is the running
    # mean over the last epoch; the logged test/* equal these.
    ends = {"lb": (curves["away_lb"], 0.0), "sb": (curves["away_sb"], 0.0), "lb_at_switch": (curves["switch"], 0.0),
            "lb_to_sb": (curves["switch"], 1.0)}
    for key, (c, t) in ends.items():
        i = int(np.flatnonzero(c["t"] == t)[0])
        final = {f"{split}/{what}": float(c[f"{split}_{what}"][i]) for split in ("train", "test") for what in ("loss", "error")}
        final["gap_error"] = final["test/error"] - final["train/error"]
        final["gap_loss"] = final["test/loss"] - final["train/loss"]
        if key in trained:
            final["seconds"] = _runs.seconds(trained[key])
        numbers["runs"][key] = final
    numbers["lines"] = {key: _barriers(curves[key]) for key in ("lb_sb", "switch")}
    # Sharpness along the random lines: the loss rise at |t| = 1/2 and 1 over the centre (t = 0).
    numbers["away"] = {}
    for key in ("away_lb", "away_sb"):
        c = curves[key]
        centre = float(c["train_loss"][c["t"] == 0][0])
        rise = {f"rise_at_{r}": float(np.mean([c["train_loss"][np.argmin(abs(c["t"] - x))] for x in (-r, r)]) - centre) for r in (0.5, 1.0)}
        numbers["away"][key] = {"train_loss_at_0": centre, **rise}
    return numbers
