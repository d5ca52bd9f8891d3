"""Observation 9: 2D loss surfaces of a small- and a large-batch solution, and the trajectory's PCA plane.

Li et al. 2018 ("Visualizing the loss landscape of neural nets"): around a trained net, the
loss on the plane of two filter-normalised random directions (their Sec. 4-5) shows how wide
its basin is, comparably across nets; the training trajectory lies near the plane of its first
two principal directions (Sec. 7), which then show the path SGD took. Keskar et al. 2017 ("On
large-batch training ...") report large-batch (LB) solutions sharper than small-batch (SB) ones.

Two ``overparam fit`` runs of ``configs/experiments/lb_vs_sb.yaml`` (MNIST-FC 784-500-100-10,
plain SGD, lr 0.1) from the same initial weights, LB and SB, each keeping its trajectory
(``TrajectorySnapshots``, every epoch); then ``overparam landscape`` on each run's training
points:

* ``filter``: the 21 x 21 surface on [-1, 1]^2 (both runs draw the same Gaussian directions,
  seed 0, each filter-normalised to its own solution);
* ``pca``: the plane of its own trajectory, with the explained variance;
* ``hessian``: a 3 x 3 grid of step ``hessian_h`` on the top-2 Hessian eigenvectors.

Numbers: the curvature of the filter surface at its centre (central differences, h = 0.1)
against the exact ``d^T H d`` (one Hessian-vector product) and against ``lambda_1 |d|^2``, the
most any direction of that length can bend; along the unit eigenvectors, the surface's curvature
against lambda_1 and lambda_2 (equal for a smooth loss; ReLU kinks crossed within h add to the
former); the loss rise at radius 1/2 and 1; the PCA planes' explained variance.

``small``: 2,000 training digits (and 2,000 test digits), LB 256, SB 64, 30 epochs (the
``lb_vs_sb`` small scale). ``full``: all 60,000 digits, LB 4,096, SB 64, 60 epochs, surfaces on
10,000 training digits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from overparam.commands import landscape
from overparam.commands.interpolate import evaluation_data, member_view
from overparam.runs import load_run
from overparam.curvature import HessianOperator
from overparam.plots import plot_plane_contours, plot_plane_surfaces, save_figure
from overparam.reproduce import _runs

TITLE = "2D loss surfaces: small- vs large-batch solution (filter-normalised), trajectory PCA plane, curvature vs Hessian (MNIST-FC)"

# n_train/n_test None: all of MNIST. size: training points the surfaces are evaluated on (None: all).
SCALES: dict[str, dict[str, Any]] = {
    "small": dict(n_train=2000, n_test=2000, width=[500, 100], lb=256, sb=64, epochs=30, grid=21, hessian_h=0.01, size=None),
    "full": dict(n_train=None, n_test=None, width=[500, 100], lb=4096, sb=64, epochs=60, grid=21, hessian_h=0.01, size=10000),
}
RUNS = ("lb", "sb")


def train(s: dict[str, Any], runs: Path) -> dict[str, Path]:
    """The LB and SB runs, each keeping a snapshot of its parameters at every epoch end."""
    args = ["-c", _runs.config_path("experiments/lb_vs_sb.yaml"), f"--model.init_args.width={s['width']}",
            f"--trainer.max_epochs={s['epochs']}", "--trainer.callbacks+=TrajectorySnapshots"]
    args += [f"--data.init_args.{k}={s[k]}" for k in ("n_train", "n_test") if s[k] is not None]
    return {key: _runs.fit(key, [*args, f"--data.init_args.batch_size={s[key]}"], runs) for key in RUNS}


def surface(s: dict[str, Any], run: Path, plane: str, out: Path) -> dict[str, np.ndarray]:
    """``overparam landscape`` of ``run`` on ``plane`` (written under ``out/surfaces``); its ``surface.npz``."""
    folder = out / "surfaces" / f"{run.name}_{plane}"
    if not (folder / "surface.npz").exists():
        argv = ["--run", str(run), "--plane", plane, "--splits", "train", "--out", str(folder)]
        if plane == "hessian":
            argv += ["--grid", "3", "--range", str(-s["hessian_h"]), str(s["hessian_h"])]
        else:
            argv += ["--grid", str(s["grid"])]
        if s["size"] is not None:
            argv += ["--size", str(s["size"])]
        _runs.progress_line(f"{run.name}: {plane} surface")
        landscape.main(argv)  # on the GPU when there is one
    with np.load(folder / "surface.npz") as f:
        return {k: f[k] for k in f.files}


def rayleigh_quotients(s: dict[str, Any], run: Path, directions: np.ndarray) -> list[float]:
    """``d^T H d`` for each row of ``directions`` (the Hessian of the mean training loss at the run)."""
    loaded = load_run(str(run), "--run", "cuda" if torch.cuda.is_available() else "cpu")
    view = member_view(loaded, 0, "--member")
    batches = evaluation_data(loaded, ["train"], s["size"], None, next(iter(view.params.values())).device)["train"]
    H = HessianOperator(view.single_fn, view.params, loaded.task.loss_fn, batches, buffers=view.buffers)
    out = []
    for d in directions:
        v = torch.as_tensor(d).to(H.device, H.dtype)
        out.append(float(torch.dot(v, H.matvec(v))))
    return out


def _rise(f: dict[str, np.ndarray], r: float) -> float:
    """Mean train loss at the four axis points at distance ``r`` from the centre, minus the centre's."""
    a, b, L = f["a"], f["b"], f["train_loss"]
    i0, j0 = int(np.flatnonzero(a == 0)[0]), int(np.flatnonzero(b == 0)[0])
    ring = [L[np.argmin(abs(a - x)), j0] for x in (-r, r)] + [L[i0, np.argmin(abs(b - y))] for y in (-r, r)]
    return float(np.mean(ring) - L[i0, j0])


