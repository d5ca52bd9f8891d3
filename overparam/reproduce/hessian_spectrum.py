"""Observation 3: the Hessian spectrum at the start and at the end of training (MNIST-FC).

Sagun et al. (2017, "Empirical analysis of the Hessian of over-parametrized neural networks") and
Papyan (2019, 2020): the spectrum is a bulk near zero plus a few outliers, about one per class,
and the outliers are larger after large-batch training. ``overparam fit`` runs of
``configs/experiments/hessian_spectrum.yaml`` with ``HessianSpectrum`` (top 21 eigenvalues by
Lanczos, the SLQ density, the GGN split) at fit start and fit end:

* ``digits_b<B>``: the ten digits (C = 10, cross-entropy), one run per batch size B;
* ``parity_b<B0>``: the same net and data with parity labels (two classes, one output and the
  logistic loss), at the smallest batch size, to see whether the count follows the classes.

All runs start from the same initialisation (seed 0) and train for the same number of epochs
with the same learning rate (plain SGD), so a larger batch also means fewer steps, as in
Keskar et al. (2017) and Sagun et al. (2017). Outliers are counted three ways (judged in
``docs/RESULTS.md``, section 3): the callback's rule (above 2x the k-th largest, k = 21
here), the same rule with k = 2C + 1 (the callback's default top_k), and the largest gap of the
log top-21 eigenvalues.

``small``: 2,048 digits, a 784-100-100-10 net (N = 89,610), 20 epochs, B in 32, 128, 512, the
Hessian on 512 training points; a few minutes on a laptop CPU. ``full``: the config's scale
(10,000 digits, 784-500-300-10, N = 545,810, 20 epochs, B in 32, 256, 2048, 2,048 points).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from overparam.curvature.outliers import count_outliers
from overparam.reproduce import _runs

TITLE = "Hessian spectrum at the start and end of training: bulk + outliers, count vs classes, vs batch size (MNIST-FC)"

SCALES: dict[str, dict[str, Any]] = {
    "small": dict(n_train=2048, analysis_size=512, width=[100, 100], epochs=20, batch_sizes=[32, 128, 512], top_k=21, at_epochs=[1, 5]),
    "full": dict(n_train=10000, analysis_size=2048, width=[500, 300], epochs=20, batch_sizes=[32, 256, 2048], top_k=21, at_epochs=[1, 5]),
}


def _overlay(s: dict[str, Any], runs: Path) -> Path:
    """The callback for these runs layered over the config: start, ``at_epochs`` and end, no subspace series."""
    overlay = {"trainer": {"callbacks": [{"class_path": "HessianSpectrum", "init_args": {
        "top_k": s["top_k"], "density": True, "ggn_split": True, "trace_probes": 5,
        "every_n_epochs": None, "at_epochs": s["at_epochs"],
        "subspace_every_n_steps": None, "subspace_refresh_every_n_steps": None}}]}}
    path = runs / "hessian_spectrum_overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def run_names(s: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """Run name -> (labels, batch size)."""
    names = {f"digits_b{b}": ("digits", b) for b in s["batch_sizes"]}
    names[f"parity_b{s['batch_sizes'][0]}"] = ("parity", s["batch_sizes"][0])
    return names


def train(s: dict[str, Any], runs: Path) -> dict[str, Path]:
    """One ``overparam fit`` per run name (reused when already done); shared with ``ggn_split``."""
    runs.mkdir(parents=True, exist_ok=True)
    config, overlay = _runs.config_path("experiments/hessian_spectrum.yaml"), str(_overlay(s, runs))
    common = [f"--model.init_args.width={s['width']}", f"--trainer.max_epochs={s['epochs']}",
              f"--data.init_args.n_train={s['n_train']}", f"--data.init_args.analysis_size={s['analysis_size']}"]
    return {name: _runs.fit(name, ["-c", config, "-c", overlay, *common, f"--data.init_args.labels={labels}",
                                   f"--data.init_args.batch_size={b}"], runs)
            for name, (labels, b) in run_names(s).items()}


def load(run: Path, tag: str) -> dict[str, np.ndarray]:
    """The callback's ``hessian/<tag>.npz`` of a run (member 0)."""
    with np.load(run / "hessian" / f"{tag}.npz") as f:
        return {k: (f[k][0] if f[k].ndim >= 1 and k not in ("epoch", "step", "N") else f[k]) for k in f.files}


