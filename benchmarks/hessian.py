"""Curvature benchmark: HVP paths vs a gradient, Lanczos top-1/top-5 vs PyHessian and curvlinops.

Side by side in one run, on one machine (issue 4):

1. time of one gradient and of one Hessian-vector product by each path (forward-over-reverse,
   double backward, and ``torch.compile``d forward-over-reverse with ``--compile``), and the ratio
   HVP / gradient;
2. time and accuracy of the top-1 and top-5 eigenvalues by our Lanczos (float32, full
   reorthogonalisation, ``--tol 1e-4``: every value within 1e-6 relative of the reference) against
   a float64 reference (our Lanczos in float64 to a 1e-9 residual), the products counted and the
   time spent outside them, and the same for PyHessian 0.1 (power iteration with deflation, its
   defaults) and curvlinops (SciPy ``eigsh`` on its operator, tol 1e-3). Our operator is built
   once: the top-1 run pays for choosing the HVP path and building the kept gradient graph.

The baselines are not dependencies of overparam: they run in a separate virtual environment
(``--baseline-python``, default ``/work/venv-bench/bin/python`` when it exists; made with
``python -m venv /work/venv-bench && /work/venv-bench/bin/pip install torch==2.14.1 pyhessian==0.1
curvlinops-for-pytorch``) as a subprocess that loads the same weights and data from a file.
Without it the baseline rows are skipped.

Models: the MLP 784-500-300-10 (N = 545,810) on 2,048 samples, and a CNN on 28x28 inputs
(N = 149,418 on ``--cnn-batch`` = 256 samples; ``--full``: N = 1,199,882 on 512, long on a CPU). Data are Gaussian inputs with random labels (timing and accuracy do not need MNIST).

    python benchmarks/hessian.py --threads 1    # CPU: about 2 minutes (one thread: a shared CPU
                                                # makes 2 OpenMP threads 10-25x slower)
    python benchmarks/hessian.py --compile      # + torch.compile (slow to build on CPU)
    python benchmarks/hessian.py --device cuda --full --compile
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

DEFAULT_BASELINE_PYTHON = "/work/venv-bench/bin/python"


# --- models: plain torch.nn, so the baseline venv can build them without overparam ----------------
def build_mlp() -> nn.Module:
    """784-500-300-10 ReLU MLP: N = 785*500 + 501*300 + 301*10 = 545,810."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 300), nn.ReLU(), nn.Linear(300, 10))


