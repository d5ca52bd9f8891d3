"""SharpnessTracker's cost on MNIST-FC training, side by side, and the accuracy of what it tracks.

Issue 17's benchmark: MNIST-FC (``configs/mnist_fc.yaml``: 784-500-100-10, N = 443,610, SGD lr
0.05, momentum 0.9, weight decay 5e-4, batch 128) trained through the Trainer on ``--n-train``
digits for ``--epochs`` epochs,

* ``plain``: without callbacks;
* ``tracked``: with ``SharpnessTracker(every_n_steps=16, top_k=1)`` on a fixed 1,024-point
  analysis subset (the defaults: tol 1e-2, warm starts, ``hvp_mode="auto"``);

alternating ``plain, tracked`` ``--repeats`` times (the shared machine's load drifts), each run
timed by wall clock and by this process's CPU time. Then one more tracked run (untimed) that also
computes, at every ``--check-every``-th measurement, lambda_1 by a cold float64 Lanczos (relative
residual 1e-10) on the same parameters: training is untouched by the tracker (tested bit for bit),
so its values are those of the timed runs (to float32 round-off: the timed run's first products
went through both HVP paths while ``auto`` chose). Printed: the time ratio tracked / plain, the products
(HVPs) per measurement, first and after, the seconds per measurement and per HVP, and each
checked lambda_1 with its relative error and Ritz residual.

Cockpit's figures for comparison (its docs): the top-eigenvalue instrument costs 21x a plain step
when run every step and 2.3x at every 16 steps.

``--variants``: the measurement behind the warm start and ``TRACK_TOL`` instead. A hand-written
loop trains the same net the same way (SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 128, a
seeded ``--n-train`` subset, Hessian on its first 1,024 points) and every ``--every`` steps runs,
for each start and tol in 1e-2, 1e-3, 1e-4, its own chain of top-1 measurements: ``cold`` (a
seeded Gaussian start), ``warm`` (``track_top_k``: the previous Ritz vector + 0.1 of a random unit
vector), ``warm0`` (the previous Ritz vector alone) and ``gradient`` (the analysis set's gradient,
which full-batch and SGD dynamics keep in the top subspace, Gur-Ari et al. 2018), against a float64
reference top-10 (relative residual 1e-10). Printed: the mean products after the first and the
largest relative error per chain, and how much of the new top eigenvector lies in the span of the
previous reference top-1, -3 and -10 (what any block warm start from previous Ritz vectors can
reach at best).

    OVERPARAM_DATA_DIR=<root with MNIST/raw> python benchmarks/sharpness.py --threads 1   # CPU: ~2 min
    OVERPARAM_DATA_DIR=<root with MNIST/raw> python benchmarks/sharpness.py --threads 1 --variants   # ~10 min
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from overparam.callbacks import SharpnessTracker
from overparam.curvature import HessianOperator, eigsh, track_top_k
from overparam.datasets import load_mnist
from overparam.functional import module_fn
from overparam.losses import cross_entropy
from overparam.models import FullyConnected
from overparam.plugins.mnist_fc import MnistData, MnistFC

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


def make(args) -> tuple[MnistFC, MnistData]:
    data = MnistData(n_train=args.n_train, n_test=1000, batch_size=128, analysis_size=1024)
    task = MnistFC(width=[500, 100], input_shape=data.input_shape, num_outputs=data.num_outputs, num_train=data.num_train,
                   lr=0.05, momentum=0.9, weight_decay=5e-4)  # fmt: skip
    return task, data


class CheckedTracker(SharpnessTracker):
    """The tracker plus, at every ``check_every``-th measurement, a cold float64 reference (untimed runs only)."""

    def __init__(self, check_every: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.check_every, self.checks = check_every, []

    def _measure(self, trainer, pl_module, step) -> None:
        super()._measure(trainer, pl_module, step)
        if (len(self.history) - 1) % self.check_every:
            return
        view = pl_module.functional_view()
        batches = trainer.datamodule.analysis_batches()
        H = HessianOperator.from_view(view, pl_module.loss_fn, batches, dtype=torch.float64, hvp_mode="double_backward")
        ref = eigsh(H.matvec, H.dim, 1, tol=1e-10, dtype=torch.float64, warn=False)
        row = self.history[-1]
        self.checks.append({"step": step, "tracked": row["eigenvalues"][0], "reference": float(ref.eigenvalues[0]),
                            "relative_error": abs(row["eigenvalues"][0] - float(ref.eigenvalues[0])) / float(ref.eigenvalues[0]),
                            "relative_residual": row["residuals"][0], "hvps": row["hvps"], "warm": row["warm"]})


def fit(args, callbacks) -> tuple[float, float]:
    task, data = make(args)
    pl.seed_everything(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_epochs=args.epochs, callbacks=callbacks, logger=CSVLogger(tmp), accelerator="cpu",
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.fit(task, datamodule=data)
        return time.perf_counter() - wall, time.process_time() - cpu


def variants(args) -> None:
    """The ``--variants`` measurement (module docstring)."""
    x, y = load_mnist(download=False)["train"]
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[: args.n_train]
    x, y = ((x[idx].float() / 255 - 0.1307) / 0.3081).flatten(1), y[idx]
    batches = [(x[:1024], y[:1024])]
    torch.manual_seed(0)
    net = FullyConnected(784, 10, width=[500, 100])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    fn, generator = module_fn(net), torch.Generator().manual_seed(1)
    starts, tols = ("cold", "warm", "warm0", "gradient"), (1e-2, 1e-3, 1e-4)
    previous: dict = {}
    products: dict = {(s, t): [] for s in starts for t in tols}
    errors: dict = {(s, t): [] for s in starts for t in tols}
    reference_before, contained = None, []
    steps = args.epochs * (args.n_train // 128)
    for t in range(steps + 1):
        if t % args.every == 0:
            params = dict(net.named_parameters())
            H = HessianOperator(fn, params, cross_entropy, batches, hvp_mode="double_backward")
            H64 = HessianOperator(fn, params, cross_entropy, batches, hvp_mode="double_backward", dtype=torch.float64)
            reference = eigsh(H64.matvec, H64.dim, 10, tol=1e-10, dtype=torch.float64, warn=False, max_steps=400)
            lam1, u1 = float(reference.eigenvalues[0]), reference.eigenvectors[:, 0]
            if reference_before is not None:
                c = reference_before.eigenvectors.T @ u1
                contained.append([float(c[:b].square().sum()) for b in (1, 3, 10)])
            reference_before = reference
            gradient = H.loss_and_gradient()[1]
            for start in starts:
                for tol in tols:
                    key, kw = (start, tol), dict(tol=tol, warn=False, seed=t)
                    before = previous.get(key)
                    if start in ("cold", "warm") or before is None:
                        result = track_top_k(H.matvec, H.dim, 1, before if start == "warm" else None, **kw).result
                    else:
                        v0 = before.eigenvectors[:, 0] if start == "warm0" else gradient
                        result = eigsh(H.matvec, H.dim, 1, v0=v0, **kw)
                    previous[key] = result
                    if t > 0:
                        products[key].append(result.num_matvecs)
                        errors[key].append(abs(float(result.eigenvalues[0]) - lam1) / lam1)
            print(f"step {t}: lambda_1 {lam1:.4f}, lambda_2 / lambda_1 {float(reference.eigenvalues[1]) / lam1:.3f}", flush=True)
        if t == steps:
            break
        i = torch.randint(0, args.n_train, (128,), generator=generator)
        optimizer.zero_grad()
        cross_entropy(net(x[i]), y[i]).backward()
        optimizer.step()
    for (start, tol), hvps in products.items():
        print(f"{start:8s} tol {tol:g}: {sum(hvps) / len(hvps):.2f} products after the first (max {max(hvps)}), "
              f"largest relative error {max(errors[(start, tol)]):.1e}", flush=True)
    for b, share in zip((1, 3, 10), zip(*contained)):
        print(f"new top eigenvector in the previous top-{b} span: {min(share):.2f}-{max(share):.2f} (median {sorted(share)[len(share) // 2]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-train", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--check-every", type=int, default=3)
    parser.add_argument("--variants", action="store_true", help="warm-start variants instead of the timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.variants:
        return variants(args)
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "tracked": []}
    tracker = None
    for _ in range(args.repeats):
        times["plain"].append(fit(args, []))
        tracker = SharpnessTracker(every_n_steps=args.every, plot=False)
        times["tracked"].append(fit(args, [tracker]))
        print({k: [f"{w:.1f} s wall, {c:.1f} s CPU" for w, c in v] for k, v in times.items()}, flush=True)
    hvps = [r["hvps"] for r in tracker.history]
    best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in times.items()}
    measurements = len(hvps)
    extra_wall = best["tracked"][0] - best["plain"][0]
    result = {
        "load_average_end": round(os.getloadavg()[0], 1),
        "steps": args.epochs * (args.n_train // 128), "measurements": measurements,
        "ratio_wall": best["tracked"][0] / best["plain"][0], "ratio_cpu": best["tracked"][1] / best["plain"][1],
        "plain_s": best["plain"], "tracked_s": best["tracked"],
        "hvps_first": hvps[0], "hvps_mean_after_first": sum(hvps[1:]) / max(len(hvps) - 1, 1), "hvps": hvps,
        "seconds_per_measurement": extra_wall / measurements, "seconds_per_hvp": extra_wall / sum(hvps),
    }
    print(json.dumps(result, indent=1), flush=True)
    # The HVP path the timed run chose, so the checked run computes the same products.
    checked = CheckedTracker(args.check_every, every_n_steps=args.every, plot=False, hvp_mode=tracker._resolved_mode)
    fit(args, [checked])
    # Not bit-identical: ``auto`` computed the timed run's first products by both paths while choosing.
    diff = max(abs(a["eigenvalues"][0] - b["eigenvalues"][0]) / abs(b["eigenvalues"][0]) for a, b in zip(checked.history, tracker.history))
    print(f"checked run: tracked values within {diff:.1e} (relative) of the timed run's", flush=True)
    for row in checked.checks:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
