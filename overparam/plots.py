"""Figures: drawn on ``matplotlib.figure.Figure`` objects, saved as PNG, no global backend.

``Figure(...)`` needs no pyplot state and no backend switch (``matplotlib.use`` would change a
notebook user's backend); ``save_figure`` attaches the Agg canvas that writes the file. Each
plotting function returns its ``Figure`` so a caller can show, restyle or save it.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float = 5.0, height: float = 3.5) -> Figure:
    """An empty figure of ``width x height`` inches."""
    return Figure(figsize=(width, height))


def save_figure(fig: Figure, path: str, dpi: int = 120) -> str:
    """Lay out and write ``fig`` as a PNG at ``path``; returns ``path``."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


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
