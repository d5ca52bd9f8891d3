"""Grokking: a transformer fits modular addition early and generalises much later, with weight decay.

Power et al. (2022, "Grokking: generalization beyond overfitting on small algorithmic
datasets"): on a fraction of the equations ``a o b = c (mod p)`` a small transformer reaches
100% training accuracy early, while the accuracy on the held-out equations stays near chance
for far longer, then rises to ~100%; weight decay shortens the delay most. Nanda et al. (2023,
"Progress measures for grokking via mechanistic interpretability") train a one-layer
transformer full-batch (AdamW, weight decay 1) on a + b mod 113 with 30% of the pairs, and
trace the jump to the slow decay of the weight norm from the memorising to a Fourier-feature
solution.

Here, for each seed s (``init_seed`` of the network and ``seed`` of the split both set to s) and
each weight decay (the config's 1.0, and 0), one ``overparam fit`` of ``configs/grokking.yaml``:
full-batch AdamW, the held-out accuracy (``val/error``) and the weight norm (``weights/norm``)
every ``passes`` steps, and ``HessianSpectrum``'s top eigenvalue of the training-loss Hessian
(not including the weight-decay term, which AdamW applies outside the loss) at fit start,
at log-spaced epochs and at fit end, on ``hessian_size`` training equations. The numbers: the
first step at which the held-out accuracy reaches 99% (and the training accuracy, a mean over
the epoch's steps), per run and over the seeds of each arm. Optionally (``fractions``) the same
with weight decay for other training fractions at the first seed: Power et al.'s Fig. 2 axis.

``small``: p = 59, 50% of the 3,481 equations (P = 1,740; Power et al.'s Fig. 1 share), d = 64
(N = 57,723), the papers' AdamW (lr 1e-3, betas 0.9, 0.98), 5,000 steps, 3 seeds: about 6
CPU minutes per run on one core. ``full``: Nanda et al.'s setting, p = 113, 30% (P = 3,830),
d = 128, 40,000 steps, 5 seeds, and the fractions 0.2, 0.4, 0.5, 0.6 at seed 0 (one GPU).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from overparam.plots import new_figure, save_figure
from overparam.reproduce import _runs

TITLE = "Grokking: a transformer on a + b mod p generalises long after fitting, with weight decay (steps to 99%)"

# passes: steps per epoch (the held-out accuracy's resolution); hessian_points: Hessian
# measurements (log-spaced in steps); parallel: runs trained at the same time (processes).
SCALES: dict[str, dict[str, Any]] = {
    "small": dict(p=59, fraction=0.5, d_model=64, d_mlp=256, lr=1e-3, weight_decays=[1.0, 0.0], seeds=[0, 1, 2],
                  max_steps=5000, passes=50, hessian_points=10, hessian_size=512, fractions=[], parallel=1),
    "full": dict(p=113, fraction=0.3, d_model=128, d_mlp=512, lr=1e-3, weight_decays=[1.0, 0.0], seeds=[0, 1, 2, 3, 4],
                 max_steps=40000, passes=100, hessian_points=10, hessian_size=2048, fractions=[0.2, 0.4, 0.5, 0.6],
                 parallel=1),
}
#: The accuracy that counts as reached (Power et al.'s "steps until validation accuracy > 99%").
THRESHOLD = 0.99


def run_name(weight_decay: float, fraction: float, seed: int) -> str:
    return f"wd{weight_decay:g}_frac{fraction:g}_s{seed}"


def hessian_epochs(s: dict[str, Any]) -> list[int]:
    """0-based epochs after which the Hessian is measured: log-spaced in steps, the last one excluded
    (the fit-end analysis measures it)."""
    epochs = s["max_steps"] // s["passes"]
    done = np.unique(np.round(np.geomspace(1, epochs, s["hessian_points"])).astype(int))
    return [int(e) - 1 for e in done if e < epochs]


def _overlay(s: dict[str, Any], runs: Path) -> Path:
    """HessianSpectrum for these runs layered over the config: lambda_1 only, no files but the .npz."""
    overlay = {"trainer": {"callbacks": [{"class_path": "HessianSpectrum", "init_args": {
        "top_k": 1, "density": False, "trace_probes": 0, "plot": False, "at_fit_start": True,
        "at_epochs": hessian_epochs(s), "analysis_size": s["hessian_size"]}}]}}
    path = runs / "grokking_overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def _args(s: dict[str, Any], weight_decay: float, fraction: float, seed: int, overlay: Path) -> list[str]:
    return [
        "-c", _runs.config_path("grokking.yaml"), "-c", str(overlay),
        f"--data.init_args.p={s['p']}", f"--data.init_args.train_fraction={fraction}", f"--data.init_args.seed={seed}",
        f"--data.init_args.passes_per_epoch={s['passes']}", f"--model.init_args.d_model={s['d_model']}",
        f"--model.init_args.d_mlp={s['d_mlp']}", f"--model.init_args.init_seed={seed}",
        f"--optimizer.init_args.lr={s['lr']}", f"--optimizer.init_args.weight_decay={weight_decay}",
        f"--trainer.max_steps={s['max_steps']}", f"--trainer.log_every_n_steps={s['passes']}",
    ]  # fmt: skip


def jobs(s: dict[str, Any]) -> dict[str, tuple[float, float, int]]:
    """Run name -> (weight decay, train fraction, seed): every seed of every arm, then the fractions."""
    names = {run_name(wd, s["fraction"], seed): (wd, s["fraction"], seed) for wd in s["weight_decays"] for seed in s["seeds"]}
    for fraction in s["fractions"]:
        names.setdefault(run_name(s["weight_decays"][0], fraction, s["seeds"][0]), (s["weight_decays"][0], fraction, s["seeds"][0]))
    return names


def train(s: dict[str, Any], runs: Path) -> dict[str, Path]:
    """All runs, ``parallel`` at a time (each its own process; finished ones are reused)."""
    runs.mkdir(parents=True, exist_ok=True)
    overlay = _overlay(s, runs)
    with ThreadPoolExecutor(max_workers=s["parallel"]) as pool:
        futures = {name: pool.submit(_runs.fit, name, _args(s, *job, overlay), runs) for name, job in jobs(s).items()}
        return {name: f.result() for name, f in futures.items()}


def curves(run: Path, passes: int) -> dict[str, np.ndarray]:
    """Per epoch: steps done, train and held-out accuracy, weight norm; the Hessian's (step, lambda_1).

    Lightning's own rows (``val/error``, ``train/error``, ``weights/norm``) carry the epoch e and
    a ``step`` that counts blocks of steps, so the optimizer steps done at their epoch's end are
    (e + 1) ``passes``; the analysis callbacks' rows carry the optimizer step itself.
    """
    rows = _runs.metrics(run)
    val = [r for r in rows if "val/error" in r]
    train_rows = {int(r["epoch"]): r for r in rows if "train/error" in r}
    norm = {int(r["epoch"]): r["weights/norm"] for r in rows if "weights/norm" in r}
    top1 = sorted({(int(r["step"]), r["hessian/top1"]) for r in rows if "hessian/top1" in r})
    return {
        "step": np.array([(int(r["epoch"]) + 1) * passes for r in val]),
        "test_accuracy": np.array([1.0 - r["val/error"] for r in val]),
        "train_accuracy": np.array([1.0 - train_rows[int(r["epoch"])]["train/error"] for r in val]),
        "weight_norm": np.array([norm[int(r["epoch"])] for r in val]),
        "hessian_step": np.array([t for t, _ in top1]),
        "hessian_top1": np.array([v for _, v in top1]),
    }


def first_step(steps: np.ndarray, values: np.ndarray, threshold: float = THRESHOLD) -> Optional[int]:
    """The first step whose value reaches ``threshold`` (None: never)."""
    reached = np.flatnonzero(values >= threshold)
    return int(steps[reached[0]]) if reached.size else None


def summary(run: Path, passes: int) -> dict[str, Any]:
    c = curves(run, passes)
    train99, test99 = first_step(c["step"], c["train_accuracy"]), first_step(c["step"], c["test_accuracy"])
    return {
        "steps_to_train_99": train99, "steps_to_test_99": test99,
        "delay_ratio": test99 / train99 if train99 and test99 else None,
        "final_train_accuracy": float(c["train_accuracy"][-1]), "final_test_accuracy": float(c["test_accuracy"][-1]),
        "weight_norm": {"first": float(c["weight_norm"][0]), "max": float(c["weight_norm"].max()), "final": float(c["weight_norm"][-1])},
        "hessian_top1": {str(t): float(v) for t, v in zip(c["hessian_step"], c["hessian_top1"])},
        "steps": int(c["step"][-1]), "seconds": _runs.seconds(run),
    }  # fmt: skip


def arm_numbers(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps to 99% held-out accuracy over the seeds of one arm (mean and SD over those that reached it)."""
    steps = [r["steps_to_test_99"] for r in runs]
    reached = [t for t in steps if t is not None]
    return {
        "steps_to_test_99": steps, "reached": f"{len(reached)}/{len(steps)}",
        "mean_steps_to_test_99": float(np.mean(reached)) if reached else None,
        "sd_steps_to_test_99": float(np.std(reached, ddof=1)) if len(reached) > 1 else math.nan,
        "steps_to_train_99": [r["steps_to_train_99"] for r in runs],
        "final_test_accuracy": [r["final_test_accuracy"] for r in runs],
    }  # fmt: skip


