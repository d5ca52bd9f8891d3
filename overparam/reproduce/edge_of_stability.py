"""The edge of stability: full-batch GD sharpens to 2/lr and hovers there; Adam at 38/lr.

Cohen et al. (2021, "Gradient descent on neural networks typically occurs at the edge of
stability"): under full-batch gradient descent with step size eta the sharpness lambda_1 of the
training loss rises (progressive sharpening) until it reaches 2/eta, then hovers just above it
while the loss keeps decreasing over long times, non-monotonically. Cohen et al. (2022, "Adaptive
gradient methods at the edge of stability"): under full-batch Adam the preconditioned sharpness
lambda_1(P^-1 H) rises to (2 + 2 beta1) / ((1 - beta1) eta) = 38/eta (beta1 = 0.9) and hovers.

Runs: ``overparam fit -c configs/experiments/edge_of_stability.yaml`` (a tanh network with two
hidden layers of 200, the square loss, full batch, ``SharpnessTracker`` every 10 steps on the
whole training set), one per learning rate:

* ``gd_lr<eta>``: plain GD (``--model.init_args.lr eta``), for each eta in ``gd_lrs``;
* ``adam_lr<eta>``: Adam (``--optimizer torch.optim.Adam --optimizer.lr eta --optimizer.eps 1e-7``,
  betas (0.9, 0.999)), for each eta in ``adam_lrs``.

Numbers per run, from ``sharpness/sharpness.npz`` and ``metrics.csv`` (``summary``): lambda_1 at
step 0 against the threshold, the first measured step at which lambda_1 reaches the threshold,
lambda_1 / threshold after that step (mean, 5th and 95th percentiles, and over the last half of
the run), how often the training loss (mean over each 20-step epoch) rose before and after the
edge, the final loss, and the products (HVPs) per measurement.

``small``: 1,000 MNIST digits (N = 199,210), GD at eta = 0.05, 0.04, 0.03 (2/eta = 40, 50, 66.7)
for 2,000 steps and Adam at eta = 1e-3 (38/eta = 38,000) for 1,000; about 10 CPU minutes.
``full``: Cohen et al. 2021's data, a 5,000-image class-balanced subset of CIFAR-10 (N = 656,810),
GD at 2/eta = 40, 60, 80 for 5,000 steps and Adam at 1e-3 and 5e-4 (one GPU; not run here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from overparam import plots
from overparam.reproduce import _runs

TITLE = "Edge of stability: full-batch GD sharpens to 2/lr and hovers; Adam's preconditioned sharpness at 38/lr"

SCALES: dict[str, dict[str, Any]] = {
    "small": dict(data="MnistData", n_train=1000, gd_lrs=[0.05, 0.04, 0.03], gd_steps=2000,
                  adam_lrs=[1e-3], adam_steps=1000, every=10),
    "full": dict(data="CifarData", n_train=5000, gd_lrs=[2 / 40, 2 / 60, 2 / 80], gd_steps=5000,
                 adam_lrs=[1e-3, 5e-4], adam_steps=3000, every=10),
}


def run_name(optimizer: str, lr: float) -> str:
    return f"{optimizer}_lr{lr:g}"


def _args(s: dict[str, Any], optimizer: str, lr: float) -> list[str]:
    args = ["-c", _runs.config_path("experiments/edge_of_stability.yaml"),
            f"--data.init_args.n_train={s['n_train']}",
            f"--trainer.callbacks.init_args.every_n_steps={s['every']}"]
    if s["data"] != "MnistData":  # the same options, another image set (the task's in_dim follows it)
        args += [f"--data={s['data']}", f"--data.init_args.n_train={s['n_train']}", "--data.init_args.n_test=1000",
                 "--data.init_args.batch_size=full", "--data.init_args.passes_per_epoch=20"]
    if optimizer == "gd":
        return args + [f"--model.init_args.lr={lr}", f"--trainer.max_steps={s['gd_steps']}"]
    return args + ["--optimizer=torch.optim.Adam", f"--optimizer.lr={lr}", "--optimizer.eps=1e-7",
                   f"--trainer.max_steps={s['adam_steps']}"]


def train(s: dict[str, Any], runs: Path) -> dict[str, Path]:
    """One run per optimizer and lr, one at a time (each a full CPU's worth of products)."""
    jobs = [("gd", lr) for lr in s["gd_lrs"]] + [("adam", lr) for lr in s["adam_lrs"]]
    return {run_name(opt, lr): _runs.fit(run_name(opt, lr), _args(s, opt, lr), runs) for opt, lr in jobs}


def curves(run: Path, preconditioned: bool) -> dict[str, np.ndarray]:
    """The run's sharpness series (member 0) and its per-epoch training loss."""
    prefix = "preconditioned_" if preconditioned else ""
    with np.load(run / "sharpness" / "sharpness.npz") as f:
        keep = ~np.isnan(f[f"{prefix}eigenvalues"][:, 0])  # Adam: none before the first update
        out = {"step": f["step"][keep], "lambda_1": f[f"{prefix}eigenvalues"][keep, 0],
               "threshold": f[f"{prefix}threshold"][keep], "hvps": f[f"{prefix}hvps"][keep],
               "converged": f[f"{prefix}converged"][keep, 0], "warm": f["warm"][keep]}
    # train/loss is logged at each epoch end, the mean over the epoch's GD steps; metrics.csv's
    # ``step`` column counts blocks of steps there, so the step is (epoch + 1) x steps per epoch.
    passes = yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]["passes_per_epoch"]
    rows = [r for r in _runs.metrics(run) if "train/loss" in r]
    out["loss_step"] = np.array([(r["epoch"] + 1) * passes for r in rows])
    out["loss"] = np.array([r["train/loss"] for r in rows])
    return out


