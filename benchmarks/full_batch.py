"""Full-batch GD through the Trainer vs a hand-written loop: the jamming workload's step time.

The science of jamming runs thousands of small networks for 10^4-10^5 full-batch steps, where
per-step framework work, not FLOPs, sets the cost. Side by side in one process, the same
problem (random labels, P points in d = h dimensions, depth-2 ReLU net of width h, squared
hinge, float64, full-batch Adam), the same number of steps:

* ``loop``: a hand-written loop over the resident tensors that also counts N_Delta (and the
  loss) every step, as a jamming study must (the baseline);
* ``overparam``: ``TeacherStudent`` + ``TeacherStudentData`` in the ``Trainer`` as the shipped
  ``configs/experiments/jamming_random.yaml`` runs it: ``ConstraintCounter`` counting every
  step (read from the step's own forward pass), ``passes_per_epoch`` GD steps per epoch,
  ``LastCheckpoint`` (throttled last.ckpt), the CSV logger;
* ``overparam-1pass`` (``--old``): the same with one step per epoch (``passes_per_epoch: 1``)
  and a count of its own at every epoch end: the shape of the protocol before the redesign.

Prints ms per step and the ratio to the loop (> 1: slower), by wall time and by this process's
CPU time (steadier on a shared machine for one-thread runs; on a GPU only wall time counts).
Time it alone on the machine.

    python benchmarks/full_batch.py --threads 1                  # CPU: about a minute
    python benchmarks/full_batch.py --device cuda --steps 5000
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

from overparam.callbacks.constraints import ConstraintCounter
from overparam.checkpoint import LastCheckpoint
from overparam.losses import squared_hinge
from overparam.plugins.teacher_student import TeacherStudent, TeacherStudentData

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


def make(args):
    data = TeacherStudentData(input_dim=args.width, num_train=args.P, num_test=100, target="random",
                              num_classes=2, batch_size="full", passes_per_epoch=args.passes)  # fmt: skip
    task = TeacherStudent(width=args.width, depth=2, loss="squared_hinge", input_shape=data.input_shape,
                          num_outputs=1, num_train=args.P)  # fmt: skip
    return task, data


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> tuple[float, float]:
    """(wall, this process's CPU) seconds, after the device has finished its queued work."""
    sync(device)
    return time.perf_counter(), time.process_time()


def run_loop(args, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds per step of a hand-written loop that counts N_Delta every step."""
    task, data = make(args)
    data.setup()
    x, y = (t.to(device=device, dtype=torch.float64) for t in data.split("train"))
    net = task.net.to(device=device, dtype=torch.float64)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    counts = []
    start = clock(device)
    for _ in range(args.steps):
        out = net(x)
        delta = 1.0 - y * out[:, 0]
        loss = squared_hinge(out.unsqueeze(0), y, reduction="mean")
        counts.append(((delta > 0).sum(), loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    int(counts[-1][0])  # the counts reach the host like the callback's do
    end = clock(device)
    return (end[0] - start[0]) / args.steps, (end[1] - start[1]) / args.steps


def run_overparam(args, device: torch.device, passes: int, every_step: bool) -> tuple[float, float]:
    """(wall, CPU) seconds per step of ``overparam fit``'s path (from the second step to the end)."""
    args = argparse.Namespace(**{**vars(args), "passes": passes})
    task, data = make(args)
    counter = (
        ConstraintCounter(every_n_epochs=None, every_n_steps=1, at_fit_end=False)
        if every_step
        else ConstraintCounter(every_n_epochs=1, at_fit_end=False)
    )
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as folder:
        trainer = pl.Trainer(
            max_steps=args.steps + 1, max_epochs=-1, accelerator=device.type, devices=1, precision="64-true",
            logger=CSVLogger(folder), callbacks=[counter, timer, LastCheckpoint(dirpath=folder)],
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=50,
        )  # fmt: skip
        task.configure_optimizers = lambda: torch.optim.Adam(task.parameters(), lr=args.lr)
        trainer.fit(task, datamodule=data)
    return timer.seconds_per_step()


class StepTimer(pl.Callback):
    """Wall and CPU time from the second step to the end of training, per step."""

    def on_train_step(self, trainer, pl_module, record) -> None:
        if record.index == 1:
            self.start, self.first = clock(pl_module.device), trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self.end, self.last = clock(pl_module.device), trainer.global_step

    def seconds_per_step(self) -> tuple[float, float]:
        steps = self.last - self.first
        return (self.end[0] - self.start[0]) / steps, (self.end[1] - self.start[1]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--P", type=int, default=600, help="training points")
    parser.add_argument("--width", type=int, default=11, help="h = d (N = 276 at 11)")
    parser.add_argument("--steps", type=int, default=3000, help="GD steps per method")
    parser.add_argument("--passes", type=int, default=100, help="passes_per_epoch of the overparam run")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method (round robin); the median is shown")
    parser.add_argument("--old", action="store_true", help="also the one-step-per-epoch protocol (slow)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = {
        "loop": lambda: run_loop(args, device),
        "overparam": lambda: run_overparam(args, device, args.passes, every_step=True),
    }
    if args.old:
        methods["overparam-1pass"] = lambda: run_overparam(args, device, 1, every_step=False)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    for _ in range(args.repeats):  # round robin: a busy spell on a shared machine hits every method
        for name, run in methods.items():
            torch.manual_seed(0)
            times[name].append(run())
    medians = {name: sorted(t)[len(t) // 2] for name, t in times.items()}  # median by wall time
    N = TeacherStudent(width=args.width, depth=2, input_shape=(args.width,), num_outputs=1).N
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {device}, torch threads {torch.get_num_threads()}")
    print(f"full-batch Adam, P = {args.P}, d = h = {args.width} (N = {N}), float64, {args.steps} steps, median of {args.repeats}")
    print(f"  {'method':16s} {'wall ms/step':>12s} {'vs loop':>8s} {'cpu ms/step':>12s} {'vs loop':>8s}")
    base = medians["loop"]
    for name, (wall, cpu) in medians.items():
        print(f"  {name:16s} {wall * 1e3:12.3f} {wall / base[0]:7.2f}x {cpu * 1e3:12.3f} {cpu / base[1]:7.2f}x")
    if args.json:
        rows = {name: {"wall_ms_per_step": w * 1e3, "cpu_ms_per_step": c * 1e3, "steps_per_s": 1 / w,
                       "vs_loop_wall": w / base[0], "vs_loop_cpu": c / base[1]} for name, (w, c) in medians.items()}  # fmt: skip
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "device": str(device), "P": args.P, "N": N, "steps": args.steps,
                       "methods": rows}, fh, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
