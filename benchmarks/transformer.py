"""The transformer task's two costs, side by side in one process: ensembles and full-batch grokking.

``--part ensemble``: K members of the default ``Transformer`` (d = 128, one layer, 4 heads,
d_mlp = 512; N = 223,457 at p = 97) on ``ModularArithmetic`` (p = 97, 30% of the equations,
batch 512, AdamW), trained as one vmapped ensemble in one Trainer vs K separate Trainer runs,
one after another. Both go through the same Task and DataModule, so the ratio is what
``ensemble_size: K`` buys: one batched forward/backward and one optimizer step per batch
instead of K, and Lightning's per-step work once instead of K times. Prints the median training
epoch time of each path (epochs after the first; no validation) and their ratio by wall and CPU
time (issue 19's goal: >= 3x for K = 8).

``--part full_batch``: the grokking run as ``configs/grokking.yaml`` trains it (p = 59, 50% of
the equations, d = 64, full-batch AdamW, held-out accuracy and weight norm every 50 steps, CSV
logger, throttled last.ckpt) against a hand-written loop of the same model over the same
resident tensors that also measures the held-out accuracy every 50 steps. Prints steps/s and
ms per step by wall time and by this process's CPU time (steadier on a shared machine).

    python benchmarks/transformer.py --part full_batch --threads 1      # CPU: about a minute
    python benchmarks/transformer.py --part ensemble --threads 1        # CPU: a few minutes
    python benchmarks/transformer.py --part ensemble --device cuda --members 8

Time it alone on the machine; only ratios measured in the same run are meaningful.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from overparam.checkpoint import LastCheckpoint
from overparam.plugins.modular_arithmetic import ModularArithmetic
from overparam.plugins.transformer import Transformer

from full_batch import StepTimer, clock  # the sibling script: benchmarks/ is on sys.path when run

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def make(args: argparse.Namespace, K: int = 1, init_seed: int = 0) -> tuple[Transformer, ModularArithmetic]:
    # validate: the grokking run measures the held-out accuracy every epoch; the ensemble part
    # times training alone (on_train_epoch_end comes after the epoch's validation).
    data = ModularArithmetic(p=args.p, train_fraction=args.fraction, batch_size=args.batch_size,
                             passes_per_epoch=args.passes, validate=args.part == "full_batch")  # fmt: skip
    task = Transformer(d_model=args.d_model, d_mlp=4 * args.d_model, input_shape=data.input_shape,
                       num_outputs=data.num_outputs, num_train=data.num_train, ensemble_size=K, init_seed=init_seed)  # fmt: skip
    task.configure_optimizers = lambda: torch.optim.AdamW(task.parameters(), lr=args.lr, weight_decay=1.0, betas=(0.9, 0.98))
    return task, data


# --- ensemble --------------------------------------------------------------------------------
class EpochTimer(pl.Callback):
    """(wall, CPU) seconds of every training epoch."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = clock(pl_module.device)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        end = clock(pl_module.device)
        self.times.append((end[0] - self.start[0], end[1] - self.start[1]))


def epoch_time(args: argparse.Namespace, K: int, init_seed: int) -> tuple[float, float]:
    """Median (wall, CPU) epoch time (epochs after the first) of one Trainer run of a K-member task."""
    task, data = make(args, K, init_seed)
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator=args.device, devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(task, datamodule=data)
    times = timer.times[1:] or timer.times
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def run_ensemble(args: argparse.Namespace) -> None:
    vmapped = epoch_time(args, args.members, 0)
    separate = [epoch_time(args, 1, k) for k in range(args.members)]
    total = (sum(t[0] for t in separate), sum(t[1] for t in separate))
    task, data = make(args)
    print(f"K = {args.members} members, N = {task.N:,} each, P = {data.num_train:,}, batch {args.batch_size}, "
          f"{args.epochs} epochs per run (the first not timed)")  # fmt: skip
    print(f"  {'':38s} {'wall s/epoch':>12s} {'cpu s/epoch':>12s}")
    print(f"  {'vmapped ensemble (one Trainer)':38s} {vmapped[0]:12.3f} {vmapped[1]:12.3f}")
    print(f"  {f'{args.members} separate runs (one after another)':38s} {total[0]:12.3f} {total[1]:12.3f}")
    print(f"  speed-up: {total[0] / vmapped[0]:.2f}x wall, {total[1] / vmapped[1]:.2f}x CPU (goal >= 3x)")


