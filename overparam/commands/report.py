"""``overparam report jamming RUNS_DIR``: the jamming phase diagram and N* of a width sweep.

Reads every run folder under RUNS_DIR (recursively: a folder with ``metrics.csv``), taking N,
P and K from ``hparams.yaml`` (logged by the Task), width and seeds from ``config.yaml``, and
from ``metrics.csv`` the last count of ``ConstraintCounter`` (``constraints/N_delta``, per
member ``.../member_k`` when K > 1: each member is one sample), its verdict (``constraints/sat``
and ``constraints/jammed``) and the last test errors (``test/error``, ``test/error/member_k``,
``test/ensemble_error``). A sample is SAT or jammed by the counter's verdict; a run that ended
without one (the step budget ran out while it still improved) is *undecided*: it is counted
and reported per group but left out of the SAT fraction and N*, which it would bias. So is a
*stuck* sample: one that did not reach SAT and whose every unsatisfied point lies in a dead
region, where the network is constant (``constraints/N_delta_constant`` = N_Delta, logged by
ConstraintCounter at fit end): dead units, not too few parameters, stopped it.

It writes into ``--out`` (default ``RUNS_DIR/report_jamming``):

* ``samples.csv`` (one row per run member), ``groups.csv`` (per (P, N): SAT fraction, mean
  N_Delta/N of the decided samples, test errors of single nets and of the ensemble average),
  ``nstar.csv``;
* ``ndelta.png``: N_Delta/N against P/N (Spigler et al. 2019, Fig. 2);
* ``phase_diagram.png``: the fraction of SAT samples against N/P with N*/P marked;
* ``test_error.png``: test error against N for single nets and for the ensemble average,
  with N* marked (Geiger et al. 2020, Fig. 1).

N* (per P) is where the SAT fraction crosses 1/2, linearly interpolated in log N between the
two widths that bracket it; its uncertainty is the spread (16th-84th percentile) of the same
estimate over bootstrap resamples of the seeds within each width. When every width is all
SAT or all UNSAT the bootstrap has no spread: the bracket (``largest_unsat_N``,
``smallest_sat_N``) in ``nstar.csv`` is then the uncertainty.

``--ensemble`` also averages the separately trained K = 1 runs of each (P, N) group
(``overparam ensemble`` on their ``checkpoints/last.ckpt``), for sweeps over seeds.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections import defaultdict
from typing import Any, Optional

import numpy as np

from overparam.runs import CONFIG_FILE, HPARAMS_FILE, LAST_CHECKPOINT, METRICS_FILE, last_values, read_yaml
from overparam.errors import ConfigError
from overparam.metrics import member_suffix

BOOTSTRAP = 400  # resamples for the uncertainty of N*; 400 puts the percentile noise well under the seed spread


# --- reading runs -------------------------------------------------------------------------
def find_runs(root: str) -> list[str]:
    """Folders under ``root`` (itself included) holding a ``metrics.csv``, sorted."""
    if not os.path.isdir(root):
        raise ConfigError(f"RUNS_DIR {root!r} is not a folder")
    return sorted(dirpath for dirpath, _, files in os.walk(root) if "metrics.csv" in files)


def read_run(folder: str) -> list[dict[str, Any]]:
    """One sample per member of the run in ``folder`` (empty if it never counted constraints)."""
    hparams = read_yaml(os.path.join(folder, HPARAMS_FILE))
    config = read_yaml(os.path.join(folder, CONFIG_FILE))
    metrics = last_values(os.path.join(folder, METRICS_FILE))
    if "constraints/N_delta" not in metrics or "N" not in hparams:
        return []
    N, P, K = int(hparams["N"]), int(hparams.get("P", 0)), int(hparams.get("K", 1))
    model_args = (config.get("model") or {}).get("init_args") or {}
    init_seed = int(hparams.get("init_seed", model_args.get("init_seed", 0)) or 0)
    base = {
        "run": folder,
        "N": N,
        "P": P,
        "K": K,
        "width": hparams.get("width", model_args.get("width")),
        "seed": config.get("seed_everything"),
        "ensemble_error": metrics.get("test/ensemble_error", math.nan) if K > 1 else math.nan,
    }
    samples = []
    for k in range(K):
        suffix = member_suffix(k, K)
        N_delta = metrics.get(f"constraints/N_delta{suffix}", math.nan)
        sat = metrics.get(f"constraints/sat{suffix}", float(N_delta == 0))
        jammed = metrics.get(f"constraints/jammed{suffix}", 0.0)
        constant = metrics.get(f"constraints/N_delta_constant{suffix}", 0.0)
        stuck = sat != 1 and N_delta > 0 and constant == N_delta
        samples.append(
            {
                **base,
                "member": k,
                "init_seed": init_seed + k,
                "N_delta": N_delta,
                "N_delta_over_N": N_delta / N,
                "train_loss": metrics.get(f"constraints/loss{suffix}", math.nan),
                "sat": int(sat == 1),
                "N_delta_constant": constant,
                "status": "sat" if sat == 1 else ("stuck" if stuck else ("jammed" if jammed == 1 else "undecided")),
                "test_error": metrics.get(f"test/error{suffix}", math.nan),
            }
        )
    return samples


# --- N* -----------------------------------------------------------------------------------
def crossing(Ns: np.ndarray, fractions: np.ndarray, level: float = 0.5) -> float:
    """The N where ``fractions`` (ordered by N) first reaches ``level``, interpolated in log N.

    Returns NaN when the fractions never cross (all above or all below the level).
    """
    for i in range(1, len(Ns)):
        lo, hi = fractions[i - 1], fractions[i]
        if lo < level <= hi:
            t = (level - lo) / (hi - lo)
            return float(np.exp(np.log(Ns[i - 1]) + t * (np.log(Ns[i]) - np.log(Ns[i - 1]))))
    return math.nan


def estimate_nstar(groups: dict[int, list[int]], seed: int = 0) -> dict[str, float]:
    """N* and its bootstrap spread from ``{N: [sat flags of the samples]}`` at one P."""
    Ns = np.array(sorted(groups), dtype=float)
    flags = [np.asarray(groups[int(n)], dtype=float) for n in Ns]
    nstar = crossing(Ns, np.array([f.mean() for f in flags]))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP):
        frac = np.array([rng.choice(f, size=f.size).mean() for f in flags])
        value = crossing(Ns, frac)
        if not math.isnan(value):
            draws.append(value)
    lo, hi = (np.percentile(draws, [16, 84]) if draws else (math.nan, math.nan))
    below = [n for n, f in zip(Ns, flags) if f.mean() < 0.5]
    above = [n for n, f in zip(Ns, flags) if f.mean() >= 0.5]
    return {
        "N_star": nstar,
        "N_star_lo": float(lo),
        "N_star_hi": float(hi),
        "N_star_log_std": float(np.std(np.log(draws))) if draws else math.nan,
        "largest_unsat_N": float(max(below)) if below else math.nan,
        "smallest_sat_N": float(min(above)) if above else math.nan,
        "bootstrap_valid": len(draws) / BOOTSTRAP,
    }


# --- the report -----------------------------------------------------------------------------
def summarise(samples: list[dict[str, Any]], ensemble: Optional[dict[tuple[int, int], float]] = None) -> list[dict[str, Any]]:
    """One row per (P, N): sample count, SAT fraction, mean N_Delta/N and test errors."""
    by_group: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        by_group[(s["P"], s["N"])].append(s)
    rows = []
    for (P, N), group in sorted(by_group.items()):
        errors = np.array([s["test_error"] for s in group], dtype=float)
        ens = [s["ensemble_error"] for s in {s["run"]: s for s in group}.values() if not math.isnan(s["ensemble_error"])]
        if ensemble and (P, N) in ensemble:
            ens.append(ensemble[(P, N)])
        decided = [s for s in group if s["status"] in ("sat", "jammed")]
        rows.append(
            {
                "P": P,
                "N": N,
                "N_over_P": N / P if P else math.nan,
                "samples": len(group),
                "undecided": sum(s["status"] == "undecided" for s in group),
                "stuck": sum(s["status"] == "stuck" for s in group),
                "sat_fraction": float(np.mean([s["sat"] for s in decided])) if decided else math.nan,
                # decided samples only: a stuck run's N_Delta counts dead points, an undecided one's is not final
                "N_delta_over_N": float(np.mean([s["N_delta_over_N"] for s in decided])) if decided else math.nan,
                "test_error": float(np.nanmean(errors)) if np.isfinite(errors).any() else math.nan,
                "test_error_std": float(np.nanstd(errors)) if np.isfinite(errors).any() else math.nan,
                "ensemble_test_error": float(np.mean(ens)) if ens else math.nan,
            }
        )
    return rows


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        if not rows:
            return
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(out: str, samples: list[dict[str, Any]], groups: list[dict[str, Any]], nstars: list[dict[str, Any]]) -> list[str]:
    """The three figures; returns their paths."""
    from overparam.plots import subplots

    paths = []
    Ps = sorted({g["P"] for g in groups})
    colors = {P: f"C{i}" for i, P in enumerate(Ps)}

    fig, ax = subplots(figsize=(5, 4))
    for P in Ps:
        pts = [s for s in samples if s["P"] == P]
        ax.scatter([P / s["N"] for s in pts], [s["N_delta_over_N"] for s in pts], s=14, color=colors[P], label=f"P = {P}")
    ax.set(xscale="log", xlabel="P / N", ylabel=r"$N_\Delta / N$", title="unsatisfied constraints")
    ax.legend()
    paths.append(_save(fig, os.path.join(out, "ndelta.png")))

    fig, ax = subplots(figsize=(5, 4))
    for P in Ps:
        rows = [g for g in groups if g["P"] == P]
        ax.plot([g["N_over_P"] for g in rows], [g["sat_fraction"] for g in rows], "o-", color=colors[P], label=f"P = {P}")
        for ns in nstars:
            if ns["P"] == P and not math.isnan(ns["N_star"]):
                ax.axvline(ns["N_star"] / P, color=colors[P], ls="--", lw=1)
                if not math.isnan(ns["N_star_lo"]):
                    ax.axvspan(ns["N_star_lo"] / P, ns["N_star_hi"] / P, color=colors[P], alpha=0.15)
    ax.axhline(0.5, color="gray", lw=0.5)
    ax.set(xscale="log", xlabel="N / P", ylabel="fraction of SAT runs", title="phase diagram (dashed: N*/P)")
    ax.legend()
    paths.append(_save(fig, os.path.join(out, "phase_diagram.png")))

    fig, ax = subplots(figsize=(5, 4))
    for P in Ps:
        rows = [g for g in groups if g["P"] == P]
        Ns = [g["N"] for g in rows]
        ax.errorbar(Ns, [g["test_error"] for g in rows], yerr=[g["test_error_std"] for g in rows], fmt="o-",
                    color=colors[P], label=f"single nets, P = {P}")
        ens = [(g["N"], g["ensemble_test_error"]) for g in rows if not math.isnan(g["ensemble_test_error"])]
        if ens:
            ax.plot(*zip(*ens), "s--", color=colors[P], label=f"ensemble average, P = {P}")
        for ns in nstars:
            if ns["P"] == P and not math.isnan(ns["N_star"]):
                ax.axvline(ns["N_star"], color=colors[P], ls=":", lw=1)
    ax.set(xscale="log", xlabel="N", ylabel="test error", title="test error (dotted: N*)")
    ax.legend(fontsize=7)
    paths.append(_save(fig, os.path.join(out, "test_error.png")))
    return paths


def _save(fig: Any, path: str) -> str:
    from matplotlib.ticker import NullFormatter

    from overparam.plots import save_figure

    for ax in fig.axes:
        ax.xaxis.set_minor_formatter(NullFormatter())  # log axes: decade labels only
    return save_figure(fig, path, dpi=120)


def ensemble_of_seeds(samples: list[dict[str, Any]]) -> dict[tuple[int, int], float]:
    """Test error of the average of each (P, N) group's separately trained K = 1 runs."""
    from overparam.commands.ensemble import evaluate

    runs: dict[tuple[int, int], list[str]] = defaultdict(list)
    for s in samples:
        if s["K"] == 1 and os.path.isfile(os.path.join(s["run"], LAST_CHECKPOINT)):
            runs[(s["P"], s["N"])].append(s["run"])
    return {key: evaluate(folders, None, "test", "cpu", 8192)["ensemble_error"] for key, folders in runs.items() if len(folders) > 1}


