"""``overparam landscape``: the loss and error on a plane around a finished run (Li et al. 2018).

    overparam landscape --run RUN [--plane filter|hessian|pca|points] [--grid 21] [--range -1 1]
                        [--splits train test] [--out DIR]
    overparam landscape --run RUN --plane pca                  # needs TrajectorySnapshots snapshots
    overparam landscape --run RUN --plane points --b RUN_B --c RUN_C

The task and data are rebuilt from the run as ``overparam interpolate`` does (a RUN folder means
its ``checkpoints/last.ckpt`` and ``config.yaml``; a ``.ckpt`` is read with its folder's
``config.yaml``), and the surface ``L(theta + a d1 + b d2)`` is evaluated on a grid by
``overparam.planes``. Planes: ``filter`` (two filter-normalised random directions), ``hessian``
(the top-2 Hessian eigenvectors on the training subset), ``pca`` (the first two principal
directions of the run's trajectory, ``trajectory/trajectory.npz``), ``points`` (the plane
through the run and two others).

Writes ``surface.npz`` (``a``, ``b``, ``<split>_loss`` and ``<split>_error`` as ``(A, B)`` grids,
``plane``, the directions and their metadata: eigenvalues and residuals, explained variance,
the trajectory's coordinates, the three points), ``contour.png`` (log-scale contours of each
split's loss, the trajectory drawn on the PCA plane) and ``surface.png`` (3D surfaces) into
``--out``, and prints the centre's values, the curvature there and the directions' metadata.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from overparam import planes
from overparam.commands.interpolate import _OneLineParser, evaluation_data, member_view
from overparam.errors import ConfigError
from overparam.landscape import batchnorm_layers, check_same_shapes
from overparam.plots import plot_plane_evaluation, save_figure
from overparam.progress import Progress
from overparam.runs import load_run, read_trajectory, resolve_run

PROG = "overparam landscape"


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder or .ckpt: the centre of the plane")
    parser.add_argument("--plane", default="filter", choices=planes.PLANES, help="the directions (default filter, Li et al. 2018)")
    parser.add_argument("--grid", type=int, default=21, help="grid points per axis (0 always added; default 21)")
    parser.add_argument("--range", type=float, nargs=2, metavar=("LO", "HI"),
                        help="both axes' extent (default: -1 1 for filter and hessian; the trajectory or the three points with a margin for pca and points)")
    parser.add_argument("--splits", nargs="+", default=["train", "test"], help="splits to evaluate (default train test)")
    parser.add_argument("--b", help="--plane points: the second run (at (1, 0))")
    parser.add_argument("--c", help="--plane points: the third run")
    parser.add_argument("--trajectory", help="--plane pca: a trajectory.npz (default <run>/trajectory/trajectory.npz)")
    parser.add_argument("--member", type=int, default=0, help="ensemble member of every run (default 0)")
    parser.add_argument("--size", type=int, help="training points (default: the run's data.analysis_size, else all)")
    parser.add_argument("--batch-size", type=int, help="evaluation chunk size (default: the run's data.eval_batch_size)")
    parser.add_argument("--bn-centre", default="recompute", choices=("recompute", "stored"),
                        help="BatchNorm nets: recompute the statistics at the centre too (default), or use the checkpoint's "
                        "(the centre then reproduces the run's logged losses)")
    parser.add_argument("--points-per-call", type=int, default=7, help="grid points per vmapped forward (default 7)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random directions and of Lanczos' start vector")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="landscape", help="output folder (default ./landscape)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no loading, so a bad value fails before any work."""
    if args.grid < 2:
        raise ConfigError(f"--grid must be an integer >= 2, got {args.grid}")
    if args.range is not None and not args.range[0] < args.range[1]:
        raise ConfigError(f"--range LO HI needs LO < HI, got {args.range[0]:g} {args.range[1]:g}")
    if args.plane == "points" and (args.b is None or args.c is None):
        raise ConfigError("--plane points needs --b and --c: the plane through --run, --b and --c")
    if args.plane != "points" and (args.b is not None or args.c is not None):
        raise ConfigError(f"--b and --c go with --plane points, not --plane {args.plane}")
    if args.trajectory is not None and args.plane != "pca":
        raise ConfigError(f"--trajectory goes with --plane pca, not --plane {args.plane}")
    if args.points_per_call < 1:
        raise ConfigError(f"--points-per-call must be a positive integer, got {args.points_per_call}")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    device = torch.device(args.device)
    run = load_run(args.run, "--run", device)
    view = member_view(run, args.member, "--member")
    others = []
    if args.plane == "points":  # every run before any data: a bad --c fails at once
        for option in ("--b", "--c"):
            other = member_view(load_run(getattr(args, option[2:]), option, device), args.member, "--member")
            check_same_shapes(view.params, other.params, ("--run", option))
            others.append(other.params)
    trajectory = None
    if args.plane == "pca":
        trajectory = _trajectory(args, view.num_parameters)
    data = evaluation_data(run, args.splits, args.size, args.batch_size, device)
    train = data["train"] if "train" in data else evaluation_data(run, ["train"], args.size, args.batch_size, device)["train"]
    task = run.task
    bn_module = task.net if task.ensemble_size == 1 else None
    has_bn = bool(batchnorm_layers(bn_module))
    progress = Progress(f"{PROG} {args.plane}")
    if args.plane == "filter":
        plane = planes.random_plane(view.params, seed=args.seed)
    elif args.plane == "hessian":
        progress.note(f"top-2 Hessian eigenvectors on {sum(len(x) for x, _ in train):,} training points (Lanczos)")
        plane = planes.hessian_plane(view.single_fn, view.params, task.loss_fn, train, buffers=view.buffers, seed=args.seed)
    elif args.plane == "pca":
        plane = planes.pca_plane(view.params, trajectory.to(device))
    else:
        plane = planes.points_plane(view.params, *others)
    evaluation = planes.evaluate_plane(
        view.single_fn, plane, data, task.loss_fn, axes=_axes(args, plane),
        buffers=view.buffers, bn_module=bn_module, bn_batches=train if has_bn else None,
        centre_buffers=view.buffers if has_bn and args.bn_centre == "stored" else None,
        points_per_call=args.points_per_call, progress=progress,
    )
    write_outputs(args, evaluation)
    return 0