def plot(s: dict[str, Any], trained: dict[str, Path], out: Path) -> list[str]:
    """``grokking.png``: accuracies, weight norm and lambda_1 against steps (log), one line per seed."""
    fig = new_figure(15, 4)
    ax_acc, ax_norm, ax_hess = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    colors = {wd: f"C{3 * i}" for i, wd in enumerate(s["weight_decays"])}
    for wd in s["weight_decays"]:
        for i, seed in enumerate(s["seeds"]):
            c = curves(trained[run_name(wd, s["fraction"], seed)], s["passes"])
            arm = f"weight decay {wd:g}" if i == 0 else None  # one legend entry per arm
            ax_acc.plot(c["step"], c["train_accuracy"], color=colors[wd], ls="--", lw=1)
            ax_acc.plot(c["step"], c["test_accuracy"], color=colors[wd], lw=1.3, label=arm)
            ax_norm.plot(c["step"], c["weight_norm"], color=colors[wd], lw=1.2, label=arm)
            # [1:]: step 0 (the initial network) has no place on a log axis; it is in the JSON.
            ax_hess.plot(c["hessian_step"][1:], c["hessian_top1"][1:], color=colors[wd], marker="o", ms=3, lw=1, label=arm)
    ax_acc.axhline(THRESHOLD, color="0.6", lw=0.7, ls=":")
    ax_acc.set(xscale="log", xlabel="optimizer steps (full batch)", ylabel="accuracy", title="train (dashed; mean over each epoch) and held-out accuracy")
    ax_norm.set(xscale="log", xlabel="optimizer steps", ylabel=r"$\|\theta\|_2$", title="weight norm")
    ax_hess.set(xscale="log", yscale="log", xlabel="optimizer steps", ylabel=r"$\lambda_1$ of the loss Hessian",
                title=f"Hessian top eigenvalue ({s['hessian_size']} training equations)")  # fmt: skip
    for ax in (ax_acc, ax_norm, ax_hess):
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.suptitle(f"a + b mod {s['p']}, {s['fraction']:.0%} of the equations for training, one-layer transformer d = {s['d_model']}, "
                 f"full-batch AdamW lr {s['lr']:g}, {len(s['seeds'])} seeds", fontsize=9)  # fmt: skip
    names = ["grokking.png"]
    save_figure(fig, str(out / names[0]), dpi=110)
    if s["fractions"]:
        names.append(plot_fractions(s, trained, out))
    return names


