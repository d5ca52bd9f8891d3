"""Where gradient descent halts on the spherical p-spin landscape, as N grows.

For each N: ``samples`` coupling samples, each with ``starts`` random starts trained together as
one ensemble of the ``PSpinTask`` plugin (projected GD, ``lr`` = dt = 0.1, halting at an rms
Riemannian gradient below 1e-4). Prints the halting energies per spin (mean, spread across all
starts, spread within a sample), saves them to ``docs/figures/pspin_halting.npz`` and draws
``docs/figures/pspin_halting.png`` against ``E_inf = -2 sqrt((p-1)/p)`` and the ground state.

    python benchmarks/pspin_halting.py                       # the committed figure (CPU, ~30 min)
    python benchmarks/pspin_halting.py --N 20 30 --samples 2  # quick look
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from overparam.plugins.pspin import PSpinData, PSpinTask
from overparam.pspin import GROUND_STATE, threshold_energy

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def halting_energies(N: int, p: int, coupling_seed: int, starts: int, max_steps: int, lr: float, halt_tol: float) -> dict:
    data = PSpinData(N=N, p=p, coupling_seed=coupling_seed, passes_per_epoch=50)
    task = PSpinTask(
        input_shape=data.input_shape, num_train=data.num_train, ensemble_size=starts,
        init_seed=1000 * coupling_seed, lr=lr, halt_tol=halt_tol,
    )
    trainer = pl.Trainer(
        max_steps=max_steps, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(task, data)
    return task.halting_results()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--N", type=int, nargs="+", default=[20, 30, 50, 70, 100, 150])
    parser.add_argument("--p", type=int, default=3)
    parser.add_argument("--samples", type=int, nargs="+", default=[8, 8, 4, 3, 2, 2], help="coupling samples per N")
    parser.add_argument("--starts", type=int, default=64, help="random starts per sample (the ensemble size K)")
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--halt-tol", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=FIGURES / "pspin_halting")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the saved .npz, no runs")
    args = parser.parse_args()
    if args.replot:
        replot(args.out, args.p, args.starts)
        return
    torch.set_num_threads(args.threads)
    samples = args.samples if len(args.samples) == len(args.N) else [args.samples[0]] * len(args.N)

    rows, raw = [], {}
    for N, S in zip(args.N, samples):
        start = time.perf_counter()
        runs = [halting_energies(N, args.p, s, args.starts, args.max_steps, args.lr, args.halt_tol) for s in range(S)]
        energy = np.stack([r["energy"] for r in runs])  # (S, K)
        converged = np.stack([r["converged"] for r in runs])
        steps = np.stack([r["step"] for r in runs])
        raw[f"energy_N{N}"], raw[f"converged_N{N}"], raw[f"step_N{N}"] = energy, converged, steps
        rows.append((N, S, energy.mean(), energy.std(ddof=1), energy.std(axis=1, ddof=1).mean(), energy.min(),
                     converged.mean(), np.median(steps), time.perf_counter() - start))
        print(f"N={N:4d} S={S} K={args.starts}: mean {rows[-1][2]:.4f}  std {rows[-1][3]:.4f}  "
              f"within-sample std {rows[-1][4]:.4f}  min {rows[-1][5]:.4f}  converged {rows[-1][6]:.0%}  "
              f"median steps {rows[-1][7]:.0f}  ({rows[-1][8]:.0f} s)", flush=True)

    table = np.array(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out.with_suffix(".npz"), table=table, columns=np.array(
        ["N", "samples", "mean", "std", "within_sample_std", "min", "converged", "median_steps", "seconds"]), **raw)
    plot(table, raw, args.p, args.starts, args.out.with_suffix(".png"))
    E_x, b = edge_fit(table[:, 0], table[:, 2])
    print(f"fit mean = {E_x:.4f} + {b:.3f} N^(-2/3)")
    print(f"E_inf = {threshold_energy(args.p):.4f}, ground state = {GROUND_STATE.get(args.p, float('nan'))}")
    print(f"wrote {args.out.with_suffix('.png')} and .npz")


def edge_fit(N: np.ndarray, mean: np.ndarray) -> tuple[float, float]:
    """Least squares ``mean = E_x + b N^{-2/3}``; returns ``(E_x, b)``.

    Heuristic finite-size form (not a theorem): a critical point at energy E is a minimum when
    the lower edge of its Hessian's semicircle, ``-pE - 2 sqrt(p(p-1))``, is within the
    Tracy-Widom window ``~ N^{-2/3}`` of 0, so finite-N minima reach ``E_inf + O(N^{-2/3})``.
    """
    b, E_x = np.polyfit(N ** (-2.0 / 3.0), mean, 1)
    return float(E_x), float(b)


def plot(table: np.ndarray, raw: dict, p: int, starts: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E_inf, E_0 = threshold_energy(p), GROUND_STATE.get(p)
    N, mean, std, within = table[:, 0], table[:, 2], table[:, 3], table[:, 4]
    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(14, 4))
    for n in N.astype(int):
        ax0.hist(raw[f"energy_N{n}"].ravel(), bins=30, density=True, histtype="step", lw=1.5, label=f"N = {n}")
    ax0.axvline(E_inf, color="k", ls="--", lw=1, label=r"$E_\infty$")
    if E_0 is not None:
        ax0.axvline(E_0, color="tab:red", ls=":", lw=1, label="ground state")
    ax0.set(xlabel="energy per spin where GD halts", ylabel="density", title=f"p = {p}: GD halting energies")
    ax0.legend(fontsize=8)

    x = N ** (-2.0 / 3.0)
    E_x, b = edge_fit(N, mean)
    grid = np.linspace(0, x.max() * 1.05, 50)
    ax1.errorbar(x, mean, yerr=std, fmt="o", capsize=3, label="mean +- std (all starts)")
    ax1.plot(grid, E_x + b * grid, "tab:gray", lw=1, label=f"fit {E_x:.3f} + {b:.2f} N$^{{-2/3}}$")
    ax1.axhline(E_inf, color="k", ls="--", lw=1, label=r"$E_\infty$ = %.3f" % E_inf)
    if E_0 is not None:
        ax1.axhline(E_0, color="tab:red", ls=":", lw=1, label=f"ground state {E_0}")
    for n, xi, m in zip(N.astype(int), x, mean):
        ax1.annotate(f"N={n}", (xi, m), textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax1.set(xlabel=r"$N^{-2/3}$", ylabel="energy per spin", title="mean halting energy vs N", xlim=(0, None))
    ax1.legend(fontsize=7, loc="lower right")

    slope = np.polyfit(np.log(N), np.log(std), 1)[0]
    ax2.loglog(N, std, "o-", label=f"all starts and samples (slope {slope:.2f})")
    ax2.loglog(N, within, "s--", label="within one coupling sample")
    ax2.set(xlabel="N", ylabel="std of halting energy", title="spread across starts shrinks with N")
    ax2.legend(fontsize=8)
    fig.suptitle(f"spherical {p}-spin, projected GD from random starts ({starts} per coupling sample); CPU sweep", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def replot(path: Path, p: int, starts: int) -> None:
    saved = np.load(path.with_suffix(".npz"))
    raw = {k: saved[k] for k in saved.files if k.startswith("energy_N")}
    plot(saved["table"], raw, p, starts, path.with_suffix(".png"))
    E_x, b = edge_fit(saved["table"][:, 0], saved["table"][:, 2])
    print(f"fit mean = {E_x:.4f} + {b:.3f} N^(-2/3); E_inf = {threshold_energy(p):.4f}")


if __name__ == "__main__":
    main()