# --- full batch ----------------------------------------------------------------------------------
def run_loop(args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds per step of a hand-written full-batch loop with the held-out accuracy every ``passes`` steps."""
    task, data = make(args)
    data.setup()
    (x, y), (x_test, y_test) = (tuple(t.to(device) for t in data.split(s)) for s in ("train", "test"))
    net = task.net.to(device)
    optimizer = task.configure_optimizers()
    accuracies = []
    for step in range(args.steps + 1):
        if step == 1:  # the first step pays warm-up, as the Trainer's first step does
            start = clock(device)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % args.passes == 0:
            with torch.no_grad():
                accuracies.append((net(x_test).argmax(1) == y_test).float().mean())
    float(accuracies[-1])  # the accuracies reach the host like the logged ones do
    end = clock(device)
    return (end[0] - start[0]) / args.steps, (end[1] - start[1]) / args.steps


def run_overparam(args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds per step of ``overparam fit -c configs/grokking.yaml``'s path."""
    task, data = make(args)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as folder:
        trainer = pl.Trainer(
            max_steps=args.steps + 1, max_epochs=-1, accelerator=device.type, devices=1, logger=CSVLogger(folder),
            callbacks=[timer, LastCheckpoint(dirpath=folder)], enable_progress_bar=False, enable_model_summary=False,
            log_every_n_steps=args.passes,
        )  # fmt: skip
        trainer.fit(task, datamodule=data)
    return timer.seconds_per_step()


def run_full_batch(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    methods = {"loop": lambda: run_loop(args, device), "overparam": lambda: run_overparam(args, device)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    for _ in range(args.repeats):  # round robin: a busy spell on a shared machine hits every method
        for name, method in methods.items():
            torch.manual_seed(0)
            times[name].append(method())
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    task, data = make(args)
    print(f"full-batch AdamW, p = {args.p}, P = {data.num_train:,}, d = {args.d_model} (N = {task.N:,}), "
          f"{args.steps} steps, held-out accuracy every {args.passes}, median of {args.repeats}")  # fmt: skip
    print(f"  {'method':10s} {'steps/s':>8s} {'wall ms/step':>12s} {'vs loop':>8s} {'cpu ms/step':>12s} {'vs loop':>8s}")
    base = medians["loop"]
    for name, (wall, cpu) in medians.items():
        print(f"  {name:10s} {1 / wall:8.1f} {wall * 1e3:12.2f} {wall / base[0]:7.2f}x {cpu * 1e3:12.2f} {cpu / base[1]:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("ensemble", "full_batch"), required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--members", type=int, default=8, help="ensemble: K (default 8, the issue's goal)")
    parser.add_argument("--epochs", type=int, default=3, help="ensemble: epochs per run; the first is not timed")
    parser.add_argument("--steps", type=int, default=300, help="full_batch: GD steps per method")
    parser.add_argument("--repeats", type=int, default=3, help="full_batch: runs per method (round robin), median shown")
    parser.add_argument("--p", type=int, default=None, help="modulus (default: 97 ensemble, 59 full_batch)")
    parser.add_argument("--fraction", type=float, default=None, help="train fraction (default: 0.3 ensemble, 0.5 full_batch)")
    parser.add_argument("--d-model", type=int, default=None, help="width (default: 128 ensemble, 64 full_batch)")
    parser.add_argument("--batch-size", type=int, default=512, help="ensemble: batch size (default 512, Power et al.'s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW's learning rate (the papers' 1e-3)")
    args = parser.parse_args()
    ensemble = args.part == "ensemble"
    args.p = args.p or (97 if ensemble else 59)
    args.fraction = args.fraction or (0.3 if ensemble else 0.5)
    args.d_model = args.d_model or (128 if ensemble else 64)
    args.passes = 1 if ensemble else 50
    args.batch_size = args.batch_size if ensemble else "full"
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}, torch threads {torch.get_num_threads()}")
    if ensemble:
        run_ensemble(args)
    else:
        run_full_batch(args)


if __name__ == "__main__":
    main()
