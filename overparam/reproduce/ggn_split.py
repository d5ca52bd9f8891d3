"""Observation 4: the Gauss-Newton vs residual split of the Hessian at the end of training.

Papyan (2019, "Measurements of three-level hierarchical structure in the outliers in the spectrum
of deepnet Hessians"): H = G + R with G = sum_i J_i^T (d^2 l / df^2) J_i (positive semi-definite)
and R = sum_i sum_c (dl/df_c) grad^2 f_c. The outliers of H are those of G; R is small, with
eigenvalues of both signs, and carries the negative part of the spectrum.

It reuses the runs of ``hessian_spectrum`` (same ``runs`` folder, same settings): digits and
parity at the smallest batch size (trained to zero training error at ``small``), and digits at the
largest batch size (same epochs, fewer steps: not yet at zero error). The callback (``ggn_split: true``) logged at fit end the top-21 of
H and of G, the extreme eigenvalues of R and the three traces. Here, on the end checkpoint and the
same analysis subset, the SLQ densities of H, G and R (90 Lanczos steps, 1 probe, the callback's
seed) and the smallest eigenvalues of H are added for the figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from overparam.reproduce import _runs, hessian_spectrum

TITLE = "GGN vs residual split of the Hessian at the end of training: outliers from G, R small with both signs (MNIST-FC)"

SCALES = hessian_spectrum.SCALES


def spectra(run: Path, steps: int = 90, seed: int = 0) -> dict[str, Any]:
    """SLQ nodes and weights of H, G and R and the bottom-3 of H at the run's end checkpoint."""
    from overparam.commands.interpolate import member_view
    from overparam.runs import load_run
    from overparam.curvature import GGNOperator, HessianOperator, ResidualOperator, operator_eigsh, slq

    loaded = load_run(str(run), "ggn_split")
    loaded.datamodule.setup()
    batches = loaded.datamodule.analysis_batches("train", shard_across_ranks=False)  # the callback's subset
    batches = [(x.to(loaded.dtype), y if not y.is_floating_point() else y.to(loaded.dtype)) for x, y in batches]
    view, loss_fn = member_view(loaded, 0, "ggn_split"), loaded.task.loss_fn
    result: dict[str, Any] = {}
    for key, cls in (("H", HessianOperator), ("G", GGNOperator), ("R", ResidualOperator)):
        op = cls.from_view(view, loss_fn, batches)
        raw = slq(op.matvec, op.dim, num_probes=1, num_steps=steps, seed=seed, dtype=op.dtype, device=op.device)
        result[key] = {"nodes": raw.nodes[0].numpy(), "weights": raw.weights[0].numpy(), "N": op.dim}
        if key == "H":
            result["H_top"] = operator_eigsh(op, k=3).eigenvalues.numpy()
            result["H_bottom"] = operator_eigsh(op, k=3, which="smallest").eigenvalues.numpy()
    return result