def _trajectory(args: argparse.Namespace, N: int) -> torch.Tensor:
    """The member's ``(T, N)`` snapshots, checked against the run's network."""
    if args.trajectory is not None:
        source = args.trajectory
    else:
        _, config = resolve_run(args.run, "--run")
        source = str(Path(config).parent)
    arrays = read_trajectory(source, "--trajectory" if args.trajectory else "--run")
    _, K_t, N_t = arrays["params"].shape
    if N_t != N:
        raise ConfigError(f"--trajectory: the snapshots have {N_t:,} parameters and the run's network {N:,}")
    if not 0 <= args.member < K_t:
        raise ConfigError(f"--member must be a member index in 0..{K_t - 1} of the trajectory, got {args.member}")
    return torch.from_numpy(arrays["params"][:, args.member])


def _axes(args: argparse.Namespace, plane: planes.Plane) -> tuple[torch.Tensor, torch.Tensor]:
    """``--range`` on both axes, else the plane's default grid (``planes.default_axes``)."""
    if args.range is not None:
        return planes.axis(args.grid, *args.range), planes.axis(args.grid, *args.range)
    return planes.default_axes(plane, args.grid)


def write_outputs(args: argparse.Namespace, ev: planes.PlaneEvaluation) -> None:
    """``surface.npz``, ``contour.png``, ``surface.png`` in ``--out``; the numbers printed."""
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, "surface.npz"), **ev.arrays())
    contours, surfaces = plot_plane_evaluation(ev, f"{args.plane} plane around {args.run}")
    save_figure(contours, os.path.join(args.out, "contour.png"))
    save_figure(surfaces, os.path.join(args.out, "surface.png"))
    for line in summary(args, ev):
        print(line)
    print(f"{PROG}: wrote {os.path.join(args.out, 'surface.npz')}, contour.png, surface.png")


def summary(args: argparse.Namespace, ev: planes.PlaneEvaluation) -> list[str]:
    """The lines printed after a surface: the grid, the centre, the curvature, the directions."""
    info = ev.plane.info
    lines = [f"{args.plane} plane around {args.run}: {len(ev.a)} x {len(ev.b)} grid, a in [{ev.a[0]:.3g}, {ev.a[-1]:.3g}], "
             f"b in [{ev.b[0]:.3g}, {ev.b[-1]:.3g}]"]
    if (ev.a == 0).any() and (ev.b == 0).any():
        centre = ev.centre()
        lines.append("centre:  " + "  ".join(f"{split} loss {centre[f'{split}/loss']:.6g} error {centre[f'{split}/error']:.4%}" for split in ev.loss))
    if "train" in ev.loss and ev.centre_is_interior:
        curvature = ev.curvature("train")
        lines.append(f"curvature of the train loss at the centre (central differences, h = {curvature['h_a']:.3g}, {curvature['h_b']:.3g}): "
                     f"L_aa {curvature['L_aa']:.4g}  L_bb {curvature['L_bb']:.4g}  L_ab {curvature['L_ab']:.4g}")
    if args.plane == "hessian":
        state = "converged" if info["converged"].all() else "NOT converged: see the residuals in surface.npz"
        lines.append(f"Hessian: lambda_1 {info['eigenvalues'][0]:.6g}, lambda_2 {info['eigenvalues'][1]:.6g} ({state}, {info['matvecs']} products)")
    elif args.plane == "pca":
        ratio, off = info["explained_variance_ratio"], info["trajectory_off_plane"]
        lines.append(f"PCA of {info['rows']} snapshots: explained variance {ratio[0]:.4f} + {ratio[1]:.4f} = {ratio.sum():.4f}; "
                     f"largest distance of a snapshot off the plane {off.max():.4g}")
    elif args.plane == "points":
        c = info["points"][2]
        lines.append(f"points: run at (0, 0), --b at (1, 0), --c at ({c[0]:.4g}, {c[1]:.4g}); |b - run| = {info['distance_ab']:.4g}")
    else:
        lines.append(f"directions: filter-normalised, norms {info['norms'][0]:.4g} and {info['norms'][1]:.4g}, cosine {info['cosine']:.3g}")
    return lines