def build_cnn(full: bool) -> nn.Module:
    """conv-conv-pool CNN on 1x28x28: 8/16 channels, fc 64 -> N = 149,418; ``full``: 32/64
    channels, fc 128 -> N = 1,199,882 (issue 4 does not give its N = 411,786 CNN's layers)."""
    c1, c2, hidden = (32, 64, 128) if full else (8, 16, 64)
    return nn.Sequential(
        nn.Conv2d(1, c1, 3), nn.ReLU(), nn.Conv2d(c1, c2, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 12 * 12, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    )  # fmt: skip


def make_problem(name: str, full: bool, cnn_batch: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    if name == "mlp":
        net, x = build_mlp(), torch.randn(2048, 1, 28, 28)
    else:
        net, x = build_cnn(full), torch.randn(512 if full else cnn_batch, 1, 28, 28)
    y = torch.randint(0, 10, (x.shape[0],))
    return net.to(device), x.to(device), y.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(call, device: str, repeats: int = 3) -> tuple[float, object]:
    """Best of ``repeats`` wall times (after a warm-up call) and the last result."""
    out = call()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


# --- baselines (run inside the baseline venv) -------------------------------------------------------
def baseline_worker(state_path: str, out_path: str) -> None:
    """PyHessian and curvlinops on the saved problem; writes times and eigenvalues as JSON."""
    state = torch.load(state_path)
    torch.set_num_threads(state["threads"])
    net = build_mlp() if state["model"] == "mlp" else build_cnn(state["full"])
    net.load_state_dict(state["weights"])
    x, y = state["x"], state["y"]
    results: dict = {}
    criterion = nn.CrossEntropyLoss()
    try:
        from pyhessian import hessian as pyhessian_hessian

        for k in (1, 5):
            start = time.perf_counter()
            # PyHessian's defaults: maxIter=100, tol=1e-3 (relative change of the eigenvalue).
            values, _ = pyhessian_hessian(net, criterion, data=(x, y), cuda=False).eigenvalues(top_n=k)
            results[f"pyhessian_top{k}"] = {"seconds": time.perf_counter() - start, "eigenvalues": [float(v) for v in values]}
    except Exception as exc:  # report, do not hide
        results["pyhessian_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import LinearOperator, eigsh

        params = [p for p in net.parameters() if p.requires_grad]
        for k in (1, 5):
            start = time.perf_counter()
            H = HessianLinearOperator(net, criterion, params, [(x, y)], check_deterministic=False).to_scipy()
            count = [0]

            def counted(v, H=H, count=count):
                count[0] += 1
                return H @ v

            op = LinearOperator(H.shape, matvec=counted, dtype=H.dtype)
            values = eigsh(op, k=k, which="LA", tol=1e-3, return_eigenvectors=False)  # tol as ours
            results[f"curvlinops_top{k}"] = {
                "seconds": time.perf_counter() - start,
                "eigenvalues": sorted(map(float, values), reverse=True),
                "matvecs": count[0],
            }
    except Exception as exc:
        results["curvlinops_error"] = f"{type(exc).__name__}: {exc}"
    with open(out_path, "w") as f:
        json.dump(results, f)


def run_baselines(python: str, net: nn.Module, x, y, name: str, full: bool, threads: int) -> dict:
    if not python or not os.path.exists(python):
        return {"skipped": f"no baseline venv at {python!r}"}
    with tempfile.TemporaryDirectory() as tmp:
        state_path, out_path = os.path.join(tmp, "state.pt"), os.path.join(tmp, "out.json")
        weights = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save({"model": name, "full": full, "weights": weights, "x": x.cpu(), "y": y.cpu(), "threads": threads}, state_path)
        proc = subprocess.run([python, os.path.abspath(__file__), "--baseline-worker", state_path, out_path], capture_output=True, text=True)
        if proc.returncode != 0:
            return {"skipped": f"baseline worker failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"}
        with open(out_path) as f:
            return json.load(f)


# --- our engine ---------------------------------------------------------------------------------------
def bench_model(name: str, args) -> dict:
    from overparam.curvature import HessianOperator, eigsh
    from overparam.curvature.hvp import make_batch_hvp
    from overparam.functional import flatten, module_fn
    from overparam.losses import cross_entropy

    device = args.device
    net, x, y = make_problem(name, args.full, args.cnn_batch, device)
    fn = module_fn(net)
    params = {n: p.detach() for n, p in net.named_parameters()}
    N = sum(p.numel() for p in params.values())
    print(f"\n== {name.upper()}: N = {N:,}, {x.shape[0]} samples, device {device}, {torch.get_num_threads()} threads ==")

    # 1. gradient and HVP paths
    def batch_loss(p, xb, yb):
        return cross_entropy(fn(p, {}, xb), yb, reduction="sum")

    grad_fn = torch.func.grad(batch_loss)
    t_grad, _ = timed(lambda: grad_fn(params, x, y), device)

    def autograd_grad():
        net.zero_grad(set_to_none=True)
        cross_entropy(net(x), y, reduction="sum").backward()

    t_grad_autograd, _ = timed(autograd_grad, device)
    v = {n: torch.randn_like(p) for n, p in params.items()}
    print(f"gradient: torch.func {t_grad * 1e3:8.1f} ms | autograd .backward() {t_grad_autograd * 1e3:8.1f} ms (ratios below: vs the faster)")
    t_grad = min(t_grad, t_grad_autograd)
    modes = ["forward_over_reverse", "double_backward"] + (["compiled"] if args.compile else [])
    hvps, hvp_ratios = {}, {}
    for mode in modes:
        hvp = make_batch_hvp(batch_loss, mode)
        start = time.perf_counter()
        hvp(params, v, x, y)  # the first product: compiles (compiled), builds the kept graph (double_backward)
        _sync(device)
        first = time.perf_counter() - start
        seconds, hv = timed(lambda: hvp(params, v, x, y), device)
        hvps[mode] = flatten(hv)
        fell_back = f" (compile failed, eager: {str(hvp.failed)[:80]})" if getattr(hvp, "failed", None) else ""
        hvp_ratios[mode] = seconds / t_grad
        print(f"HVP {mode:21s} {seconds * 1e3:8.1f} ms = {seconds / t_grad:5.2f} x gradient "
              f"(first product {first * 1e3:.1f} ms){fell_back}")  # fmt: skip
    ref_hv = next(iter(hvps.values()))
    for mode, hv in hvps.items():
        assert torch.allclose(hv, ref_hv, rtol=1e-3, atol=1e-5 * float(ref_hv.abs().max())), f"{mode} disagrees"
    result = {"N": N, "samples": x.shape[0], "gradient_s": t_grad, "hvp_over_gradient": hvp_ratios}
    if args.hvp_only:
        return result

    # 2. top-1 / top-5: float64 reference, then ours in float32 and the baselines
    batches = [(x, y)]
    start = time.perf_counter()
    H64 = HessianOperator(fn, params, cross_entropy, batches, dtype=torch.float64, hvp_mode="double_backward")
    reference = eigsh(H64.matvec, N, k=5, tol=1e-9, max_steps=args.reference_steps, dtype=torch.float64, device=device)
    _sync(device)
    print(f"reference (float64 Lanczos, {reference.num_matvecs} steps, {time.perf_counter() - start:.1f} s): "
          f"{[round(float(v), 6) for v in reference.eigenvalues]}, max relative Ritz residual "
          f"{float(reference.residuals.max() / reference.eigenvalues[0]):.1e}")  # fmt: skip
    ref = reference.eigenvalues.tolist()
    rows = {}
    H = HessianOperator(fn, params, cross_entropy, batches, hvp_mode="auto", compile=args.compile)
    inside = [0.0]

    def matvec(vector):  # H.matvec, timing the seconds spent inside the products
        start = time.perf_counter()
        out = H.matvec(vector)
        _sync(device)
        inside[0] += time.perf_counter() - start
        return out

    for k in (1, 5):
        inside[0] = 0.0
        start = time.perf_counter()
        ours = eigsh(matvec, N, k=k, tol=args.tol, dtype=H.dtype, device=device, max_steps=args.max_steps)
        _sync(device)
        rows[f"overparam_top{k}"] = {"seconds": time.perf_counter() - start, "eigenvalues": ours.eigenvalues.tolist(),
                                     "matvecs": ours.num_matvecs, "inside": inside[0]}  # fmt: skip
    baselines = run_baselines(args.baseline_python, net, x, y, name, args.full, torch.get_num_threads())
    rows.update({k: v for k, v in baselines.items() if isinstance(v, dict)})
    print(f"HVP path chosen by auto: {H.hvp_mode} (product times while choosing: "
          f"{', '.join(f'{m} {t * 1e3:.0f} ms' for m, t in H.hvp_timings.items())})")  # fmt: skip
    for k in (1, 5):
        row = rows[f"overparam_top{k}"]
        outside = row["seconds"] - row["inside"]
        print(f"overparam top-{k}: {row['matvecs']} HVPs, {row['inside']:.2f} s inside them "
              f"({row['inside'] / row['matvecs'] * 1e3:.0f} ms each), {outside:.2f} s outside ({outside / row['seconds']:.0%})")  # fmt: skip
    print(f"{'method':22s} {'seconds':>8s} {'vs ours':>8s}  {'max rel. error':>14s}  eigenvalues")
    for k in (1, 5):
        ours_seconds = rows[f"overparam_top{k}"]["seconds"]
        for method in ("overparam", "pyhessian", "curvlinops"):
            row = rows.get(f"{method}_top{k}")
            if row is None:
                continue
            values = row["eigenvalues"][:k]
            error = max(abs(a - b) / abs(b) for a, b in zip(values, ref[:k]))
            extra = f" ({row['matvecs']} HVPs)" if row.get("matvecs") else ""
            print(f"{method + f' top-{k}':22s} {row['seconds']:8.2f} {row['seconds'] / ours_seconds:7.2f}x  {error:14.2e}  "
                  f"{[round(v, 5) for v in values]}{extra}")  # fmt: skip
    for key, value in baselines.items():
        if not isinstance(value, dict):
            print(f"{key}: {value}")
    for k in (1, 5):
        ours_seconds = rows[f"overparam_top{k}"]["seconds"]
        for method in ("pyhessian", "curvlinops"):
            if f"{method}_top{k}" in rows:
                rows[f"{method}_top{k}"]["vs_ours"] = rows[f"{method}_top{k}"]["seconds"] / ours_seconds
        for row in (rows[f"{m}_top{k}"] for m in ("overparam", "pyhessian", "curvlinops") if f"{m}_top{k}" in rows):
            row["max_rel_error"] = max(abs(a - b) / abs(b) for a, b in zip(row["eigenvalues"][:k], ref[:k]))
    return {**result, "reference": ref, "hvp_mode": H.hvp_mode, "top_k": rows,
            "baseline_notes": {k: v for k, v in baselines.items() if not isinstance(v, dict)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--full", action="store_true", help="the issue's CNN (N = 411,786, 512 samples)")
    parser.add_argument("--cnn-batch", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd forward-over-reverse")
    parser.add_argument("--hvp-only", action="store_true", help="only part 1 (gradient and HVP timings)")
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="our Lanczos: relative Ritz residual to stop at (1e-4: every top-5 value within 1e-6 of the reference)")  # fmt: skip
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--reference-steps", type=int, default=80)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--baseline-python", default=DEFAULT_BASELINE_PYTHON)
    parser.add_argument("--baseline-worker", nargs=2, metavar=("STATE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.baseline_worker:
        baseline_worker(*args.baseline_worker)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; timings are best of 3 after a warm-up; the machine may be shared")
    results = {name.strip(): bench_model(name.strip(), args) for name in args.models.split(",")}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "device": args.device, "models": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
