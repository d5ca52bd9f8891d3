"""K vmapped ensemble members in one Trainer vs K separate Trainer runs, side by side.

K = 16 fully connected 784-64-10 networks (N = 50,890 each) on MNIST-shaped random data
(device-resident, cross-entropy, SGD, batch 128). Both paths go through the Lightning
Trainer with the same Task class (``TeacherStudent`` builds ``FullyConnected`` on a
(1, 28, 28) input), so the ratio measures what ``ensemble_size: K`` buys in practice: one
vmapped forward/backward and one optimizer step per batch instead of K, and one pass of
Lightning's per-step overhead instead of K. Goal (issue 7): >= 5x for K = 16; measured on an
H100 by hand-written loops: 0.456 s vs 3.84 s per 60k epoch (8.4x).

    python benchmarks/ensemble.py                    # CPU, 6,000 points, 3 epochs
    python benchmarks/ensemble.py --points 60000 --device cuda

Prints the median epoch time of each path (epochs after the first, which pays warm-up) and
their ratio. Run on an idle machine: numbers from a shared one are noisy, only the ratio
measured in the same run is meaningful.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning.pytorch as pl
import torch

from overparam.data import OverparamDataModule
from overparam.plugins.teacher_student import TeacherStudent


class MnistShaped(OverparamDataModule):
    """Random (1, 28, 28) inputs and 10 random classes: the cost of MNIST without the files."""

    def __init__(self, points: int = 6000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.points = points

    input_shape = property(lambda self: (1, 28, 28))
    num_outputs = property(lambda self: 10)
    num_train = property(lambda self: self.points)

    def load_splits(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.points, 1, 28, 28, generator=g)
        y = torch.randint(10, (self.points,), generator=g)
        return {"train": (x, y), "test": (x[:1000], y[:1000])}


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self.start)


def epoch_time(K: int, init_seed: int, args: argparse.Namespace) -> float:
    """Median epoch time (after the first) of one Trainer run of a K-member task."""
    data = MnistShaped(points=args.points, batch_size=args.batch_size)
    task = TeacherStudent(width=64, depth=1, input_shape=(1, 28, 28), num_outputs=10, num_train=args.points,
                          loss="cross_entropy", lr=0.05, ensemble_size=K, init_seed=init_seed)
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator=args.device, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer], reload_dataloaders_every_n_epochs=1)
    trainer.fit(task, data)
    return statistics.median(timer.times[1:] or timer.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=16, help="K (default 16, the issue's goal)")
    parser.add_argument("--points", type=int, default=6000, help="training points per epoch (MNIST: 60000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not timed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    pl.seed_everything(0, verbose=False)
    vmapped = epoch_time(args.members, 0, args)
    sequential = [epoch_time(1, k, args) for k in range(args.members)]
    total = sum(sequential)
    print(f"device {args.device}, threads {torch.get_num_threads()}, K = {args.members}, P = {args.points}, batch {args.batch_size}")
    print(f"vmapped ensemble (one Trainer):      {vmapped:8.3f} s per epoch")
    print(f"{args.members} separate runs (one after another): {total:8.3f} s per epoch "
          f"(one run: median {statistics.median(sequential):.3f} s)")
    print(f"speed-up: {total / vmapped:.2f}x (goal >= 5x)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "device": args.device, "K": args.members, "points": args.points,
                       "vmapped_s": vmapped, "separate_s": total, "speedup": total / vmapped}, fh, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
