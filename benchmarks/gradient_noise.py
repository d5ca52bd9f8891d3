"""GradientNoise overhead per step on MNIST-FC (784-500-100-10, N = 443,610), side by side.

Times, in one process on the same data and network:
  1. Lightning training steps without the callback;
  2. the same with ``GradientNoise(every_n_steps=1, tail_index=False)`` (one device: per-sample
     gradients of every batch via vmap(grad), the worst case; ``every_n_steps=n`` divides the
     overhead by n);
  3. the engine alone on one batch (``per_sample_moments``) against a Python loop over samples
     (the unvectorised baseline the issue rules out);
  4. with ``--ddp``: 2 CPU processes (ddp_fork, gloo), without and with the callback: the DDP
     path reads each rank's gradient bucket in a comm hook, no extra pass.

    OVERPARAM_DATA_DIR=/path/with/MNIST python benchmarks/gradient_noise.py [--steps 60] [--ddp]

Prints ms per step and ratios. Numbers in docs/dynamics.md.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch

from overparam.callbacks.gradient_noise import GradientNoise
from overparam.noise import per_sample_grad_fn, per_sample_moments
from overparam.plugins.mnist_fc import MnistData, MnistFC


class StepTimer(pl.Callback):
    """Wall time of training steps after ``warmup`` steps."""

    def __init__(self, warmup: int = 5) -> None:
        self.warmup, self.start, self.steps = warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.steps = trainer.global_step - self.warmup
        self.seconds = time.perf_counter() - self.start
        trainer.callback_metrics["bench/ms_per_step"] = torch.tensor(1000 * self.seconds / self.steps)


def make(batch_size: int, n_train: int):
    data = MnistData(n_train=n_train, n_test=100, batch_size=batch_size)
    task = MnistFC(width=[500, 100], input_shape=data.input_shape, num_outputs=data.num_outputs, num_train=n_train, lr=0.05)
    return task, data


def ms_per_step(callbacks, steps: int, batch_size: int, n_train: int, **trainer_kwargs) -> float:
    task, data = make(batch_size, n_train)
    t = pl.Trainer(
        max_steps=steps + 5, callbacks=[*callbacks, StepTimer()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **trainer_kwargs,
    )
    t.fit(task, datamodule=data)
    return float(t.callback_metrics["bench/ms_per_step"])


def engine_vs_loop(batch_size: int, n_train: int, repeats: int = 3) -> tuple[float, float]:
    task, data = make(batch_size, n_train)
    data.setup()
    x, y = data.split("train")
    x, y = x[:batch_size], y[:batch_size]
    view = task.functional_view()

    def vectorised():
        per_sample_moments(view.fn, view.params, view.buffers, task.loss_fn, x, y)

    def loop():
        params = {n: p.detach().requires_grad_() for n, p in view.params.items()}
        total, sq = None, 0.0
        for i in range(batch_size):
            loss = task.loss_fn(view.fn(params, view.buffers, x[i : i + 1]), y[i : i + 1], reduction="sum")
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(params.values()))])
            total = g if total is None else total + g
            sq += float(g.square().sum())

    out = []
    for fn in (vectorised, loop):
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        out.append(1000 * (time.perf_counter() - start) / repeats)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=8192)
    parser.add_argument("--ddp", action="store_true", help="also time 2-process DDP (ddp_fork) without/with the callback")
    parser.add_argument("--ddp-only", action="store_true", help="only the DDP comparison")
    parser.add_argument("--repeats", type=int, default=1, help="alternate plain/with-callback runs this many times")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"MNIST-FC 784-500-100-10, batch {args.batch_size}, {args.steps} timed steps, torch threads {torch.get_num_threads()}")

    if not args.ddp_only:
        for _ in range(args.repeats):
            base = ms_per_step([], args.steps, args.batch_size, args.n_train)
            noisy = ms_per_step([GradientNoise(every_n_steps=1, tail_index=False)], args.steps, args.batch_size, args.n_train)
            print(f"one device   plain step        {base:8.1f} ms")
            print(f"one device   + GradientNoise   {noisy:8.1f} ms   ratio {noisy / base:.2f}x  (every step; every_n_steps=n: ~1 + {noisy / base - 1:.2f}/n)")
        vec, loop = engine_vs_loop(args.batch_size, args.n_train)
        print(f"engine       vmap(grad) batch  {vec:8.1f} ms   Python loop over samples {loop:8.1f} ms   loop/vmap {loop / vec:.2f}x")

    if args.ddp or args.ddp_only:
        kwargs = dict(strategy="ddp_fork", devices=2)
        for _ in range(args.repeats):
            dbase = ms_per_step([], args.steps, args.batch_size, args.n_train, **kwargs)
            dnoisy = ms_per_step([GradientNoise(every_n_steps=1, tail_index=False)], args.steps, args.batch_size, args.n_train, **kwargs)
            print(f"DDP 2 procs  plain step        {dbase:8.1f} ms")
            print(f"DDP 2 procs  + GradientNoise   {dnoisy:8.1f} ms   ratio {dnoisy / dbase:.2f}x  (comm hook, no extra pass)")


if __name__ == "__main__":
    main()
