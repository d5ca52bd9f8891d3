"""Figures: drawn on ``matplotlib.figure.Figure`` objects, saved as PNG, no global backend.

``Figure(...)`` needs no pyplot state and no backend switch (``matplotlib.use`` would change a
notebook user's backend); ``save_figure`` attaches the Agg canvas that writes the file. Each
plotting function returns its ``Figure`` so a caller can show, restyle or save it.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from overparam.curvature.outliers import count_outliers
from overparam.curvature.slq import histogram


def new_figure(width: float = 5.0, height: float = 3.5) -> Figure:
    """An empty figure of ``width x height`` inches."""
    return Figure(figsize=(width, height))


def subplots(*args, figsize: tuple[float, float] = (5.0, 3.5), **kwargs):
    """``pyplot.subplots`` without pyplot: ``(figure, axes)`` of a new ``Figure``."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def save_figure(fig: Figure, path, dpi: int = 120, tight: bool = True) -> str:
    """Write ``fig`` as a PNG at ``path`` (laid out tight unless the caller did its own layout);
    returns ``path``."""
    FigureCanvasAgg(fig)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return str(path)


# --- p-spin ----------------------------------------------------------------------------------
def plot_halting_energies(
    energy: np.ndarray, N: int, p: int, bins: int, threshold: float, ground_state: Optional[float] = None
) -> Figure:
    """Histogram of the energies per spin where gradient descent halted, E_inf and the ground state marked."""
    fig = new_figure()
    ax = fig.add_subplot()
    ax.hist(energy, bins=bins, color="tab:blue", alpha=0.8)
    ax.axvline(threshold, color="k", ls="--", label=r"$E_\infty$")
    if ground_state is not None:
        ax.axvline(ground_state, color="tab:red", ls=":", label="ground state")
    ax.set(xlabel="energy per spin at halting", ylabel="starts", title=f"p-spin, p = {p}, N = {N}, {energy.size} starts")
    ax.legend()
    return fig


def plot_spherical_spectrum(eigenvalues: np.ndarray, energy: float, p: int) -> Figure:
    """Pooled Riemannian Hessian eigenvalues against the semicircle of radius 2 sqrt(p(p-1)) at -p E."""
    radius, centre = 2.0 * math.sqrt(p * (p - 1)), -p * energy
    grid = np.linspace(centre - radius, centre + radius, 200)
    density = 2.0 / (math.pi * radius**2) * np.sqrt(np.clip(radius**2 - (grid - centre) ** 2, 0.0, None))
    fig = new_figure()
    ax = fig.add_subplot()
    ax.hist(np.ravel(eigenvalues), bins=40, density=True, alpha=0.7, label="exact, pooled over members")
    ax.plot(grid, density, "k", label=r"semicircle: centre $-pE$, radius $2\sqrt{p(p-1)}$")
    ax.axvline(0.0, color="gray", lw=0.8)
    ax.set(xlabel="eigenvalue of the Riemannian Hessian of H", ylabel="density")
    ax.legend(fontsize=7)
    return fig


# --- sharpness and per-block spectra (callbacks/sharpness.py, callbacks/hessian.py) ----------
def _step_line(ax, steps: np.ndarray, values: np.ndarray, **kwargs) -> None:
    """A piecewise-constant series (a threshold that follows the lr), held until the next step."""
    ax.step(steps, values, where="post", **kwargs)


