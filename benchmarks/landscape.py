"""Landscape evaluations cost what their forward passes cost: a line (1D) and a plane (2D).

    python benchmarks/landscape.py [--points 25] [--device cpu|cuda] [--data-dir DIR]
                                   [--chunk 10000] [--repeats 3] [--points-per-call 5]
    python benchmarks/landscape.py --grid 21 --size 10000 [--points-per-call 1 7] [--reference-points 21]

Side by side on the same batches and network (MNIST-FC, 784-500-100-10, N = 443,610, the
``MnistFC`` default). A line (default):

* ``plain``: ``points`` times, a plain ``net(x)`` over every chunk with the same per-sample
  loss and 0/1-error sums (what 25 evaluations of the training loss cost anyway);
* ``landscape``: ``evaluate_path`` on the linear path between two networks, ``points``
  points (each point: form theta(t) = (1 - t) a + t b, then the same forward passes);
* ``landscape, vmapped``: the same with ``points_per_call`` points per vmapped call.

A plane (``--grid G``, the issue's 21 x 21 over 10,000 digits):

* ``plain``: G^2 times the plain pass above: the floor;
* ``surface``: ``overparam.planes.evaluate_plane`` on a filter-normalised plane, G x G points,
  for each ``--points-per-call``;
* ``one by one, resident``: per point, write theta + a d1 + b d2 into the net's parameters and
  evaluate the same resident chunks (the reference loop without its data loader);
* ``reference``: Li et al.'s ``plot_surface.py`` loop: per point, ``net_plotter.set_weights``
  (``p.data = w + a d1 + b d2``, parameter by parameter), then ``evaluation.eval_loss`` over a
  torchvision MNIST ``Dataset`` (``ToTensor``, ``Normalize``) and ``DataLoader`` at their
  defaults (batch 128, 2 workers, ``.item()`` per batch).

The two one-by-one loops are timed on ``--reference-points`` grid points and scaled to G^2 (every
point costs the same); the others run the whole grid.

Prints the best of ``repeats`` interleaved timings and the ratios to ``plain``. Uses the real MNIST
training set (``overparam.datasets.load_mnist``: ``--data-dir`` or ``$OVERPARAM_DATA_DIR``,
which must be writable for torchvision's extraction) and random inputs of the same shape
when it is not there (the timing does not depend on the pixel values; the ``reference`` loop
needs the real files).
"""

from __future__ import annotations

import argparse
import time

import torch

from overparam.errors import ConfigError
from overparam.functional import module_fn, unflatten
from overparam.landscape import evaluate_path, linear_path
from overparam.losses import cross_entropy, errors
from overparam.models import FullyConnected
from overparam.planes import axis, evaluate_plane, random_plane


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


@torch.no_grad()
def plain_passes(net: torch.nn.Module, batches: list, count: int) -> None:
    """``count`` evaluations of the loss and error sums: forward passes over every chunk."""
    device = batches[0][0].device
    sums = torch.zeros(count, 2, dtype=torch.float64, device=device)
    for i in range(count):
        for xb, yb in batches:
            out = net(xb)
            sums[i, 0] += cross_entropy(out, yb, reduction="sum").double()
            sums[i, 1] += errors(out, yb).sum().double()
    sums.cpu()


def line_benchmark(args: argparse.Namespace, batches: list, nets: list, device: torch.device) -> list[str]:
    a, b = (dict(net.named_parameters()) for net in nets)
    fn = module_fn(nets[0])

    def path(points_per_call: int):
        return lambda: evaluate_path(fn, linear_path(a, b), {"train": batches}, cross_entropy, points=args.points, points_per_call=points_per_call)

    # Interleaved repeats: load changes on a shared machine hit all three alike.
    t_plain = t_path = t_vmap = float("inf")
    for _ in range(args.repeats):
        t_plain = min(t_plain, timed(lambda: plain_passes(nets[0], batches, args.points), device, 1))
        t_path = min(t_path, timed(path(1), device, 1))
        t_vmap = min(t_vmap, timed(path(args.points_per_call[0]), device, 1))
    return [
        f"{args.points} points",
        f"plain: {args.points} x full-set forward + loss/error sums   {t_plain:8.3f} s   1.00",
        f"landscape: evaluate_path, 1 point per call            {t_path:8.3f} s   {t_path / t_plain:.2f}",
        f"landscape: evaluate_path, {args.points_per_call[0]} points per vmapped call   {t_vmap:8.3f} s   {t_vmap / t_plain:.2f}",
    ]