def numbers_of(s: dict[str, Any], run: Path, filter_: dict, hessian: dict, pca: dict) -> dict[str, Any]:
    """One run's numbers: centre, filter-plane curvature vs the Hessian, eigen-directions, PCA."""
    i0, j0 = int(np.flatnonzero(filter_["a"] == 0)[0]), int(np.flatnonzero(filter_["b"] == 0)[0])
    lam = [float(v) for v in hessian["eigenvalues"]]
    dHd = rayleigh_quotients(s, run, filter_["directions"])
    norms2 = [float(np.sum(np.asarray(d, dtype=np.float64) ** 2)) for d in filter_["directions"]]
    # |theta_0 - theta_n| by Pythagoras: its in-plane coordinates and its distance off the (orthonormal) plane.
    travelled = float(np.hypot(np.linalg.norm(pca["trajectory"][0]), pca["trajectory_off_plane"][0]))
    return {
        "train/loss": float(filter_["train_loss"][i0, j0]),
        "train/error": float(filter_["train_error"][i0, j0]),
        "test/loss": _runs.last(run, "test/loss"),
        "test/error": _runs.last(run, "test/error"),
        "lambda_1": lam[0],
        "lambda_2": lam[1],
        "hessian_converged": bool(np.all(hessian["converged"])),
        "eigvec_curvature_1": float(hessian["curvature:L_aa"]),
        "eigvec_curvature_2": float(hessian["curvature:L_bb"]),
        "filter_curvature_1": float(filter_["curvature:L_aa"]),
        "filter_curvature_2": float(filter_["curvature:L_bb"]),
        "filter_dHd_1": dHd[0],
        "filter_dHd_2": dHd[1],
        "filter_norm2_1": norms2[0],
        "filter_dHd_over_lambda1_norm2": dHd[0] / (lam[0] * norms2[0]),
        "filter_rise_r0.5": _rise(filter_, 0.5),
        "filter_rise_r1": _rise(filter_, 1.0),
        "pca_explained_variance": [float(v) for v in pca["explained_variance_ratio"]],
        "pca_off_plane_max_relative": float(pca["trajectory_off_plane"].max() / travelled),
    }


def plot(s: dict[str, Any], filters: dict[str, dict], pcas: dict[str, dict], out: Path) -> list[str]:
    """The two filter surfaces side by side on one colour scale (contours) and one z scale (3D);
    each run's trajectory on its own PCA plane."""
    a, b = filters["lb"]["a"], filters["lb"]["b"]
    labels = {"lb": f"LB ({s['lb']})", "sb": f"SB ({s['sb']})"}
    panels = {f"{labels[k]} train loss": filters[k]["train_loss"] for k in RUNS}
    title = "MNIST-FC: filter-normalised random plane around each solution (same seed; Li et al. 2018)"
    names = ["loss_surfaces_filter.png", "loss_surfaces_3d.png"]
    save_figure(plot_plane_contours(a, b, panels, title), str(out / names[0]))
    save_figure(plot_plane_surfaces(a, b, panels, title), str(out / names[1]))
    for k in RUNS:
        f, ratio = pcas[k], pcas[k]["explained_variance_ratio"]
        names.append(f"loss_surfaces_pca_{k}.png")
        figure = plot_plane_contours(f["a"], f["b"], {f"{labels[k]} train loss": f["train_loss"]}, "trajectory on its PCA plane (Li et al. 2018, Sec. 7)",
                                     trajectory=f["trajectory"], marks={"final": (0.0, 0.0)},
                                     axis_labels=(f"PC 1 ({ratio[0]:.1%} of the variance)", f"PC 2 ({ratio[1]:.1%})"))
        save_figure(figure, str(out / names[-1]))
    return names


def run(scale: str, out: Path, runs: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train LB and SB, draw their surfaces, compare curvatures; ``settings`` overrides the scale's (tests)."""
    s = {**SCALES[scale], **(settings or {})}
    trained = train(s, runs)
    surfaces = {key: {plane: surface(s, trained[key], plane, out) for plane in ("filter", "hessian", "pca")} for key in RUNS}
    numbers: dict[str, Any] = {"settings": s, "figures": plot(s, {k: surfaces[k]["filter"] for k in RUNS}, {k: surfaces[k]["pca"] for k in RUNS}, out)}
    numbers["runs"] = {}
    for key in RUNS:
        found = surfaces[key]
        numbers["runs"][key] = {**numbers_of(s, trained[key], found["filter"], found["hessian"], found["pca"]), "seconds": _runs.seconds(trained[key])}
    lb, sb = numbers["runs"]["lb"], numbers["runs"]["sb"]
    numbers["lb_over_sb"] = {
        "filter_rise_r0.5": lb["filter_rise_r0.5"] / sb["filter_rise_r0.5"] if sb["filter_rise_r0.5"] else None,
        "filter_curvature_1": lb["filter_curvature_1"] / sb["filter_curvature_1"] if sb["filter_curvature_1"] else None,
        "lambda_1": lb["lambda_1"] / sb["lambda_1"] if sb["lambda_1"] else None,
    }
    return numbers