def plot_sharpness(rows: list[dict], title: str = "") -> Figure:
    """lambda_1 against the optimizer step, with the stability threshold it is measured against.

    ``rows`` are ``SharpnessTracker.history`` rows (one per measurement and member). One panel
    for the sharpness lambda_1(H) and its threshold (2/lr, or the momentum one), and one for the
    preconditioned sharpness lambda_1(P^-1 H) against (2 + 2 beta1) / ((1 - beta1) lr) when it was
    measured; per-block lambda_1 as thin lines. Unconverged values are drawn hollow.
    """
    preconditioned = [r for r in rows if r.get("preconditioned_eigenvalues")]
    panels = 2 if preconditioned else 1
    fig = new_figure(5.5 * panels, 3.6)
    members = sorted({r["member"] for r in rows})
    specs = [("eigenvalues", "converged", "threshold", r"$\lambda_1(H)$", "stability threshold")]
    if preconditioned:
        specs.append(("preconditioned_eigenvalues", "preconditioned_converged", "preconditioned_threshold",
                      r"$\lambda_1(P^{-1}H)$", r"$(2 + 2\beta_1)/((1 - \beta_1)\eta)$"))
    for i, (key, flag, threshold, label, threshold_label) in enumerate(specs):
        ax = fig.add_subplot(1, panels, i + 1)
        for m in members:
            mine = [r for r in rows if r["member"] == m and r.get(key)]
            if not mine:
                continue
            steps = np.array([r["step"] for r in mine])
            lam = np.array([r[key][0] for r in mine])
            ok = np.array([bool(r[flag][0]) for r in mine])
            suffix = f" (member {m})" if len(members) > 1 else ""
            line = ax.plot(steps, lam, lw=1, label=label + suffix)[0]
            ax.plot(steps[~ok], lam[~ok], "o", mfc="none", color=line.get_color(), ms=4,
                    label="not converged" if (~ok).any() and m == members[0] else None)
            if i == 0:
                for b, name in enumerate(mine[0].get("blocks") or {}):
                    values = np.array([r["blocks"][name]["eigenvalues"][0] for r in mine])
                    ax.plot(steps, values, lw=0.7, ls="--", color=f"C{b + 2}", label=rf"block {name}{suffix}")
        first = [r for r in rows if r["member"] == members[0] and r.get(key)]
        steps = np.array([r["step"] for r in first])
        _step_line(ax, steps, np.array([r[threshold] for r in first]), color="k", ls=":", lw=1.2, label=threshold_label)
        ax.set(xlabel="optimizer step", ylabel="sharpness")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_block_spectra(full: dict, blocks: dict[str, dict], block_diagonal: dict, N: int) -> Figure:
    """The full Hessian's spectrum against the block-diagonal one, and each block's top eigenvalue.

    Args:
        full: ``{"grid", "density", "top"}`` of H (SLQ density on a grid, top-k eigenvalues).
        blocks: per block ``{"top", "trace", "dim"}``.
        block_diagonal: ``{"grid", "density", "top"}`` of diag(H_bb) (the blocks' SLQ rules merged).
        N: the number of parameters.
    """
    fig = new_figure(10.5, 3.8)
    ax = fig.add_subplot(1, 2, 1)
    peak = max((float(np.max(s["density"])) for s in (full, block_diagonal) if s.get("grid") is not None), default=1.0)
    for spectrum, label, color in ((full, "full H", "tab:blue"), (block_diagonal, "block-diagonal diag(H_bb)", "tab:red")):
        if spectrum.get("grid") is not None:
            ax.plot(spectrum["grid"], spectrum["density"], color=color, lw=1, label=f"{label} (SLQ density)")
        for j, lam in enumerate(spectrum["top"]):
            ax.axvline(lam, color=color, ls="--", lw=0.8, label=f"{label}: top-{len(spectrum['top'])}" if j == 0 else None)
    ax.set(yscale="log", ylim=(peak * 1e-6, peak * 3), xlabel="eigenvalue", ylabel="density (log)",
           title=f"Hessian spectrum, N = {N:,}")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    names = list(blocks)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [blocks[n]["top"][0] for n in names], width=0.4, label=r"$\lambda_1(H_{bb})$")
    if all(blocks[n].get("trace") is not None for n in names):
        ax.bar(x + 0.2, [blocks[n]["trace"] / blocks[n]["dim"] for n in names], width=0.4, label=r"tr$(H_{bb})/N_b$")
    ax.axhline(full["top"][0], color="tab:blue", ls="--", lw=0.8, label=r"$\lambda_1(H)$")
    ax.set_xticks(x, [f"{n}\n(N_b = {blocks[n]['dim']:,})" for n in names], fontsize=7)
    ax.set(ylabel="eigenvalue", title="per block")
    ax.legend(fontsize=7)
    return fig