def plot_fractions(s: dict[str, Any], trained: dict[str, Path], out: Path) -> str:
    """``grokking_fraction.png``: steps to 99% (held-out and train) against the training fraction."""
    wd, seed = s["weight_decays"][0], s["seeds"][0]
    fractions = sorted(set(s["fractions"]) | {s["fraction"]})
    rows = [summary(trained[run_name(wd, f, seed)], s["passes"]) for f in fractions]
    fig = new_figure(5, 3.6)
    ax = fig.add_subplot()
    for key, label, style in (("steps_to_test_99", "held out", "o-"), ("steps_to_train_99", "train", "s--")):
        points = [(f, r[key]) for f, r in zip(fractions, rows) if r[key] is not None]
        ax.plot([f for f, _ in points], [t for _, t in points], style, label=f"{label} accuracy 99%")
    ax.set(yscale="log", xlabel="training fraction", ylabel="optimizer steps", title=f"steps to 99%, weight decay {wd:g}, seed {seed}")
    ax.legend(fontsize=8)
    save_figure(fig, str(out / "grokking_fraction.png"), dpi=110)
    return "grokking_fraction.png"


def run(scale: str, out: Path, runs: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train every seed with and without weight decay, read the steps to 99%, plot; ``settings``
    overrides the scale's (tests)."""
    s = {**SCALES[scale], **(settings or {})}
    out.mkdir(parents=True, exist_ok=True)
    trained = train(s, runs)
    first = next(iter(trained.values()))
    numbers: dict[str, Any] = {"settings": s, "N": int(_runs.hparams(first)["N"]), "P": int(_runs.hparams(first)["P"]),
                               "runs": {name: summary(run_, s["passes"]) for name, run_ in trained.items()}}  # fmt: skip
    numbers["arms"] = {
        f"weight_decay={wd:g}": arm_numbers([numbers["runs"][run_name(wd, s["fraction"], seed)] for seed in s["seeds"]])
        for wd in s["weight_decays"]
    }
    numbers["figures"] = plot(s, trained, out)
    return numbers