def summary(c: dict[str, np.ndarray]) -> dict[str, Any]:
    """What the claims are checked against (the module docstring's list)."""
    ratio = c["lambda_1"] / c["threshold"]
    reached = np.flatnonzero(ratio >= 1.0)
    edge: Optional[int] = int(c["step"][reached[0]]) if reached.size else None
    rises = np.diff(c["loss"]) > 0
    out: dict[str, Any] = {
        "threshold": float(c["threshold"][-1]),
        "lambda_1_first": float(c["lambda_1"][0]),
        "ratio_first": float(ratio[0]),
        "step_edge": edge,
        "loss_first_epoch": float(c["loss"][0]),
        "loss_final": float(c["loss"][-1]),
        "measurements": int(ratio.size),
        "unconverged": int((c["converged"] == 0).sum()),
        "hvps_first": int(c["hvps"][0]),
        "hvps_mean_warm": float(c["hvps"][c["warm"] == 1].mean()) if (c["warm"] == 1).any() else None,
    }
    if edge is None:
        return out
    after = ratio[c["step"] >= edge]
    last_half = ratio[c["step"] >= c["step"][-1] / 2]
    before_loss = c["loss_step"] <= edge
    out.update({
        "ratio_after_edge": {"mean": float(after.mean()), "p5": float(np.percentile(after, 5)),
                             "p95": float(np.percentile(after, 95)), "max": float(after.max())},
        "ratio_last_half": {"mean": float(last_half.mean()), "min": float(last_half.min()), "max": float(last_half.max())},
        # Sharpening: how far lambda_1 rose before the edge (None when it started there: a catapult).
        "lambda_1_max_before_edge_over_first": float(c["lambda_1"][c["step"] < edge].max() / c["lambda_1"][0]) if edge > c["step"][0] else None,
        "loss_rises_before_edge": f"{int(rises[before_loss[1:]].sum())} of {int(before_loss[1:].sum())} epochs",
        "loss_rises_after_edge": f"{int(rises[~before_loss[1:]].sum())} of {int((~before_loss[1:]).sum())} epochs",
        "loss_at_edge": float(c["loss"][np.searchsorted(c["loss_step"], edge)]) if edge <= c["loss_step"][-1] else None,
        "hvps_mean_after_edge": float(c["hvps"][c["step"] >= edge].mean()),
        "hvps_mean_before_edge": float(c["hvps"][(c["step"] < edge) & (c["warm"] == 1)].mean()) if ((c["step"] < edge) & (c["warm"] == 1)).any() else None,
    })
    return out


def run(scale: str, out: Path, runs: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, measure, plot; ``settings`` overrides the scale's (tests)."""
    s = {**SCALES[scale], **(settings or {})}
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    trained = train(s, runs)
    numbers: dict[str, Any] = {"settings": s, "P": int(_runs.hparams(next(iter(trained.values())))["P"]), "runs": {}}
    figures = []
    for optimizer, preconditioned in (("gd", False), ("adam", True)):
        lrs = s[f"{optimizer}_lrs"]
        if not lrs:
            continue
        series = {lr: curves(trained[run_name(optimizer, lr)], preconditioned) for lr in lrs}
        for lr, c in series.items():
            numbers["runs"][run_name(optimizer, lr)] = {**summary(c), "seconds": _runs.seconds(trained[run_name(optimizer, lr)])}
        name = f"edge_of_stability_{optimizer}.png"
        fig = plots.plot_edge_of_stability(series, preconditioned, f"{s['data']}, P = {numbers['P']:,}, full batch, tanh FC 200-200, MSE")
        plots.save_figure(fig, str(out / name))
        figures.append(name)
    numbers["figures"] = figures
    return numbers