def plot_edge_of_stability(series: dict[float, dict[str, np.ndarray]], preconditioned: bool, title: str = "") -> Figure:
    """Cohen et al. (2021)'s figure: the training loss and the sharpness against the step, one colour per lr.

    Args:
        series: per learning rate, ``overparam.reproduce.edge_of_stability.curves`` (``loss_step``,
            ``loss``, ``step``, ``lambda_1``, ``threshold``).
        preconditioned: the sharpness is lambda_1(P^-1 H) against 38/lr (Adam), not lambda_1(H)
            against 2/lr (GD).
    """
    fig = new_figure(10.5, 3.8)
    loss_ax, sharp_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for i, (lr, c) in enumerate(series.items()):
        color = f"C{i}"
        loss_ax.plot(c["loss_step"], c["loss"], color=color, lw=1, label=f"lr = {lr:g}")
        sharp_ax.plot(c["step"], c["lambda_1"], color=color, lw=1, label=f"lr = {lr:g}")
        _step_line(sharp_ax, c["step"], c["threshold"], color=color, ls="--", lw=0.9)
    loss_ax.set(xlabel="step", ylabel="training loss (mean over 20 steps)", yscale="log")
    loss_ax.legend(fontsize=8)
    what = r"$\lambda_1(P^{-1}H)$; dashed: $38/\eta$" if preconditioned else r"$\lambda_1(H)$; dashed: $2/\eta$"
    sharp_ax.set(xlabel="step", ylabel="preconditioned sharpness" if preconditioned else "sharpness", title=what)
    sharp_ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


# --- loss landscapes on a plane (overparam landscape, overparam reproduce landscape) -----------
def _log_levels(panels: dict[str, np.ndarray], count: int = 30) -> np.ndarray:
    """``count`` levels spaced evenly in log between the smallest positive and the largest value of all panels."""
    values = np.concatenate([np.ravel(v) for v in panels.values()])
    positive = values[np.isfinite(values) & (values > 0)]
    lo, hi = (positive.min(), positive.max()) if positive.size else (1e-3, 1.0)
    return np.geomspace(lo, max(hi, lo * 1.001), count)


