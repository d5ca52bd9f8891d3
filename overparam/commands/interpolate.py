"""``overparam interpolate``: the loss and error along a path between two finished runs.

    overparam interpolate --a RUN_OR_CKPT --b RUN_OR_CKPT [--path linear|bezier|polychain]
                          [--points 25] [--t-min 0] [--t-max 1] [--splits train,test] [--out DIR]
    overparam interpolate --a RUN_OR_CKPT --direction filter --t-min -1 --t-max 1

A RUN folder means its ``checkpoints/last.ckpt`` and ``config.yaml`` (what ``overparam fit``
writes); a ``.ckpt`` file is read with the ``config.yaml`` of its run folder. The task is rebuilt
from the checkpoint's hyperparameters (LightningCLI stores the class path and every init arg,
linked ones included) and the DataModule from ``config.yaml``'s ``data`` section; the data of
``--a`` is used for both. ``--path bezier`` (or ``polychain``) evaluates the curve saved by
``overparam connect`` (``--curve curve.npz``) or fits one first. Without ``--b``, the line
``theta_a + t d`` along ``--direction`` (``filter``: Li et al. 2018's filter-normalised Gaussian
direction, ``gaussian``, or a ``.pt``/``.npy`` file holding a flat vector such as a Hessian
eigenvector) is evaluated.

Writes ``curve.npz`` (t, ``<split>_loss``, ``<split>_error``, barrier heights; the control
points of a fitted curve), ``curve.png`` (loss and error against t) and ``barriers.json`` into
``--out``, and prints the barrier heights.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import NoReturn, Optional

import numpy as np
import torch

from overparam import landscape
from overparam.errors import ConfigError
from overparam.functional import FunctionalView
from overparam.progress import Progress
from overparam.runs import Run, load_run

# DataModule args that change how a run trained, not which points it saw (LB vs SB runs).
DATA_ARGS_NOT_COMPARED = ("batch_size", "eval_batch_size", "analysis_size")


def member_view(run: Run, member: int, option: str) -> FunctionalView:
    K = run.task.ensemble_size
    if not 0 <= member < K:
        raise ConfigError(f"{option} must be a member index in 0..{K - 1} of {run.checkpoint}, got {member}")
    return run.task.functional_view().member(member).detached()


def evaluation_data(run: Run, splits: list[str], size: Optional[int], batch_size: Optional[int], device: torch.device | str) -> dict:
    """Each split's fixed analysis batches (all points unless ``--size`` for train), on the device."""
    run.datamodule.setup()
    data = {}
    for split in splits:
        if split not in run.datamodule.splits:
            raise ConfigError(f"--splits: {type(run.datamodule).__name__} has no {split!r} split; it has {', '.join(sorted(run.datamodule.splits))}")
        batches = run.datamodule.analysis_batches(split, size=size if split == "train" else None, batch_size=batch_size, shard_across_ranks=False)
        data[split] = [(_cast(x, run.dtype, device), _cast(y, run.dtype, device)) for x, y in batches]
    return data


def _cast(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)


def _data_differences(a: Run, b: Run) -> list[str]:
    da, db = a.config.get("data") or {}, b.config.get("data") or {}
    if da.get("class_path") != db.get("class_path"):
        return [f"class {da.get('class_path')} vs {db.get('class_path')}"]
    ia, ib = da.get("init_args") or {}, db.get("init_args") or {}
    return [f"{k}: {ia.get(k)!r} vs {ib.get(k)!r}" for k in sorted(set(ia) | set(ib)) if k not in DATA_ARGS_NOT_COMPARED and ia.get(k) != ib.get(k)]


def load_direction(spec: str, origin: dict, seed: int) -> dict | torch.Tensor:
    if spec in landscape.DIRECTIONS:
        return landscape.random_direction(origin, seed=seed, normalization=spec)
    if not os.path.isfile(spec):
        raise ConfigError(f"--direction must be one of {', '.join(landscape.DIRECTIONS)} or a .pt/.npy file, got {spec!r}")
    vector = torch.as_tensor(np.load(spec)) if spec.endswith(".npy") else torch.load(spec, map_location="cpu", weights_only=False)
    if isinstance(vector, dict):
        landscape.check_same_shapes(origin, vector, ("--a", "--direction"))
        return {n: v.to(origin[n]) for n, v in vector.items()}
    return torch.as_tensor(vector).reshape(-1)


class _OneLineParser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