def jamming(runs_dir: str, out: Optional[str] = None, ensemble: bool = False) -> dict[str, Any]:
    """Build the whole report; returns ``samples``, ``groups``, ``nstar`` and the figure paths."""
    samples = [s for folder in find_runs(runs_dir) for s in read_run(folder)]
    if not samples:
        raise ConfigError(
            f"RUNS_DIR {runs_dir!r} holds no run with ConstraintCounter metrics (constraints/N_delta in metrics.csv) "
            "and N in hparams.yaml"
        )
    out = out or os.path.join(runs_dir, "report_jamming")
    os.makedirs(out, exist_ok=True)
    groups = summarise(samples, ensemble_of_seeds(samples) if ensemble else None)
    nstars = []
    for P in sorted({s["P"] for s in samples}):
        flags: dict[int, list[int]] = defaultdict(list)
        for s in samples:
            if s["P"] == P and s["status"] in ("sat", "jammed"):
                flags[s["N"]].append(s["sat"])
        est = estimate_nstar(flags)
        nstars.append({"P": P, **est, "N_star_over_P": est["N_star"] / P if P else math.nan})
    write_csv(os.path.join(out, "samples.csv"), samples)
    write_csv(os.path.join(out, "groups.csv"), groups)
    write_csv(os.path.join(out, "nstar.csv"), nstars)
    figures = plot(out, samples, groups, nstars)
    return {"samples": samples, "groups": groups, "nstar": nstars, "figures": figures, "out": out}


