"""A 25-point line over the full MNIST training set costs about 25 forward passes.

    python benchmarks/landscape.py [--points 25] [--device cpu|cuda] [--data-dir DIR]
                                   [--chunk 10000] [--repeats 3] [--points-per-call 5]

Side by side on the same batches and network (MNIST-FC, 784-500-100-10, N = 443,610, the
``MnistFC`` default):

* ``plain``: ``points`` times, a plain ``net(x)`` over every chunk with the same per-sample
  loss and 0/1-error sums (what 25 evaluations of the training loss cost anyway);
* ``landscape``: ``evaluate_path`` on the linear path between two networks, ``points``
  points (each point: form theta(t) = (1 - t) a + t b, then the same forward passes);
* ``landscape, vmapped``: the same with ``points_per_call`` points per vmapped call.

Prints the best of ``repeats`` interleaved timings and the ratios to ``plain``. Uses the real MNIST
training set (``overparam.datasets.load_mnist``: ``--data-dir`` or ``$OVERPARAM_DATA_DIR``,
which must be writable for torchvision's extraction) and random inputs of the same shape
when it is not there (the timing does not depend on the pixel values).
"""

from __future__ import annotations

import argparse
import time

import torch

from overparam.errors import ConfigError
from overparam.functional import module_fn
from overparam.landscape import evaluate_path, linear_path
from overparam.losses import cross_entropy, errors
from overparam.models import FullyConnected


def mnist_train(data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from overparam.datasets import load_mnist

        x, y = load_mnist(data_dir)["train"]  # extracts the .gz files offline when present
        return x.reshape(len(x), -1).float() / 255, y, "MNIST train (60,000)"
    except (ConfigError, ImportError) as exc:
        print(f"note: real MNIST unavailable ({str(exc)[:80]}...); random inputs of the same shape")
        generator = torch.Generator().manual_seed(0)
        return torch.rand(60_000, 784, generator=generator), torch.randint(10, (60_000,), generator=generator), "random (60,000 x 784)"


def timed(run, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--chunk", type=int, default=10_000, help="evaluation batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--points-per-call", type=int, default=5)
    parser.add_argument("--size", type=int, default=60_000, help="training points (fewer for a quick run on a busy CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)

    x, y, source = mnist_train(args.data_dir)
    x, y = x[: args.size].to(device), y[: args.size].to(device)
    batches = list(zip(x.split(args.chunk), y.split(args.chunk)))
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(FullyConnected(784, 10, [500, 100]).to(device).eval())
    a, b = (dict(net.named_parameters()) for net in nets)
    fn = module_fn(nets[0])
    N = sum(p.numel() for p in a.values())

    @torch.no_grad()
    def plain() -> None:
        sums = torch.zeros(args.points, 2, dtype=torch.float64, device=device)
        for i in range(args.points):
            for xb, yb in batches:
                out = nets[0](xb)
                sums[i, 0] += cross_entropy(out, yb, reduction="sum").double()
                sums[i, 1] += errors(out, yb).sum().double()
        sums.cpu()

    def path(points_per_call: int):
        return lambda: evaluate_path(fn, linear_path(a, b), {"train": batches}, cross_entropy, points=args.points, points_per_call=points_per_call)

    with torch.no_grad():
        nets[0](batches[0][0])  # warm-up (allocator, kernels)
    # Interleaved repeats: load changes on a shared machine hit all three alike.
    t_plain = t_path = t_vmap = float("inf")
    for _ in range(args.repeats):
        t_plain = min(t_plain, timed(plain, device, 1))
        t_path = min(t_path, timed(path(1), device, 1))
        t_vmap = min(t_vmap, timed(path(args.points_per_call), device, 1))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{source}, first {len(x):,} points, MLP 784-500-100-10 (N = {N:,}), {args.points} points, chunks of {args.chunk}, {name}, torch {torch.__version__}")
    print(f"plain: {args.points} x full-set forward + loss/error sums   {t_plain:8.3f} s   1.00")
    print(f"landscape: evaluate_path, 1 point per call            {t_path:8.3f} s   {t_path / t_plain:.2f}")
    print(f"landscape: evaluate_path, {args.points_per_call} points per vmapped call   {t_vmap:8.3f} s   {t_vmap / t_plain:.2f}")


if __name__ == "__main__":
    main()