def plot(name: str, end: dict[str, np.ndarray], sp: dict[str, Any], out: Path, filename: str) -> str:
    from overparam.plots import save_figure, subplots

    from overparam.curvature import histogram

    fig, axes = subplots(1, 3, figsize=(15, 3.9))
    hi = 1.05 * float(end["eigenvalues"].max())
    r = max(abs(float(v)) for v in end["residual_extremes"])
    lo = min(float(min(sp[k]["nodes"].min() for k in "HGR")), -0.05 * hi)
    for ax, bins, title in ((axes[0], torch.linspace(lo, hi, 140, dtype=torch.float64), f"{name}: spectra at the end of training"),
                            (axes[1], torch.linspace(-2.5 * r, 2.5 * r, 100, dtype=torch.float64), "zoom near zero (|x| < 2.5 max|R|)")):
        for key, color, label in (("H", "k", "H"), ("G", "C0", "G (Gauss-Newton)"), ("R", "C3", "R = H - G")):
            edges, c = histogram(torch.as_tensor(sp[key]["nodes"])[None], torch.as_tensor(sp[key]["weights"])[None], sp[key]["N"], bins=bins)
            ax.stairs(np.maximum(c.numpy(), 1e-1), edges.numpy(), color=color, label=label, lw=2 if key == "H" else 1.2, alpha=0.85)
        ax.set(yscale="log", ylim=(0.5, None), xlabel="eigenvalue", ylabel="count (SLQ, of N)", title=title)
        ax.legend(fontsize=8)
    ax = axes[2]
    i = np.arange(1, len(end["eigenvalues"]) + 1)
    ax.semilogy(i, end["eigenvalues"], "ko-", ms=4, label="H (Lanczos)")
    ax.semilogy(i, end["ggn_eigenvalues"], "C0s--", ms=3, label="G (Lanczos)")
    r_top, r_bottom = (float(v) for v in end["residual_extremes"])
    ax.axhline(r_top, color="C3", lw=1, label=f"R: largest {r_top:.2f}")
    ax.axhline(abs(r_bottom), color="C3", lw=1, ls=":", label=f"R: |smallest| {abs(r_bottom):.2f} (negative)")
    ax.set(xlabel="index i", ylabel="eigenvalue", title="top eigenvalues of H and G, extremes of R")
    ax.legend(fontsize=8)
    save_figure(fig, out / filename, dpi=100)
    return filename


def _mass(sp: dict[str, Any], threshold: float) -> float:
    """Fraction of the spectral mass (SLQ) with |lambda| > threshold."""
    return float(np.sum(sp["weights"][np.abs(sp["nodes"]) > threshold]))


def run(scale: str, out: Path, runs: Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or reuse) the ``hessian_spectrum`` runs, split the end Hessians, plot."""
    out.mkdir(parents=True, exist_ok=True)
    s = {**SCALES[scale], **(settings or {})}
    trained = hessian_spectrum.train(s, runs)
    b0 = s["batch_sizes"][0]
    numbers: dict[str, Any] = {"settings": s, "figures": [], "runs": {}}
    for name in (f"digits_b{b0}", f"parity_b{b0}", f"digits_b{s['batch_sizes'][-1]}"):
        end = hessian_spectrum.load(trained[name], "end")
        sp = spectra(trained[name])
        numbers["figures"].append(plot(name, end, sp, out, f"ggn_split_{name}.png"))
        H, G = end["eigenvalues"], end["ggn_eigenvalues"]
        n = int(end["outliers"])
        metrics = {r: _runs.last(trained[name], f"hessian/{r}") for r in ("trace", "ggn_trace", "residual_trace")}
        r_top, r_bottom = (float(v) for v in end["residual_extremes"])
        numbers["runs"][name] = {
            "outliers": n,
            "H_top": [round(float(v), 4) for v in H],
            "G_top": [round(float(v), 4) for v in G],
            "outlier_rel_diff_G_vs_H": float(np.max(np.abs(G[:n] - H[:n]) / H[:n])) if n else None,
            "R_largest": r_top, "R_smallest": r_bottom,
            "R_norm_over_H_top1": max(abs(r_top), abs(r_bottom)) / float(H[0]),
            "H_smallest": [float(v) for v in sp["H_bottom"]],
            "G_slq_min_node": float(sp["G"]["nodes"].min()),
            "traces": metrics,
            "R_mass_negative": float(np.sum(sp["R"]["weights"][sp["R"]["nodes"] < 0])),
            "H_mass_above_bulk": _mass(sp["H"], 2 * float(H[-1])),
            "train/error": _runs.last(trained[name], "train/error"),
        }
        start = hessian_spectrum.load(trained[name], "start")  # the split at initialisation, for contrast
        numbers["runs"][name]["start"] = {"H_top3": [float(v) for v in start["eigenvalues"][:3]],
                                          "G_top3": [float(v) for v in start["ggn_eigenvalues"][:3]],
                                          "R_extremes": [float(v) for v in start["residual_extremes"]]}
    return numbers
