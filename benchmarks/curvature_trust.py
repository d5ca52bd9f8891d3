"""Are the curvature engine's defaults right, and how sure are they? Bottom-k and SLQ moments on trained nets.

The measurement behind ``lanczos.default_max_basis`` / ``default_max_steps`` and
``slq.DEFAULT_PROBES`` (issue 13), on three nets trained here on 2,048 MNIST digits (SGD, lr 0.05,
momentum 0.9, batch 64, 10 epochs, seed 0):

* MLP 784-100-100-10 (N = 89,610; the Hessian on 1,024 points),
* ConvNet width 16, depth 3 (N = 23,946; 512 points),
* the same with BatchNorm (N = 24,170; eval mode, 512 points).

For each: a float64 reference (Lanczos without restart to a relative residual of 1e-10), then
the bottom-10 and top-10 in float32 with the old fixed 40 steps and with the defaults (error
relative to |lambda_1|, converged flags, products), and the probe-to-probe relative standard
deviation of the SLQ moments tr(H^j)/N, j = 1..4 (``--probes`` probes of 5 steps: exact
quadrature for j <= 9), with the standard error it gives at 1, 10 and 20 probes.

    OVERPARAM_DATA_DIR=<root with MNIST/raw> python benchmarks/curvature_trust.py --threads 1
    # CPU, one thread: about 10 minutes (the two float64 CNN references take most of it)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from overparam.curvature import HessianOperator, eigsh, slq
from overparam.curvature.slq import probe_moments
from overparam.datasets import load_mnist
from overparam.functional import module_fn
from overparam.losses import cross_entropy
from overparam.models import ConvNet, FullyConnected

NETS = {
    "mlp": (lambda: FullyConnected(784, 10, width=[100, 100]), 1024),
    "cnn": (lambda: ConvNet(1, 10, width=16, depth=3), 512),
    "bn": (lambda: ConvNet(1, 10, width=16, depth=3, batch_norm=True), 512),
}


def mnist(n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of a seeded permutation of MNIST's training digits, normalised."""
    x, y = load_mnist(download=False)["train"]
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    return (x[idx].float() / 255 - 0.1307) / 0.3081, y[idx]


def train(make, x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = make()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=generator)
        for i in perm.split(64):
            optimizer.zero_grad()
            cross_entropy(net(x[i]), y[i]).backward()
            optimizer.step()
    return net.eval()


def operator(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> HessianOperator:
    params = {n: p.detach() for n, p in net.named_parameters()}
    batches = list(zip(x.split(256), y.split(256)))
    return HessianOperator(module_fn(net), params, cross_entropy, batches, buffers=dict(net.named_buffers()), dtype=dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="mlp,cnn,bn")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the 40-step runs warn: their flags are printed instead
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; the machine may be shared")
    x, y = mnist()
    for name in args.nets.split(","):
        make, points = NETS[name]
        net = train(make, x, y, args.epochs)
        H64, H = operator(net, x[:points], y[:points], torch.float64), operator(net, x[:points], y[:points], torch.float32)
        print(f"\n== {name}: N = {H.dim:,}, Hessian on {points} points ==")
        refs = {}
        for which in ("largest", "smallest"):
            start = time.perf_counter()
            refs[which] = eigsh(H64.matvec, H.dim, args.k, which, tol=1e-10, max_steps=700, max_basis=700,
                                dtype=torch.float64, eigenvectors=False)  # fmt: skip
            print(f"{which:8s} reference: {refs[which].num_matvecs} steps, {time.perf_counter() - start:.0f} s, "
                  f"all converged {bool(refs[which].converged.all())}")  # fmt: skip
        lam1 = max(abs(float(refs["largest"].eigenvalues[0])), abs(float(refs["smallest"].eigenvalues[0])))  # ||H||_2
        for which in ("smallest", "largest"):
            for label, kwargs in (("old 40 steps", {"max_steps": 40}), ("defaults", {})):
                start = time.perf_counter()
                r = eigsh(H.matvec, H.dim, args.k, which, eigenvectors=False, **kwargs)
                error = float((r.eigenvalues - refs[which].eigenvalues).abs().max()) / lam1
                print(f"{which:8s} {label:12s}: error / |lambda_1| {error:.1e}, converged {int(r.converged.sum())} of {args.k}, "
                      f"max relative residual {float(r.relative_residuals.max()):.1e}, {r.num_matvecs} products, "
                      f"{r.num_restarts} restarts, {time.perf_counter() - start:.1f} s")  # fmt: skip
        raw = slq(H.matvec, H.dim, num_probes=args.probes, num_steps=5, seed=0, dtype=H.dtype)
        samples = probe_moments(raw.nodes, raw.weights, [1, 2, 3, 4])  # (4, probes)
        sd = samples.std(-1) / samples.mean(-1).abs()
        print(f"SLQ moments 1-4, probe-to-probe relative SD over {args.probes} probes: {[round(float(v), 2) for v in sd]}")
        for n in (1, 10, 20):
            print(f"  relative SE with {n:2d} probes: {[round(float(v), 3) for v in sd / n**0.5]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