def trajectory(run: Path) -> dict[str, list]:
    """lambda_1 at every analysis after the start (``epoch=E`` and ``end``) with the epoch's mean training loss."""
    loss = {int(r["epoch"]): r["train/loss"] for r in _runs.metrics(run) if "train/loss" in r and "epoch" in r}
    points = []
    for path in (run / "hessian").glob("*.npz"):
        if path.stem in ("start", "subspace"):
            continue
        a = load(run, path.stem)
        # "epoch=E" ran at the end of epoch E (0-based); "end" after the last one (current_epoch = max_epochs)
        done = int(a["epoch"]) + 1 if path.stem.startswith("epoch=") else int(a["epoch"])
        points.append((done, float(loss[done - 1]), float(a["eigenvalues"][0]), int(a["outliers"])))
    points = sorted(set(points))
    return {"epochs_done": [p[0] for p in points], "train_loss": [p[1] for p in points], "top1": [p[2] for p in points], "outliers": [p[3] for p in points]}


def gap_count(eigenvalues: np.ndarray) -> int:
    """Outliers by the largest gap of log(lambda) among the positive top eigenvalues (a cross-check)."""
    lam = np.sort(np.asarray(eigenvalues, dtype=float))[::-1]
    lam = lam[lam > 0]
    if len(lam) < 3:
        return 0
    return int(np.argmax(-np.diff(np.log(lam)))) + 1


def counts(eigenvalues: np.ndarray, classes: int) -> dict[str, int]:
    k = max(2 * classes + 1, 5)
    return {"rule_k21": count_outliers(eigenvalues), "rule_k2C+1": count_outliers(eigenvalues[:k]),
            "largest_log_gap": gap_count(eigenvalues)}


def _hist(ax, a: dict[str, np.ndarray], bins: np.ndarray, **kw) -> None:
    from overparam.curvature import histogram
    import torch

    edges, c = histogram(torch.as_tensor(a["density_nodes"])[None], torch.as_tensor(a["density_weights"])[None], int(a["N"]), bins=torch.as_tensor(bins))
    ax.stairs(np.maximum(c.numpy(), 1e-1), edges.numpy(), **kw)


