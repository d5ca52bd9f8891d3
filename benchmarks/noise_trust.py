"""How sure are GradientNoise's estimates? Their standard errors against repeated measurement on MNIST nets.

The measurement behind ``noise.noise_scale`` and ``noise.tail_index``'s uncertainties (issue 13):

* **B_simple** along real SGD trajectories: MLP 784-``--width``-10 on ``--points`` MNIST digits,
  SGD lr 0.1, batch ``--batch``, ``--epochs`` epochs, every step measured on one device
  (per-sample gradients, ``small_batch = 1``), as ``GradientNoise`` does. At every step also the
  truth the estimate is unbiased for, from per-sample gradients of all P points: a batch drawn
  without replacement gives ``E tr(Sigma)^ = S_P = sum_i |g_i - G|^2 / (P - 1)`` and
  ``E |G|^2^ = |G|^2 - S_P / P``. Per epoch the target is ``B* = mean_t S*_t / mean_t G2*_t``;
  the script counts how often ``B_simple +- 1`` and ``1.96 SE`` cover it over seeds x epochs,
  for the SE used (successive differences) and for the sample-variance SE, and prints the
  lag-1 autocorrelation of the per-step errors (the SE assumes it is ~0).
* **alpha** at one trained point: MnistFC 784-500-100-10 trained ``--alpha-epochs`` epochs on
  the 4,096-digit analysis subset (SGD lr 0.1, batch 128); ``--redraws`` independent draws of
  ``--minibatches`` minibatches of 128, each giving alpha with its interval. The redraw-to-redraw
  standard deviation is what the SE should predict; coverage counts how often each draw's
  interval holds the mean over all draws (the estimator's expectation at this point; its own
  error, SD / sqrt(redraws), is small beside one draw's). Both for the minibatch-cluster SE
  used and for the i.i.d.-block SE that ignores the minibatches.

    OVERPARAM_DATA_DIR=<root with MNIST/raw> python benchmarks/noise_trust.py --threads 1
    # CPU, one thread: about 15 minutes at the defaults
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from overparam.datasets import load_mnist
from overparam.functional import module_fn
from overparam.losses import cross_entropy
from overparam.models import FullyConnected
from overparam.noise import gradient_noise_samples, noise_scale, per_sample_moments, tail_index, tail_indices


def mnist(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of a seeded permutation of MNIST's training digits, normalised and flattened."""
    x, y = load_mnist(download=False)["train"]
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    return ((x[idx].float() / 255 - 0.1307) / 0.3081).flatten(1), y[idx]


def coverage(z: torch.Tensor) -> str:
    return f"+-1 SE {float((z.abs() <= 1).double().mean()):.0%}, +-1.96 SE {float((z.abs() <= 1.96).double().mean()):.0%}"