@torch.no_grad()
def one_by_one(net: torch.nn.Module, plane, points: list[tuple[float, float]], evaluate) -> None:
    """Li et al.'s loop: per point, ``net_plotter.set_weights`` then ``evaluate(net)``."""
    weights = unflatten(plane.origin, plane.like)
    d1, d2 = (unflatten(d, plane.like) for d in plane.directions)
    for a, b in points:
        for name, p in net.named_parameters():
            p.data = weights[name] + a * d1[name] + b * d2[name]
        evaluate(net)


def reference_loader(data_dir: str | None, size: int):
    """A torchvision MNIST training set with Li et al.'s kind of transforms, in their DataLoader."""
    from torchvision import datasets, transforms

    from overparam.datasets import resolve_data_dir

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train = datasets.MNIST(str(resolve_data_dir(data_dir)), train=True, download=False, transform=transform)
    subset = torch.utils.data.Subset(train, range(size))
    return torch.utils.data.DataLoader(subset, batch_size=128, shuffle=False, num_workers=2)  # their defaults


def eval_loss(net: torch.nn.Module, loader) -> tuple[float, float]:
    """Li et al.'s ``evaluation.eval_loss``: mean loss and accuracy, one ``.item()`` per batch."""
    correct = total_loss = total = 0
    for inputs, targets in loader:
        batch = inputs.size(0)
        total += batch
        outputs = net(inputs.reshape(batch, -1))
        total_loss += torch.nn.functional.cross_entropy(outputs, targets).item() * batch
        correct += outputs.argmax(1).eq(targets).sum().item()
    return total_loss / total, correct / total


def plane_benchmark(args: argparse.Namespace, batches: list, nets: list, device: torch.device) -> list[str]:
    net, G = nets[0], args.grid
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    plane = random_plane(params, seed=0)
    fn = module_fn(net)
    grid = [(a, b) for a in axis(G).tolist() for b in axis(G).tolist()]
    sample = grid[: args.reference_points]
    t_plain, t_surface = float("inf"), {k: float("inf") for k in args.points_per_call}
    for _ in range(args.repeats):  # interleaved: load changes on a shared machine hit all alike
        t_plain = min(t_plain, timed(lambda: plain_passes(net, batches, G * G), device, 1))
        for k in args.points_per_call:
            t_surface[k] = min(t_surface[k], timed(lambda: evaluate_plane(fn, plane, {"train": batches}, cross_entropy, points=G, points_per_call=k), device, 1))
    resident = timed(lambda: one_by_one(net, plane, sample, lambda n: plain_passes(n, batches, 1)), device, 1) * len(grid) / len(sample)
    rows = [
        f"{G} x {G} grid, filter-normalised plane",
        f"plain: {G * G} x forward over the set + loss/error sums    {t_plain:8.1f} s   1.00",
        *(f"surface: evaluate_plane, {k} point(s) per call           {t_surface[k]:8.1f} s   {t_surface[k] / t_plain:.2f}" for k in args.points_per_call),
        f"one by one, resident chunks ({len(sample)} points x {len(grid) / len(sample):.0f})   {resident:8.1f} s   {resident / t_plain:.2f}",
    ]
    if device.type == "cpu" and not args.no_reference:
        loader = reference_loader(args.data_dir, args.size)
        reference = timed(lambda: one_by_one(net, plane, sample, lambda n: eval_loss(n, loader)), device, 1) * len(grid) / len(sample)
        rows.append(f"reference: set_weights + DataLoader ({len(sample)} points x {len(grid) / len(sample):.0f})  {reference:8.1f} s   {reference / t_plain:.2f}")
        best = min(t_surface.values())
        rows.append(f"surface vs reference: {reference / best:.1f}x faster; vs one by one on resident chunks: {resident / best:.2f}x")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=25)
    parser.add_argument("--grid", type=int, default=None, help="a G x G plane instead of a line")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--chunk", type=int, default=10_000, help="evaluation batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--points-per-call", type=int, nargs="+", default=[5], help="vmapped points per call (a plane: each value in turn)")
    parser.add_argument("--reference-points", type=int, default=21, help="grid points the one-by-one loops are timed on")
    parser.add_argument("--no-reference", action="store_true", help="skip the DataLoader reference loop")
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
    N = sum(p.numel() for p in nets[0].parameters())
    with torch.no_grad():
        nets[0](batches[0][0])  # warm-up (allocator, kernels)
    rows = (plane_benchmark if args.grid else line_benchmark)(args, batches, nets, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{source}, first {len(x):,} points, MLP 784-500-100-10 (N = {N:,}), {rows[0]}, chunks of {args.chunk}, {name}, torch {torch.__version__}")
    print("\n".join(rows[1:]))


if __name__ == "__main__":
    main()