def build_parser(prog: str, default_path: str, description: str) -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, description=description)
    parser.add_argument("--a", required=True, help="run folder or .ckpt: the path starts here (t = 0)")
    parser.add_argument("--b", help="run folder or .ckpt: the path ends here (t = 1); omit with --direction")
    parser.add_argument("--path", default=default_path, choices=landscape.PATH_KINDS, help=f"path kind (default {default_path})")
    parser.add_argument("--curve", help="curve.npz from `overparam connect` to evaluate instead of fitting one")
    parser.add_argument("--direction", help="without --b: filter, gaussian, or a .pt/.npy direction (e.g. a Hessian eigenvector)")
    parser.add_argument("--points", type=int, default=25, help="grid points in [t-min, t-max] (0 and 1 always added; default 25)")
    parser.add_argument("--t-min", type=float, default=0.0)
    parser.add_argument("--t-max", type=float, default=1.0)
    parser.add_argument("--splits", default="train,test", help="comma-separated splits to evaluate (default train,test)")
    parser.add_argument("--size", type=int, help="training points to use (default: the run's data.analysis_size, else all)")
    parser.add_argument("--batch-size", type=int, help="evaluation chunk size (default: the run's data.eval_batch_size)")
    parser.add_argument("--bn-endpoints", default="recompute", choices=("recompute", "stored"),
                        help="BatchNorm nets: recompute the statistics at t = 0 and 1 too (default, Garipov et al.), or use "
                        "the checkpoints' stored ones there (the ends then reproduce the runs' logged losses)")
    parser.add_argument("--member-a", type=int, default=0, help="ensemble member of --a (default 0)")
    parser.add_argument("--member-b", type=int, default=None, help="ensemble member of --b (default 0, or 1 when --b is --a)")
    parser.add_argument("--bends", type=int, default=1, help="middle control points of a fitted curve (default 1, Garipov et al.)")
    parser.add_argument("--steps", type=int, default=1000, help="SGD steps of curve fitting (default 1000)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate of curve fitting (default 0.05)")
    parser.add_argument("--fit-batch-size", type=int, default=128, help="minibatch of curve fitting (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of t draws and random directions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="output folder (default ./interpolation or ./connection)")
    return parser


def main(
    argv: list[str],
    prog: str = "overparam interpolate",
    default_path: str = "linear",
    default_out: str = "interpolation",
    description: str = __doc__.split("\n\n")[0],
) -> int:
    args = build_parser(prog, default_path, description).parse_args(argv)
    if prog == "overparam connect" and (args.direction is not None or args.path == "linear"):
        raise ConfigError("overparam connect fits a curve between two runs: give --b and --path bezier or polychain (overparam interpolate draws lines)")
    if (args.b is None) == (args.direction is None):
        raise ConfigError("give exactly one of --b (a path between two runs) and --direction (a line away from --a)")
    landscape.grid(args.points, args.t_min, args.t_max)  # bad grid values fail before any loading
    splits = [s for s in args.splits.split(",") if s]
    device = torch.device(args.device)
    run_a = load_run(args.a, "--a", device)
    view_a = member_view(run_a, args.member_a, "--member-a")
    run_b = None
    if args.b is not None:  # both runs first: a bad --b fails before any data is loaded
        same = os.path.realpath(args.a) == os.path.realpath(args.b)
        run_b = run_a if same else load_run(args.b, "--b", device)
        member_b = args.member_b if args.member_b is not None else (1 if same and run_a.task.ensemble_size > 1 else 0)
        view_b = member_view(run_b, member_b, "--member-b")
        landscape.check_same_shapes(view_a.params, view_b.params, ("--a", "--b"))
    data = evaluation_data(run_a, splits, args.size, args.batch_size, device)
    task = run_a.task
    bn_module = task.net if task.ensemble_size == 1 else None
    kwargs = dict(points=args.points, t_min=args.t_min, t_max=args.t_max, buffers=view_a.buffers, bn_module=bn_module)
    if landscape.batchnorm_layers(bn_module):  # statistics always come from the training set
        kwargs["bn_batches"] = data["train"] if "train" in data else evaluation_data(run_a, ["train"], args.size, args.batch_size, device)["train"]
    if args.bn_endpoints == "stored" and run_b is not None:
        kwargs["endpoint_buffers"] = (view_a.buffers, view_b.buffers)
    evaluations, arrays, title = {}, {}, ""
    if run_b is None:
        direction = load_direction(args.direction, view_a.params, args.seed)
        path = landscape.line(view_a.params, direction)
        title = f"line from {args.a} along {args.direction}"
        evaluations["line"] = landscape.evaluate_path(view_a.single_fn, path, data, task.loss_fn, progress=Progress(f"{prog} line"), **kwargs)
    else:
        differences = _data_differences(run_a, run_b)
        if differences:
            print(f"{prog}: note: --a and --b were trained on different data ({'; '.join(differences)}); evaluating on --a's")
        name_a = args.a + (f" member {args.member_a}" if run_a.task.ensemble_size > 1 else "")
        name_b = args.b + (f" member {member_b}" if run_b.task.ensemble_size > 1 else "")
        title = f"{name_a} (t=0) to {name_b} (t=1)"
        linear = landscape.linear_path(view_a.params, view_b.params)
        evaluations["linear"] = landscape.evaluate_path(view_a.single_fn, linear, data, task.loss_fn, progress=Progress(f"{prog} linear"), **kwargs)
        if args.path != "linear":
            curve = _curve(args, view_a, view_b, run_a, device, prog)
            evaluations[args.path] = landscape.evaluate_path(
                view_a.single_fn, curve, data, task.loss_fn, progress=Progress(f"{prog} {args.path}"), **kwargs
            )
            arrays["controls"] = curve.controls.cpu().numpy()
    write_outputs(args.out or default_out, evaluations, arrays, title, prog)
    return 0


def _curve(args: argparse.Namespace, view_a: FunctionalView, view_b: FunctionalView, run: Run, device: torch.device, prog: str) -> landscape.Path:
    if args.curve:
        if not os.path.isfile(args.curve):
            raise ConfigError(f"--curve: {args.curve} does not exist")
        with np.load(args.curve) as f:
            if "controls" not in f:
                raise ConfigError(f"--curve: {args.curve} holds no control points (write it with overparam connect)")
            controls = torch.as_tensor(f["controls"])
        N = sum(p.numel() for p in view_a.params.values())
        if controls.dim() != 2 or controls.shape[1] != N:
            raise ConfigError(f"--curve: control points of shape {tuple(controls.shape)} do not fit {N} parameters")
        return landscape.curve_path(view_a.params, view_b.params, args.path, middles=controls[1:-1].to(device))
    run.datamodule.setup()
    batches = run.datamodule.analysis_batches("train", size=args.size, batch_size=args.fit_batch_size, shard_across_ranks=False)
    batches = [(_cast(x, run.dtype, device), _cast(y, run.dtype, device)) for x, y in batches]
    bn_module = run.task.net if run.task.ensemble_size == 1 else None
    curve, history = landscape.fit_curve(
        view_a.single_fn, view_a.params, view_b.params, batches, run.task.loss_fn, kind=args.path,
        num_bends=args.bends, steps=args.steps, lr=args.lr, seed=args.seed, buffers=view_a.buffers, bn_module=bn_module,
        progress=Progress(f"{prog} fitting the {args.path} curve"),
    )
    print(f"fitted a {args.path} curve with {args.bends} bend(s): {args.steps} steps, loss {history[0]:.4g} -> {np.mean(history[-50:]):.4g} (mean of the last 50)")
    return curve


def write_outputs(out: str, evaluations: dict, arrays: dict, title: str, prog: str) -> None:
    """``curve.npz``, ``curve.png`` and ``barriers.json`` in ``out``; barrier heights printed."""
    os.makedirs(out, exist_ok=True)
    barriers = {}
    for label, ev in evaluations.items():
        prefix = "" if len(evaluations) == 1 or label != "linear" else "linear_"
        arrays.update(ev.arrays(prefix))
        if ev.t.min() <= 0 and ev.t.max() >= 1:
            barriers.update({f"{label}/{k}": v for k, v in ev.barriers().items()})
    np.savez(os.path.join(out, "curve.npz"), **arrays, **{f"barrier:{k}": v for k, v in barriers.items()})
    landscape.plot_path(evaluations, os.path.join(out, "curve.png"), title)
    with open(os.path.join(out, "barriers.json"), "w") as f:
        json.dump(barriers, f, indent=1)
    for label, ev in evaluations.items():
        for split in ev.loss:
            row = [f"{label:9s} {split:5s}", f"L(0)={_at(ev, split, 0.0)}", f"L(1)={_at(ev, split, 1.0)}"]
            if f"{label}/{split}/loss/barrier" in barriers:
                row += [f"barrier {barriers[f'{label}/{split}/loss/barrier']:.4g}", f"above chord {barriers[f'{label}/{split}/loss/barrier_linear']:.4g}",
                        f"error barrier {barriers[f'{label}/{split}/error/barrier']:.4g}"]
            print("  ".join(row))
    print(f"{prog}: wrote {os.path.join(out, 'curve.npz')}, curve.png, barriers.json")


def _at(ev: landscape.PathEvaluation, split: str, t: float) -> str:
    hit = (ev.t == t).nonzero()
    return f"{ev.loss[split][hit[0, 0]].item():.6g}" if len(hit) else "-"