def finite_population_truth(sum_g: torch.Tensor, sq_sum: torch.Tensor, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E |G|^2^, E tr(Sigma)^)`` of the per-sample two-batch estimates on a batch drawn without
    replacement from M points whose gradients sum to ``sum_g`` with squared norms summing to ``sq_sum``."""
    G2 = (sum_g / M).square().sum()
    S = (sq_sum - M * G2) / (M - 1)
    return G2 - S / M, S


def noise_scale_runs(x, y, seeds: int, epochs: int, width: int, batch: int) -> None:
    P = x.shape[0]
    rows, errors = [], []  # per (seed, epoch): (B, se, se_iid, B*, B* of all P, relative SE of G2); per-step errors
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = FullyConnected(784, 10, width=[width])
        fn, optimizer = module_fn(net), torch.optim.SGD(net.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(1000 + seed)
        for _ in range(epochs):
            estimates, truths, full_truths = [], [], []
            perm = torch.randperm(P, generator=generator)
            for start in range(0, P, batch):
                idx, unseen, seen = perm[start : start + batch], perm[start:], perm[:start]
                params = {n: p.detach() for n, p in net.named_parameters()}
                estimates.append(per_sample_moments(fn, params, {}, cross_entropy, x[idx], y[idx]).estimates()[:2])
                # The step's batch is drawn from the points not yet seen this epoch: the estimate's
                # expectation given the past is over those (finite population, no replacement).
                u = per_sample_moments(fn, params, {}, cross_entropy, x[unseen], y[unseen], chunk=256)
                truths.append(finite_population_truth(u.sum_g, u.small_sq_sum, len(unseen)))
                sum_g, sq = u.sum_g, u.small_sq_sum
                if start:
                    s = per_sample_moments(fn, params, {}, cross_entropy, x[seen], y[seen], chunk=256)
                    sum_g, sq = sum_g + s.sum_g, sq + s.small_sq_sum
                full_truths.append(finite_population_truth(sum_g, sq, P))
                optimizer.zero_grad()
                cross_entropy(net(x[idx]), y[idx]).backward()
                optimizer.step()
            G2, S = (torch.stack(v)[None] for v in zip(*estimates))  # (1, n)
            G2_true, S_true = (torch.stack(v) for v in zip(*truths))
            G2_all, S_all = (torch.stack(v) for v in zip(*full_truths))
            e = noise_scale(G2, S)
            B_true = float(S_true.mean() / G2_true.mean())
            W = (S - e.B_simple[:, None] * G2) / e.G2[:, None]
            rows.append((float(e.B_simple[0]), float(e.B_simple_se[0]), float(W.std() / W.shape[-1] ** 0.5), B_true,
                         float(S_all.mean() / G2_all.mean()), float(e.G2_se[0] / e.G2[0])))  # fmt: skip
            err = ((S[0] - B_true * G2[0]) - (S_true - B_true * G2_true))[:-1]  # the last step's is 0: its batch is all unseen points
            errors.append(err / err.std())
        print(f"  seed {seed}: per epoch B* {[round(r[3], 1) for r in rows[-epochs:]]} (all P points: "
              f"{[round(r[4], 1) for r in rows[-epochs:]]}), B_simple {[f'{r[0]:.1f}+-{r[1]:.1f}' for r in rows[-epochs:]]}",
              flush=True)  # fmt: skip
    t = torch.tensor(rows, dtype=torch.float64)
    B, se, se_iid, B_true, B_all, rel = t.unbind(1)
    print(f"B_simple, {len(rows)} epochs ({seeds} seeds x {epochs}), {math.ceil(P / batch)} measured steps each; "
          f"coverage of B* (the estimate's expectation given the trajectory):")  # fmt: skip
    print(f"  successive-difference SE (used): {coverage((B - B_true) / se)}")
    print(f"  sample-variance SE:              {coverage((B - B_true) / se_iid)}")
    epoch = torch.arange(len(rows)) % epochs
    for k in range(epochs):
        sel = epoch == k
        print(f"  epoch {k}: used SE {coverage(((B - B_true) / se)[sel])}; sample-variance SE {coverage(((B - B_true) / se_iid)[sel])}")
    for lo, hi in ((0, 0.2), (0.2, 0.35), (0.35, 0.5), (0.5, math.inf)):
        sel = (rel > lo) & (rel <= hi)
        if sel.any():
            print(f"  relative SE of |G|^2 in ({lo}, {hi}]: {int(sel.sum())} epochs, used SE {coverage(((B - B_true) / se)[sel])}")
    e = torch.stack(errors)
    print(f"  lag-1 autocorrelation of the per-step errors: {float((e[:, 1:] * e[:, :-1]).mean()):+.3f} "
          f"(+- {1 / math.sqrt(e[:, 1:].numel()):.3f} if uncorrelated)")  # fmt: skip
    print(f"  median relative SE of B_simple {float((se / B).median()):.1%}; mean SE / RMS error "
          f"{float(se.mean() / (B - B_true).square().mean().sqrt()):.2f}")  # fmt: skip
    print(f"  B* over the unseen points / B* over all P points, median per epoch: {float((B_true / B_all).median()):.2f} "
          f"(range {float((B_true / B_all).min()):.2f}-{float((B_true / B_all).max()):.2f})")  # fmt: skip


def tail_index_redraws(x, y, redraws: int, minibatch_counts: list[int], epochs: int, b: int = 128) -> None:
    torch.manual_seed(0)
    net = FullyConnected(784, 10, width=[500, 100])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=generator).split(b):
            optimizer.zero_grad()
            cross_entropy(net(x[idx]), y[idx]).backward()
            optimizer.step()
    fn, params = module_fn(net), {n: p.detach() for n, p in net.named_parameters()}
    full = list(zip(x.split(1024), y.split(1024)))
    P = x.shape[0]
    for M in minibatch_counts:
        draws = {}  # name -> list of (alpha, se_cluster, lo, hi, lo68, hi68), "pooled" also iid
        start = time.perf_counter()
        for r in range(redraws):
            generator = torch.Generator().manual_seed(104729 + r)
            minibatches = [[(x[i], y[i])] for i in (torch.randperm(P, generator=generator)[:b] for _ in range(M))]
            noise = gradient_noise_samples(fn, params, {}, cross_entropy, full, P, minibatches, b)
            pooled, layers = tail_indices(noise)
            iid = tail_index(torch.cat([noise[n].reshape(-1) for n in sorted(noise)]))
            for name, a in {"pooled": pooled, "pooled, i.i.d. SE": iid, **layers}.items():
                if math.isfinite(a.alpha):
                    draws.setdefault(name, []).append((a.alpha, a.alpha**2 * a.inv_alpha_se, *a.interval(0.95), *a.interval(0.68)))
        print(f"alpha, {M} minibatches of {b}, {redraws} redraws at one point ({time.perf_counter() - start:.0f} s):")
        for name, rows in draws.items():
            t = torch.tensor(rows, dtype=torch.float64)
            alpha, se, lo, hi, lo68, hi68 = t.unbind(1)
            truth = alpha.mean()
            cov95 = float(((lo <= truth) & (truth <= hi)).double().mean())
            cov68 = float(((lo68 <= truth) & (truth <= hi68)).double().mean())
            print(f"  {name:18s} mean {float(truth):.3f}, SD over redraws {float(alpha.std()):.4f}, RMS stated SE "
                  f"{float(se.square().mean().sqrt()):.4f}; the mean inside 68% interval {cov68:.0%}, 95% {cov95:.0%}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["B_simple", "alpha"], default=None)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--points", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--redraws", type=int, default=60)
    parser.add_argument("--minibatches", default="16,32")
    parser.add_argument("--alpha-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; the machine may be shared")
    if args.only in (None, "B_simple"):
        x, y = mnist(args.points)
        noise_scale_runs(x, y, args.seeds, args.epochs, args.width, args.batch)
    if args.only in (None, "alpha"):
        x, y = mnist(4096)
        tail_index_redraws(x, y, args.redraws, [int(m) for m in args.minibatches.split(",")], args.alpha_epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