def plot(s: dict[str, Any], trained: dict[str, Path], out: Path) -> list[str]:
    from overparam.plots import save_figure, subplots

    b0 = s["batch_sizes"][0]
    figures = []
    # 1. The talk's figure: log-count histogram of the spectrum, start vs end, top eigenvalues marked.
    fig, axes = subplots(1, 3, figsize=(15, 3.9))
    panels = (f"digits_b{b0}", f"digits_b{s['batch_sizes'][-1]}", f"parity_b{b0}")
    for ax, name, label in zip(axes, panels, ("digits, C = 10", "digits, C = 10", "parity, 2 classes (1 output)")):
        start, end = load(trained[name], "start"), load(trained[name], "end")
        hi = 1.05 * max(end["eigenvalues"].max(), start["eigenvalues"].max())
        lo = min(end["density_nodes"].min(), start["density_nodes"].min(), -0.05 * hi)
        bins = np.linspace(lo, hi, 120)
        _hist(ax, start, bins, color="C0", label="start (SLQ)")
        _hist(ax, end, bins, color="C3", label="end (SLQ)")
        for t, color in ((start, "C0"), (end, "C3")):
            n = int(t["outliers"])
            for v in t["eigenvalues"][:n]:
                ax.axvline(v, color=color, ls="--", lw=0.7)
        ax.set(yscale="log", ylim=(0.5, None), xlabel="eigenvalue", ylabel="count (of N eigenvalues)")
        ax.set_title(f"{label}, N = {int(end['N']):,}, B = {name.split('_b')[1]}\nrule's outliers: start {int(start['outliers'])}, end {int(end['outliers'])}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Hessian of the training loss, MNIST-FC (dashed: the callback's outliers, Lanczos top-21)", fontsize=9)
    figures.append("hessian_spectrum_start_end.png")
    save_figure(fig, out / figures[-1], dpi=100)

    # 2. Top eigenvalues vs batch size, and digits vs parity.
    fig, axes = subplots(1, 3, figsize=(15, 3.9))
    ax = axes[0]
    for i, b in enumerate(s["batch_sizes"]):
        end = load(trained[f"digits_b{b}"], "end")
        ax.semilogy(np.arange(1, len(end["eigenvalues"]) + 1), end["eigenvalues"], "o-", ms=3, color=f"C{i}", label=f"end, B = {b}")
    start = load(trained[f"digits_b{b0}"], "start")
    ax.semilogy(np.arange(1, len(start["eigenvalues"]) + 1), start["eigenvalues"], "k:", label="start (same init)")
    ax.axvline(10.5, color="gray", lw=0.7)
    ax.set(xlabel="index i", ylabel="lambda_i", title="digits (C = 10): top-21 eigenvalues at the end")
    ax.legend(fontsize=8)
    ax = axes[1]
    for name, color in ((f"digits_b{b0}", "C3"), (f"parity_b{b0}", "C2")):
        for tag, ls in (("start", ":"), ("end", "-")):
            e = load(trained[name], tag)["eigenvalues"]
            ax.semilogy(np.arange(1, len(e) + 1), e, ls, marker="o", ms=3, color=color, label=f"{name.split('_')[0]}, {tag}")
    ax.set(xlabel="index i", ylabel="lambda_i", title=f"digits vs parity, B = {b0}")
    ax.legend(fontsize=8)
    ax = axes[2]
    for i, b in enumerate(s["batch_sizes"]):
        t = trajectory(trained[f"digits_b{b}"])
        ax.loglog(t["train_loss"], t["top1"], "o-", ms=4, color=f"C{i}", label=f"B = {b}")
        for loss, top, done in zip(t["train_loss"], t["top1"], t["epochs_done"]):
            ax.annotate(str(done), (loss, top), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.invert_xaxis()
    ax.set(xlabel="training loss (mean over the epoch)", ylabel="lambda_1", title="digits: lambda_1 vs training loss\n(label: epochs done)")
    ax.legend(fontsize=8)
    figures.append("hessian_spectrum_batch_size.png")
    save_figure(fig, out / figures[-1], dpi=100)
    return figures


def run(scale: str, out: Path, runs: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the runs, count the outliers, plot; ``settings`` overrides the scale's (tests)."""
    out.mkdir(parents=True, exist_ok=True)
    s = {**SCALES[scale], **(settings or {})}
    trained = train(s, runs)
    figures = plot(s, trained, out)
    numbers: dict[str, Any] = {"settings": s, "figures": figures, "runs": {}}
    for name, (labels, b) in run_names(s).items():
        classes = 10 if labels == "digits" else 2
        entry: dict[str, Any] = {"labels": labels, "batch_size": b, "seconds": _runs.seconds(trained[name]),
                                 "train/error": _runs.last(trained[name], "train/error"),
                                 "test/error": _runs.last(trained[name], "test/error")}
        for tag in ("start", "end"):
            a = load(trained[name], tag)
            entry[tag] = {"top": [round(float(v), 4) for v in a["eigenvalues"]], "trace": float(a["trace"]),
                          "outliers": counts(a["eigenvalues"], classes), "N": int(a["N"])}
        entry["trajectory"] = trajectory(trained[name])
        numbers["runs"][name] = entry
    return numbers