def plot_plane_contours(
    a: np.ndarray,
    b: np.ndarray,
    panels: dict[str, np.ndarray],
    title: str = "",
    trajectory: Optional[np.ndarray] = None,
    marks: Optional[dict[str, tuple[float, float]]] = None,
    axis_labels: tuple[str, str] = (r"$\alpha$ (along $d_1$)", r"$\beta$ (along $d_2$)"),
    equal_aspect: bool = False,
) -> Figure:
    """Filled log-scale contours of 2D surfaces side by side (Li et al. 2018, Figs. 5 and 9).

    Args:
        a, b: ``(A,)`` and ``(B,)`` grid coordinates.
        panels: title -> ``(A, B)`` values (``values[i, j]`` at ``(a[i], b[j])``), all drawn on
            one colour scale so side-by-side surfaces compare (a flat basin is wide on it).
        trajectory: ``(T, 2)`` coordinates drawn as a path on every panel (the PCA plane's
            training trajectory; the first point, theta_0, ringed).
        marks: label -> ``(a, b)`` points to mark (the three networks of a ``points`` plane).
        axis_labels: the two axes' labels.
        equal_aspect: one unit on both axes has the same length (``points`` planes: isometric).
    """
    from matplotlib.colors import LogNorm

    levels = _log_levels(panels)
    fig = new_figure(4.6 * len(panels) + 0.8, 4.0)
    grid = fig.add_gridspec(1, len(panels) + 1, width_ratios=[1.0] * len(panels) + [0.05])  # the last column: the colour bar
    axes = [fig.add_subplot(grid[0, i]) for i in range(len(panels))]
    for ax, (label, values) in zip(axes, panels.items()):
        filled = ax.contourf(a, b, np.clip(values.T, levels[0], levels[-1]), levels=levels, norm=LogNorm(levels[0], levels[-1]), cmap="viridis")
        ax.contour(a, b, values.T, levels=levels[::3], colors="white", linewidths=0.4, alpha=0.6)
        if trajectory is not None:
            ax.plot(trajectory[:, 0], trajectory[:, 1], "-", color="tab:red", lw=1.2, marker=".", ms=3, label="trajectory")
            ax.plot(trajectory[0, 0], trajectory[0, 1], "o", mfc="none", color="tab:red", ms=7, label=r"$\theta_0$")
        for name, (x, y) in (marks or {"centre": (0.0, 0.0)}).items():
            ax.plot(x, y, "*", color="white", mec="k", ms=11)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), color="white", fontsize=8)
        ax.set(xlabel=axis_labels[0], ylabel=axis_labels[1], title=label)
        if equal_aspect:
            ax.set_aspect("equal")
        if trajectory is not None:
            ax.legend(fontsize=7)
    bar = fig.colorbar(filled, cax=fig.add_subplot(grid[0, -1]), ticks=np.geomspace(levels[0], levels[-1], 6), format="%.3g")
    bar.ax.minorticks_off()
    bar.set_label("loss (log scale)")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_plane_surfaces(a: np.ndarray, b: np.ndarray, panels: dict[str, np.ndarray], title: str = "", log: bool = True) -> Figure:
    """3D surfaces side by side on one z scale (Li et al. 2018's surface plots).

    Args:
        a, b, panels: as ``plot_plane_contours``.
        log: draw ``log10`` of the values (a sharp basin and the plateau around it both show);
            False draws them as they are.
    """
    shown = {label: np.log10(np.clip(v, 1e-12, None)) if log else v for label, v in panels.items()}
    lo = min(float(np.nanmin(v)) for v in shown.values())
    hi = max(float(np.nanmax(v)) for v in shown.values())
    fig = new_figure(4.6 * len(panels), 4.2)
    A, B = np.meshgrid(a, b, indexing="ij")
    for i, (label, values) in enumerate(shown.items()):
        ax = fig.add_subplot(1, len(panels), i + 1, projection="3d")
        ax.plot_surface(A, B, values, cmap="viridis", vmin=lo, vmax=hi, linewidth=0, antialiased=True)
        ax.set(xlabel=r"$\alpha$", ylabel=r"$\beta$", zlabel="log10 loss" if log else "loss", zlim=(lo, hi), title=label)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_plane_evaluation(evaluation, title: str = "") -> tuple[Figure, Figure]:
    """The contour and the 3D figures of an ``overparam.planes.PlaneEvaluation``, each split's loss a panel.

    The plane's kind decides the decorations: the trajectory and the explained variance on the
    axes for ``pca``, the three networks (equal axes) for ``points``, the eigenvectors' names for
    ``hessian``.
    """
    kind, info = evaluation.plane.kind, evaluation.plane.info
    marks = {"final" if kind == "pca" else "centre": (0.0, 0.0)}
    axis_labels = (r"$\alpha$ (along $d_1$)", r"$\beta$ (along $d_2$)")
    if kind == "points":
        marks = dict(zip(("centre", "b", "c"), map(tuple, info["points"])))
    elif kind == "hessian":
        axis_labels = (r"$\alpha$ (along $v_1$)", r"$\beta$ (along $v_2$)")
    elif kind == "pca":
        ratio = info["explained_variance_ratio"]
        axis_labels = (f"PC 1 ({ratio[0]:.1%} of the variance)", f"PC 2 ({ratio[1]:.1%})")
    panels = {f"{split} loss": values.numpy() for split, values in evaluation.loss.items()}
    a, b = evaluation.a.numpy(), evaluation.b.numpy()
    contours = plot_plane_contours(a, b, panels, title, trajectory=info.get("trajectory") if kind == "pca" else None,
                                   marks=marks, axis_labels=axis_labels, equal_aspect=kind == "points")
    return contours, plot_plane_surfaces(a, b, panels, title)


