"""Observation 5: SGD noise on MNIST-FC: tail index alpha during training; the critical batch.

Two parts, both ``overparam fit`` runs of ``configs/experiments/gradient_noise.yaml`` (784-500-
100-10, N = 443,610, cross-entropy, plain SGD, lr 0.1):

* ``noise``: batch 128 with ``GradientNoise``: the gradient noise scale ``B_simple =
  tr(Sigma) / |G|^2`` (McCandlish et al. 2018, "An empirical model of large-batch training",
  App. A.1) from per-sample gradients every few steps, and the tail index alpha of
  ``g_minibatch - g_full`` (Simsekli, Sagun, Gurbuzbalaban 2019, "A tail-index analysis of
  stochastic gradient noise in deep neural networks", Sec. 4), pooled and per parameter tensor,
  at the start and every few epochs.
* ``batch_<B>``: the same net, data and learning rate at several batch sizes B, each run until
  the training loss (exact, on a fixed subset of the training set, ``TargetLoss`` below) reaches
  the lowest target. Steps to reach each target loss give the measured speed-up of larger
  batches; McCandlish et al. (Eq. 2.11) predict ``S = S_min (1 + B_noise / B)``, so a
  least-squares line ``S = a + b / B`` gives ``S_min = a`` and ``B_noise = b / a``, to compare
  with ``B_simple`` measured in the ``noise`` run at the same training loss (their Fig. 4 and
  Sec. 2.2: B_simple ~ B_crit, up to the Hessian's conditioning, which B_simple ignores).

Each batch size runs at every learning rate of ``lrs``: "fixed lr" reads the steps at the
config's lr (0.1, the protocol of ``configs/sweeps/critical_batch_size.yaml``), "best lr" the
fewest steps over ``lrs`` (McCandlish et al.'s S(B) assumes the best lr at each B). A run that
diverges never reaches a target.

``small``: P = 4,096 training digits (the analysis subset is the whole training set), 10 epochs
of the noise run, batch sizes 16, 64, 256, 1024, lr 0.1, 0.3, 1.0. ``full``: all 60,000 digits,
20 epochs (the config), an analysis subset of 4,096, batch sizes 16 ... 2048 as in
``configs/sweeps/critical_batch_size.yaml``, lr 0.03 ... 1.0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import yaml

from overparam.callbacks.base import AnalysisCallback
from overparam.errors import ConfigError, check_positive
from overparam.reproduce import _runs

TITLE = "SGD noise on MNIST-FC: tail index alpha (pooled, per layer), B_simple, steps to a target loss vs batch size"

SCALES: dict[str, dict[str, Any]] = {
    "small": dict(n_train=4096, n_test=2000, analysis_size=4096, width=[500, 100], batch=128, epochs=10,
                  alpha_every=2, noise_every_n_steps=4, batch_sizes=[16, 64, 256, 1024], targets=[0.6, 0.4, 0.3],
                  target_size=1024, max_steps=1000, lr=0.1, lrs=[0.1, 0.3, 1.0]),
    "full": dict(n_train=None, n_test=None, analysis_size=4096, width=[500, 100], batch=128, epochs=20,
                 alpha_every=2, noise_every_n_steps=10, batch_sizes=[16, 32, 64, 128, 256, 512, 1024, 2048],
                 targets=[0.3, 0.15, 0.1], target_size=4096, max_steps=100_000, lr=0.1, lrs=[0.03, 0.1, 0.3, 1.0]),
}


class TargetLoss(AnalysisCallback):
    """Exact training loss on a fixed subset after every ``every_n_steps`` optimizer steps;
    stops training once it is at or below ``min(targets)`` (unless ``stop`` is false).

    The loss is evaluated (no grad) on the DataModule's first ``size`` analysis points
    (``analysis_batches(size=...)``, the same points at every step), so the steps at which
    runs of different batch sizes reach a target compare like for like (the logged
    ``train/loss`` is a running mean over an epoch, which at small batches spans many steps).
    Saves ``<log_dir>/target_loss/curve.npz`` (``step``, ``loss``: ``step`` optimizer steps done).

    Args:
        targets: training losses whose first crossing matters; training stops at the lowest.
        size: points of the fixed subset (capped at the analysis subset).
        every_n_steps: evaluate every n-th step (1: the exact step of each crossing).
        stop: stop training at the lowest target (false: only record the curve).

    Example::

        Trainer(callbacks=[TargetLoss(targets=[0.5, 0.3], size=1024)])
    """

    default_name = "target_loss"

    def __init__(self, targets: Sequence[float], size: int = 1024, every_n_steps: int = 1, stop: bool = True) -> None:
        if not targets or any(not (t > 0) for t in targets):
            raise ConfigError(f"TargetLoss.targets must be a non-empty list of positive losses, got {list(targets)!r}")
        check_positive("TargetLoss.size", size)
        check_positive("TargetLoss.every_n_steps", every_n_steps)
        super().__init__(at_fit_end=True, every_n_steps=every_n_steps)
        self.targets, self.size, self.stop = sorted(targets, reverse=True), size, stop
        self.steps_done: list[int] = []
        self.losses: list[float] = []

    @torch.no_grad()
    def analyse_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, record: Any) -> None:
        """The loss of theta_step (member 0) on the fixed subset; stop at the lowest target."""
        total, count = 0.0, 0
        for x, y in trainer.datamodule.analysis_batches(size=self.size, shard_across_ranks=False):
            out = pl_module.member_outputs(x)  # (K, B, C)
            total += float(pl_module.loss_fn(out, y, reduction="none")[0].sum())  # member 0
            count += x.shape[0]
        self.steps_done.append(step)
        self.losses.append(total / count)
        if self.stop and self.losses[-1] <= self.targets[-1]:
            trainer.should_stop = True

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        """At fit end: save the curve (rank 0)."""
        self.save_npz(trainer, "curve.npz", step=np.array(self.steps_done), loss=np.array(self.losses))


def steps_to(curve: dict[str, np.ndarray], target: float) -> Optional[int]:
    """First step at which the loss is at or below ``target`` (None: never)."""
    hit = np.flatnonzero(curve["loss"] <= target)
    return int(curve["step"][hit[0]]) if hit.size else None


def fit_steps(batch_sizes: Sequence[int], steps: Sequence[float]) -> tuple[float, float]:
    """Least squares ``S = S_min + S_min B_noise / B`` (a line in 1/B): ``(S_min, B_noise)``.

    >>> S_min, B_noise = fit_steps([10, 20, 40, 80], [100 * (1 + 30 / b) for b in (10, 20, 40, 80)])
    >>> round(S_min, 6), round(B_noise, 6)
    (100.0, 30.0)
    """
    slope, intercept = np.polyfit(1.0 / np.asarray(batch_sizes, float), np.asarray(steps, float), 1)
    return float(intercept), float(slope / intercept) if intercept > 0 else math.nan


# --- runs ----------------------------------------------------------------------------------------
def _common(s: dict[str, Any]) -> list[str]:
    args = [f"--model.init_args.width={s['width']}", f"--data.init_args.analysis_size={s['analysis_size']}"]
    return args + [f"--data.init_args.{k}={s[k]}" for k in ("n_train", "n_test") if s[k] is not None]


def _overlay(s: dict[str, Any], runs: Path, noise: bool) -> Path:
    """Callbacks layered over gradient_noise.yaml (a list replaces the config's list).

    Every init arg is explicit: jsonargparse carries the config's arguments of the item at the
    same position over to a new class that accepts them (GradientNoise's ``every_n_steps: 10``
    would become TargetLoss's).
    """
    target = {"class_path": f"{__name__}.TargetLoss",
              "init_args": {"targets": s["targets"], "size": s["target_size"], "every_n_steps": 1, "stop": not noise}}
    callbacks = [target]
    if noise:
        callbacks.insert(0, {"class_path": "GradientNoise", "init_args": {
            "every_n_steps": s["noise_every_n_steps"], "every_n_epochs": s["alpha_every"], "at_fit_start": True,
            "num_minibatches": 32}})
    path = runs / ("noise_overlay.yaml" if noise else "batch_overlay.yaml")
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def train(s: dict[str, Any], runs: Path) -> dict[str, Path]:
    runs.mkdir(parents=True, exist_ok=True)
    config = _runs.config_path("experiments/gradient_noise.yaml")
    trained = {"noise": _runs.fit("noise", ["-c", config, "-c", str(_overlay(s, runs, True)), *_common(s),
                                            f"--data.init_args.batch_size={s['batch']}", f"--trainer.max_epochs={s['epochs']}"], runs)}
    batch_overlay = _overlay(s, runs, False)
    for B in s["batch_sizes"]:
        for lr in s["lrs"]:
            name = run_name(B, lr, s["lr"])
            try:
                trained[name] = _runs.fit(name, ["-c", config, "-c", str(batch_overlay), *_common(s), f"--model.init_args.lr={lr}",
                                                 f"--data.init_args.batch_size={B}", f"--trainer.max_steps={s['max_steps']}",
                                                 "--trainer.max_epochs=-1"], runs)
            except RuntimeError as error:  # a learning rate too large for this batch diverges: it never reaches a target
                if "diverged" not in str(error):
                    raise
    return trained


def run_name(B: int, lr: float, config_lr: float) -> str:
    """``batch_<B>`` at the config's learning rate, ``batch_<B>_lr<lr>`` otherwise."""
    return f"batch_{B}" if lr == config_lr else f"batch_{B}_lr{lr:g}"


def _curve(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "target_loss" / "curve.npz") as f:
        return {"step": f["step"], "loss": f["loss"]}


def _rows(run: Path, key: str) -> dict[int, dict[str, float]]:
    """Rows logged with ``key``, by step (the last row of a step wins: fit end repeats the last epoch)."""
    return {int(r["step"]): r for r in _runs.metrics(run) if key in r}


def noise_history(run: Path, steps_per_epoch: int) -> dict[str, Any]:
    alpha_rows = _rows(run, "noise/alpha")
    layers = sorted({k[len("noise/alpha/"):] for r in alpha_rows.values() for k in r if k.startswith("noise/alpha/")})
    scale_rows = _rows(run, "noise/B_simple")
    steps = sorted(alpha_rows)
    return {
        "alpha_epochs": [s_ / steps_per_epoch for s_ in steps],
        "alpha": [alpha_rows[s_]["noise/alpha"] for s_ in steps],
        "alpha_layers": {name: [alpha_rows[s_].get(f"noise/alpha/{name}", math.nan) for s_ in steps] for name in layers},
        "B_epochs": [s_ / steps_per_epoch for s_ in sorted(scale_rows)],
        "B_simple": [scale_rows[s_]["noise/B_simple"] for s_ in sorted(scale_rows)],
        "G2": [scale_rows[s_]["noise/G2"] for s_ in sorted(scale_rows)],
        "trace_sigma": [scale_rows[s_]["noise/trace_sigma"] for s_ in sorted(scale_rows)],
    }


def B_simple_at(history: dict[str, Any], curve: dict[str, np.ndarray], target: float, steps_per_epoch: int) -> float:
    """B_simple of the epoch (of the batch-128 noise run) in which its loss first reaches ``target``."""
    step = steps_to(curve, target)
    if step is None:
        return math.nan
    epoch_end = math.ceil(max(step, 1) / steps_per_epoch)  # epochs done at the end of that epoch
    for e, B in zip(history["B_epochs"], history["B_simple"]):
        if e >= epoch_end - 1e-9:
            return float(B)
    return math.nan


# --- figures -------------------------------------------------------------------------------------
def plot(s: dict[str, Any], numbers: dict[str, Any], curves: dict[str, dict[str, np.ndarray]], out: Path) -> list[str]:
    from overparam.plots import save_figure, subplots

    h = numbers["noise"]
    names = []
    fig, axes = subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    for i, (name, values) in enumerate(h["alpha_layers"].items()):
        ax.plot(h["alpha_epochs"], values, "o-", ms=3, lw=1, color=f"C{i}", label=name)
    ax.plot(h["alpha_epochs"], h["alpha"], "ks-", ms=4, lw=2, label="all parameters (pooled)")
    ax.axhline(2, color="0.6", ls=":", lw=1)
    ax.set(xlabel="epoch", ylabel="tail index alpha", title=f"alpha of g_minibatch - g_full (batch {s['batch']}; 2 = Gaussian)")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(h["B_epochs"], h["B_simple"], "o-", color="C0", label="B_simple = tr(Sigma) / |G|^2")
    ax.set(xlabel="epoch", ylabel="B_simple", yscale="log", title="gradient noise scale (running mean ratio over each epoch)")
    ax.title.set_fontsize(8)
    twin = ax.twinx()
    noise_curve = curves["noise"]
    twin.plot(noise_curve["step"] / numbers["steps_per_epoch"], noise_curve["loss"], color="C1", lw=1)
    twin.set_ylabel("training loss (fixed subset)", color="C1")
    twin.set_yscale("log")
    ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"MNIST-FC (N = 443,610), P = {numbers['P']:,}, SGD batch {s['batch']}, lr 0.1", fontsize=9)
    names.append("sgd_noise_alpha_bsimple.png")
    save_figure(fig, out / names[-1], dpi=110)

    fig, axes = subplots(1, 3, figsize=(15, 4))
    Bs = np.array(s["batch_sizes"], float)
    grid = np.geomspace(Bs.min() / 1.5, Bs.max() * 1.5, 100)
    for ax, protocol, title in ((axes[0], "fixed_lr", f"fixed lr {s['lr']:g}"),
                                (axes[1], "best_lr", f"best lr of {', '.join(f'{lr:g}' for lr in s['lrs'])} per B")):
        for i, target in enumerate(s["targets"]):
            c = numbers["critical_batch"][str(target)]
            fit = c[protocol]
            ok = [j for j, st in enumerate(fit["steps"]) if st is not None]
            ax.plot(Bs[ok], [fit["steps"][j] for j in ok], "o", color=f"C{i}", label=f"loss {target}: measured")
            if math.isfinite(fit["B_noise_fit"]):
                ax.plot(grid, fit["S_min"] * (1 + fit["B_noise_fit"] / grid), color=f"C{i}", lw=1,
                        label=f"S_min (1 + B_noise/B), B_noise = {fit['B_noise_fit']:.0f}")
            if math.isfinite(c["B_simple"]):
                ax.axvline(c["B_simple"], color=f"C{i}", ls="--", lw=1, label=f"B_simple at loss {target}: {c['B_simple']:.0f}")
        ax.set(xlabel="batch size B", ylabel="steps to reach the target loss", xscale="log", yscale="log",
               title=f"steps to target vs batch size, {title}")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    ax = axes[2]
    for i, B in enumerate(s["batch_sizes"]):
        c = curves.get(run_name(B, s["lr"], s["lr"]))
        if c is not None:
            ax.plot(np.maximum(c["step"], 1), c["loss"], color=f"C{i}", lw=1, label=f"B = {B}")
    for target in s["targets"]:
        ax.axhline(target, color="0.6", ls=":", lw=1)
    ax.set(xlabel="optimizer steps", ylabel=f"training loss (fixed subset of {s['target_size']:,})",
           xscale="log", yscale="log", title=f"loss curves at lr {s['lr']:g} (dotted: targets)")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    fig.suptitle(f"Critical batch size, MNIST-FC, P = {numbers['P']:,} (McCandlish et al. 2018: S = S_min (1 + B_noise / B))", fontsize=9)
    names.append("sgd_noise_critical_batch.png")
    save_figure(fig, out / names[-1], dpi=100)
    return names


def speed_up(s: dict[str, Any], curves: dict[str, dict[str, np.ndarray]], target: float, lrs: Sequence[float]) -> dict[str, Any]:
    """Steps to ``target`` per batch size (the best of ``lrs``) and the fit of S(B)."""
    steps, best = [], []
    for B in s["batch_sizes"]:
        found = [(steps_to(curves[name], target), lr) for lr in lrs if (name := run_name(B, lr, s["lr"])) in curves]
        found = [(st, lr) for st, lr in found if st is not None]
        st, lr = min(found) if found else (None, None)
        steps.append(st)
        best.append(lr)
    ok = [(B, st) for B, st in zip(s["batch_sizes"], steps) if st is not None]
    S_min, B_noise = fit_steps(*zip(*ok)) if len(ok) >= 2 else (math.nan, math.nan)
    return {"steps": steps, "lr": best, "examples": [None if st is None else st * B for B, st in zip(s["batch_sizes"], steps)],
            "S_min": S_min, "B_noise_fit": B_noise}


def run(scale: str, out: Path, runs: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the noise run and the batch-size runs, fit S(B), plot; ``settings`` overrides (tests)."""
    s = {**SCALES[scale], **(settings or {})}
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    trained = train(s, runs)
    P = int(_runs.hparams(trained["noise"])["P"])
    steps_per_epoch = math.ceil(P / s["batch"])
    curves = {name: _curve(run_) for name, run_ in trained.items()}
    history = noise_history(trained["noise"], steps_per_epoch)
    numbers: dict[str, Any] = {"settings": s, "P": P, "steps_per_epoch": steps_per_epoch, "noise": history,
                               "noise_run": {"train/loss": _runs.last(trained["noise"], "train/loss"),
                                             "train/error": _runs.last(trained["noise"], "train/error"),
                                             "test/error": _runs.last(trained["noise"], "test/error"),
                                             "seconds": _runs.seconds(trained["noise"])},
                               "critical_batch": {}}
    for target in s["targets"]:
        numbers["critical_batch"][str(target)] = {
            "batch_sizes": s["batch_sizes"], "fixed_lr": speed_up(s, curves, target, [s["lr"]]),
            "best_lr": speed_up(s, curves, target, s["lrs"]),
            "B_simple": B_simple_at(history, curves["noise"], target, steps_per_epoch),
            "noise_run_steps": steps_to(curves["noise"], target)}
    numbers["batch_runs"] = {name: {"seconds": _runs.seconds(trained[name]), "steps": int(curves[name]["step"][-1]),
                                    "final_loss": float(curves[name]["loss"][-1])} for name in trained if name != "noise"}
    numbers["diverged"] = [run_name(B, lr, s["lr"]) for B in s["batch_sizes"] for lr in s["lrs"] if run_name(B, lr, s["lr"]) not in trained]
    numbers["figures"] = plot(s, numbers, curves, out)
    return numbers
