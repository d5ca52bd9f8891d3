"""Training throughput: overparam's Trainer vs a hand-written resident loop vs a DataLoader loop.

Samples per second for one epoch of the same model, optimizer and data, side by side:

* ``overparam``: ``MnistFC``/``CifarCNN`` + ``MnistData``/``CifarData`` through a Lightning
  ``Trainer`` (no logger, no checkpoint, no analysis callbacks): blocks of optimizer steps per
  ``training_step`` (``overparam.data.STEPS_PER_BLOCK``), the Task's own per-step bookkeeping;
* ``lightning``: a bare ``LightningModule`` (``training_step`` = forward + loss, nothing
  logged, automatic optimisation) on the same resident batches: a plain Lightning loop;
* ``manual1``/``manual4``/``manual16`` (not by default): the bare module with manual
  optimisation and 1, 4 or 16 SGD steps per ``training_step`` (the design task.py adopted);
* ``resident``: a hand-written loop over the DataModule's device-resident tensors
  (``randperm``, index, forward, loss, backward, step);
* ``resident-graphs`` (GPU only, not by default): the same loop with its step captured once as a
  CUDA graph and replayed, the bound that Python dispatch cannot reach;
* ``dataloader``: the same loop fed by torchvision's ``MNIST``/``CIFAR10`` Dataset with
  ``ToTensor`` + ``Normalize`` (+ ``RandomCrop``/``RandomHorizontalFlip`` when augmenting)
  through a ``DataLoader`` (4 workers, pinned memory when on CUDA).

Every method runs ``--epochs`` epochs (default 2) and the last one is timed (the first warms
up allocators, kernels and caches); the DataLoader's epoch includes starting its workers, as
in real use. Ratios are to the resident loop (< 1: slower), by wall time and by this
process's CPU time (steadier on a shared machine; not meaningful for the DataLoader, whose
workers are other processes).

    python benchmarks/train_throughput.py                           # CPU: MNIST, CIFAR (subset)
    python benchmarks/train_throughput.py --device cuda --cifar-n-train 0   # GPU: full epochs
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from typing import Callable

import lightning.pytorch as pl
import torch
from torch import nn

from overparam.data import OverparamDataModule
from overparam.datasets import resolve_data_dir
from overparam.losses import get_loss
from overparam.plugins.cifar_cnn import CifarCNN, CifarData
from overparam.plugins.mnist_fc import MnistData, MnistFC
from overparam.task import Task

warnings.filterwarnings("ignore", ".*md5 check is off.*")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*across ranks is zero.*")


RESULTS: dict[str, dict] = {}  # per benchmark, for --json


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> tuple[float, float]:
    """(wall, this process's CPU) seconds, after the device has finished its queued work.

    On a shared machine the CPU time of a one-thread run is the steadier measure of the work
    a loop does (others' load stretches wall time); DataLoader workers' CPU time is in child
    processes, so compare the DataLoader by wall time.
    """
    sync(device)
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float], device: torch.device) -> tuple[float, float]:
    now = clock(device)
    return now[0] - start[0], now[1] - start[1]


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (from its first batch hook to its end hook)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = clock(pl_module.device)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(since(self._start, pl_module.device))


def optimizer_of(task: Task) -> torch.optim.Optimizer:
    return task.configure_optimizers()


def run_overparam(make: Callable[[], tuple[pl.LightningModule, OverparamDataModule]], device: torch.device, epochs: int) -> tuple[float, float]:
    task, data = make()
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator=device.type, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        reload_dataloaders_every_n_epochs=1, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(task, datamodule=data)
    return timer.times[-1]


class PlainBatches:
    """One epoch of ``(x, y)`` batches of a DataModule's resident training split (bare modules)."""

    def __init__(self, data: OverparamDataModule, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

    def __len__(self) -> int:
        return -(-self.data.split("train")[0].shape[0] // self.batch_size)

    def __iter__(self):
        x, y = self.data.split("train")
        order = torch.randperm(x.shape[0], device=x.device)
        return ((x[i], y[i]) for i in order.split(self.batch_size))


def run_bare(module: pl.LightningModule, data: OverparamDataModule, batch_size: int, device: torch.device, epochs: int) -> tuple[float, float]:
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator=device.type, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer],
    )  # fmt: skip
    data.trainer = trainer
    data.setup()  # resident on the Trainer's device (the Trainer would do it for a DataModule)
    trainer.fit(module, train_dataloaders=PlainBatches(data, batch_size))
    return timer.times[-1]


class BareModule(pl.LightningModule):
    """The least a LightningModule can do: forward, loss, the task's own optimizer."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.task = task
        self.net = task.net
        self.loss_fn = get_loss(task.loss_name)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return self.loss_fn(self.net(x).unsqueeze(0), y, reduction="none").mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=self.task.hparams.lr, momentum=self.task.hparams.momentum)


class ManualModule(BareModule):
    """Manual optimisation, ``steps`` SGD steps per ``training_step`` on consecutive sub-batches.

    The DataModule serves batches of ``steps * B``; each is cut into ``steps`` batches of B,
    so the SGD trajectory has the same number of steps of the same size, while the Trainer's
    per-call work (hooks, progress, closure) is paid once per ``steps`` steps.
    """

    def __init__(self, task: Task, steps: int) -> None:
        super().__init__(task)
        self.automatic_optimization = False
        self.steps = steps

    def training_step(self, batch, batch_idx: int) -> None:
        optimizer = self.optimizers()
        for x, y in zip(batch[0].chunk(self.steps), batch[1].chunk(self.steps)):
            loss = self.loss_fn(self.net(x).unsqueeze(0), y, reduction="none").mean()
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()


def run_lightning(make, device: torch.device, epochs: int, steps: int = 0) -> tuple[float, float]:
    task, data = make()
    module = ManualModule(task, steps) if steps else BareModule(task)
    return run_bare(module, data, data.batch_size * max(steps, 1), device, epochs)


def train_epoch(net: nn.Module, optimizer, loss_fn, batches) -> None:
    for x, y in batches:
        loss = loss_fn(net(x).unsqueeze(0), y, reduction="none").mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def run_resident_graphs(make, device: torch.device, epochs: int, batch_size: int) -> tuple[float, float]:
    """The hand-written loop with each full-size step captured once as a CUDA graph and replayed
    (PyTorch's "whole network capture"): the GPU bound that Python dispatch cannot reach."""
    if device.type != "cuda":
        raise SystemExit("resident-graphs needs --device cuda")
    task, data = make()
    data.setup()
    x, y = (t.to(device) for t in data.split("train"))
    net, optimizer, loss_fn = task.net.to(device), optimizer_of(task.to(device)), get_loss(task.loss_name)
    static_x, static_y = x[:batch_size].clone(), y[:batch_size].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net(static_x).unsqueeze(0), static_y, reduction="none").mean().backward()
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_fn(net(static_x).unsqueeze(0), static_y, reduction="none").mean().backward()
        optimizer.step()
    for _ in range(epochs):
        start = clock(device)
        order = torch.randperm(x.shape[0], device=device)
        for i in order.split(batch_size):
            if i.numel() == batch_size:
                static_x.copy_(x[i])
                static_y.copy_(y[i])
                graph.replay()
            else:  # the epoch's remainder: one eager step
                train_epoch(net, optimizer, loss_fn, [(x[i], y[i])])
        elapsed = since(start, device)
    return elapsed


def run_resident(make, device: torch.device, epochs: int, batch_size: int) -> tuple[float, float]:
    task, data = make()
    data.setup()  # trainer-less: CPU placement, then moved here (like the Trainer would)
    x, y = (t.to(device) for t in data.split("train"))
    net, optimizer, loss_fn = task.net.to(device), optimizer_of(task.to(device)), get_loss(task.loss_name)
    augment = getattr(data, "augment", False)
    from overparam.plugins.cifar_cnn import random_crop_flip

    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(epochs):
        start = clock(device)
        order = torch.randperm(x.shape[0], device=device)
        batches = ((x[i], y[i]) for i in order.split(batch_size))
        if augment:
            batches = ((random_crop_flip(xb, 4, generator), yb) for xb, yb in batches)
        train_epoch(net, optimizer, loss_fn, batches)
        elapsed = since(start, device)
    return elapsed


def torchvision_dataset(kind: str, root: str, augment: bool):
    from torchvision import datasets, transforms

    if kind == "mnist":
        steps = [transforms.ToTensor(), transforms.Normalize(MnistData.mean, MnistData.std)]
        return datasets.MNIST(root, train=True, download=False, transform=transforms.Compose(steps))
    steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    steps += [transforms.ToTensor(), transforms.Normalize(CifarData.mean, CifarData.std)]

    class Unverified(datasets.CIFAR10):  # the shared copy is re-encoded (see docs/data.md)
        def _check_integrity(self) -> bool:
            return True

    return Unverified(root, train=True, download=False, transform=transforms.Compose(steps))


def run_dataloader(make, kind: str, device: torch.device, epochs: int, batch_size: int, workers: int) -> tuple[float, float]:
    from torch.utils.data import DataLoader, Subset

    task, data = make()
    dataset = torchvision_dataset(kind, str(resolve_data_dir(data.data_dir)), getattr(data, "augment", False))
    if data.n_train is not None:
        dataset = Subset(dataset, range(data.n_train))
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=False,
    )  # fmt: skip
    net, optimizer, loss_fn = task.net.to(device), optimizer_of(task.to(device)), get_loss(task.loss_name)
    for _ in range(epochs):
        start = clock(device)
        batches = ((xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)) for xb, yb in loader)
        train_epoch(net, optimizer, loss_fn, batches)
        elapsed = since(start, device)
    return elapsed