def _format(report: dict[str, Any]) -> str:
    lines = [f"{len(report['samples'])} samples in {len({s['run'] for s in report['samples']})} runs"]
    lines.append(f"{'P':>7} {'N':>8} {'N/P':>8} {'n':>3} {'undec':>5} {'stuck':>5} {'SAT':>5} {'N_D/N':>8} {'test err':>9} {'ens err':>8}")
    for g in report["groups"]:
        lines.append(
            f"{g['P']:>7} {g['N']:>8} {g['N_over_P']:>8.3g} {g['samples']:>3} {g['undecided']:>5} {g['stuck']:>5} {g['sat_fraction']:>5.2f} "
            f"{g['N_delta_over_N']:>8.3g} {g['test_error']:>9.4f} {g['ensemble_test_error']:>8.4f}"
        )
    for ns in report["nstar"]:
        if math.isnan(ns["N_star"]):
            lines.append(f"P = {ns['P']}: the SAT fraction does not cross 1/2 in this sweep; widen the range of N")
        else:
            lines.append(
                f"P = {ns['P']}: N* = {ns['N_star']:.4g} (16-84%: {ns['N_star_lo']:.4g}-{ns['N_star_hi']:.4g}), "
                f"N*/P = {ns['N_star_over_P']:.3g}, between N = {ns['largest_unsat_N']:.0f} (UNSAT) and "
                f"{ns['smallest_sat_N']:.0f} (SAT)"
            )
    lines.append(f"written to {report['out']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="overparam report", description="Reports over a folder of runs.")
    kinds = parser.add_subparsers(dest="kind", required=True)
    jam = kinds.add_parser("jamming", help="N_Delta/N, SAT phase diagram, N*, test error vs N", description=__doc__.split("\n\n")[0])
    jam.add_argument("runs_dir", metavar="RUNS_DIR", help="folder searched recursively for run folders (metrics.csv)")
    jam.add_argument("--out", default=None, help="output folder (default: RUNS_DIR/report_jamming)")
    jam.add_argument("--ensemble", action="store_true", help="also average the K = 1 runs of each width from their checkpoints")
    args = parser.parse_args(argv)
    report = jamming(args.runs_dir, args.out, args.ensemble)
    print(_format(report))
    return 0