def plot_hessian_spectra(entries: list[dict], outlier_ratio: float = 2.0) -> Figure:
    """Log-scale histogram of each entry's spectrum, outliers marked, spectra overlaid.

    An entry (a history row) gives ``exact`` eigenvalues (a true histogram), else SLQ
    ``nodes``/``weights`` (counts ``N * weight`` per bin, summing to N, with a band of +-2
    probe-to-probe standard errors when there are several probes), else only its top
    eigenvalues. Outliers (``count_outliers``) are marked with dashed lines. The caption states
    the number of SLQ probes and how many top eigenvalues converged; laid out already (save with
    ``tight=False``).
    """
    values = []
    for e in entries:
        values += e["eigenvalues"] + (e["exact"] or []) + [v for row in (e["nodes"] or []) for v in row]
    lo, hi = min(values), max(values)
    pad = 0.02 * max(hi - lo, 1e-12)
    bins = torch.linspace(lo - pad, hi + pad, 101, dtype=torch.float64)
    fig, ax = subplots(figsize=(6.4, 4.4))
    colors = ["tab:blue", "tab:red"] if len(entries) == 2 else ["tab:red"]
    caption = []
    for e, color in zip(entries, colors):
        label = f"{e['tag']} (epoch {e['epoch']})"
        if e["exact"] is not None:
            counts = torch.histogram(torch.tensor(e["exact"], dtype=torch.float64), bins).hist
            source = "exact eigvalsh"
        elif e["nodes"] is not None:
            nodes, weights = (torch.tensor(e[key], dtype=torch.float64) for key in ("nodes", "weights"))
            per_probe = torch.stack([histogram(nodes[i : i + 1], weights[i : i + 1], e["N"], bins)[1] for i in range(nodes.shape[0])])
            counts = per_probe.mean(0)
            n_probes, steps = nodes.shape
            source = f"SLQ, {n_probes} probe{'s' if n_probes > 1 else ''} x {steps} Lanczos steps"
            if n_probes > 1:
                band = 2 * per_probe.std(0) / n_probes**0.5
                low = (counts - band).clamp_min(0).numpy()
                ax.stairs((counts + band).numpy(), bins.numpy(), baseline=low, color=color, alpha=0.15, fill=True)
                source += ", band +-2 SE"
        else:
            counts = torch.histogram(torch.tensor(e["eigenvalues"], dtype=torch.float64), bins).hist
            label += ", top-k only"
            source = "top-k only"
        ax.stairs(counts.numpy(), bins.numpy(), color=color, label=label, fill=True, alpha=0.35)
        n_out = count_outliers(e["eigenvalues"], outlier_ratio)
        for i, lam in enumerate(e["eigenvalues"][:n_out]):
            ax.axvline(lam, color=color, linestyle="--", linewidth=0.9, label=f"{n_out} outlier{'s' if n_out > 1 else ''}" if i == 0 else None)
        k, missing = len(e["eigenvalues"]), sum(not c for c in e.get("converged", []))
        status = f"{missing} of the top-{k} NOT converged" if missing else f"top-{k} converged"
        caption.append(f"{e['tag']}: {source}; {status}")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue of the Hessian")
    ax.set_ylabel("number of eigenvalues")
    ax.set_title(f"Hessian spectrum (N = {entries[-1]['N']:,})")
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.03 * len(caption) + 0.01, 1, 1))
    fig.text(0.01, 0.01, "\n".join(caption), fontsize=7, va="bottom")
    return fig


def plot_gradient_subspace(rows: list[dict]) -> Figure:
    """Gradient fraction in the top subspace and overlap of successive subspaces vs step."""
    fig, ax = subplots(figsize=(6.4, 4.0))
    for member in sorted({r["member"] for r in rows}):
        mine = [r for r in rows if r["member"] == member]
        tag = f" (member {member})" if member else ""
        ax.plot([r["step"] for r in mine], [r["fraction_full"] for r in mine], label="|P g_full|^2/|g_full|^2" + tag)
        ax.plot([r["step"] for r in mine], [r["fraction_batch"] for r in mine], label="|P g_batch|^2/|g_batch|^2" + tag, alpha=0.7)
        over = [r for r in mine if not math.isnan(r["overlap"])]
        ax.plot([r["step"] for r in over], [r["overlap"] for r in over], "o-", label="overlap of successive top-k subspaces" + tag)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    return fig