def bench(name: str, kind: str, make, points: int, batch_size: int, args) -> None:
    device = torch.device(args.device)
    times: dict[str, list[tuple[float, float]]] = {method: [] for method in args.methods}
    for _ in range(args.repeats):  # round robin: a busy spell on a shared machine hits every method
        for method in args.methods:
            torch.manual_seed(0)
            if method == "overparam":
                seconds = run_overparam(make, device, args.epochs)
            elif method == "lightning":
                seconds = run_lightning(make, device, args.epochs)
            elif method.startswith("manual"):
                seconds = run_lightning(make, device, args.epochs, int(method[len("manual"):]))
            elif method == "resident":
                seconds = run_resident(make, device, args.epochs, batch_size)
            elif method == "resident-graphs":
                seconds = run_resident_graphs(make, device, args.epochs, batch_size)
            else:
                seconds = run_dataloader(make, kind, device, args.epochs, batch_size, args.workers)
            times[method].append(seconds)
    results = {method: sorted(t)[len(t) // 2] for method, t in times.items()}  # median by wall time
    base = results.get("resident")
    print(
        f"\n{name}: {points:,} samples/epoch, batch {batch_size}, device {device}, "
        f"torch threads {torch.get_num_threads()}, median of {args.repeats}"
    )
    print(f"  {'method':15s} {'wall s':>8s} {'samples/s':>10s} {'vs resident':>12s} {'cpu s':>8s} {'cpu vs resident':>16s}")
    for method, (wall, cpu) in results.items():
        ratio = f"{base[0] / wall:.2f}x" if base else ""
        cpu_ratio = f"{base[1] / cpu:.2f}x" if base and method != "dataloader" else "(workers)"
        print(f"  {method:15s} {wall:8.3f} {points / wall:10,.0f} {ratio:>12s} {cpu:8.3f} {cpu_ratio:>16s}")
    RESULTS[name] = {
        "samples_per_epoch": points, "batch_size": batch_size, "device": str(device), "repeats": args.repeats,
        "methods": {m: {"wall_s": w, "cpu_s": c, "samples_per_s": points / w, "vs_resident": base[0] / w if base else None}
                    for m, (w, c) in results.items()},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default=None, help="default: $OVERPARAM_DATA_DIR or the user cache")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per method; the last one is timed")
    parser.add_argument("--repeats", type=int, default=1, help="runs per method (round robin); the median is shown")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--tasks", nargs="+", default=["mnist", "cifar"], choices=["mnist", "cifar"])
    methods = ["overparam", "lightning", "resident", "dataloader"]
    parser.add_argument("--methods", nargs="+", default=methods,
                        choices=[*methods, "manual1", "manual4", "manual16", "resident-graphs"],
                        help="manualS: bare module, manual optimisation, S steps per training_step; "
                             "resident-graphs: the hand-written loop replayed as a CUDA graph (GPU only)")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--mnist-width", type=int, nargs="+", default=[500, 100], help="hidden widths (N = 443,610)")
    parser.add_argument("--mnist-batch", type=int, default=128)
    parser.add_argument("--mnist-n-train", type=int, default=0, help="training digits (0: all 60,000)")
    parser.add_argument("--cifar-width", type=int, default=64, help="c (N = 373,386 at 64)")
    parser.add_argument("--cifar-batch", type=int, default=512)
    parser.add_argument("--cifar-n-train", type=int, default=2048, help="training images (0: all 50,000)")
    parser.add_argument("--augment", action="store_true", help="CIFAR random crop + flip")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))

    if "mnist" in args.tasks:

        def make_mnist():
            data = MnistData(data_dir=args.data_dir, n_train=args.mnist_n_train or None, batch_size=args.mnist_batch)
            task = MnistFC(width=args.mnist_width, input_shape=data.input_shape, num_outputs=10,
                           num_train=data.num_train, lr=0.1, momentum=0.9)  # fmt: skip
            return task, data

        bench(f"MNIST-FC 784-{'-'.join(map(str, args.mnist_width))}-10", "mnist", make_mnist, args.mnist_n_train or 60_000, args.mnist_batch, args)

    if "cifar" in args.tasks:
        n_train = args.cifar_n_train or None

        def make_cifar():
            data = CifarData(data_dir=args.data_dir, verify_integrity=False, n_train=n_train,
                             augment=args.augment, batch_size=args.cifar_batch)  # fmt: skip
            task = CifarCNN(width=args.cifar_width, input_shape=data.input_shape, num_outputs=10,
                            num_train=data.num_train, lr=0.05, momentum=0.9)  # fmt: skip
            return task, data

        bench(f"CIFAR-CNN c={args.cifar_width}", "cifar", make_cifar, n_train or 50_000, args.cifar_batch, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "benchmarks": RESULTS}, fh, indent=1)


if __name__ == "__main__":
    main()
