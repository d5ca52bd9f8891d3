"""GD vs SGD on the spherical p-spin: does minibatch noise change where descent halts?

Same couplings, same K random starts, two protocols of the ``PSpinTask`` plugin:

* ``GD``: full-batch projected gradient descent until every start halts;
* ``SGD -> GD``: ``sgd_steps`` steps on random subsets of ``batch`` rows of J (the stochastic
  variant), then full-batch GD from there until every start halts (``BatchSizeSwitch`` at an
  epoch: the other engineers' callback, unchanged), so both end at a halting point.

Prints the mean and spread of the halting energies and the paired difference per start.

    python benchmarks/pspin_gd_vs_sgd.py              # N = 50, 2 samples x 64 starts (CPU, ~2 min)
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import numpy as np
import torch

from overparam.callbacks.batch_size import BatchSizeSwitch
from overparam.plugins.pspin import PSpinData, PSpinTask
from overparam.pspin import threshold_energy


def run(N: int, seed: int, starts: int, batch, sgd_epochs: int, passes: int, lr: float) -> dict:
    data = PSpinData(N=N, coupling_seed=seed, batch_size=batch, passes_per_epoch=passes)
    task = PSpinTask(input_shape=data.input_shape, num_train=N, ensemble_size=starts, init_seed=1000 * seed, lr=lr)
    callbacks = [BatchSizeSwitch(schedule={sgd_epochs: "full"}, log=False)] if batch != "full" else []
    trainer = pl.Trainer(
        max_steps=20000, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(task, data)
    return task.halting_results()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--N", type=int, default=50)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--starts", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[10, 5], help="rows per SGD step")
    parser.add_argument("--sgd-steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gd = [run(args.N, s, args.starts, "full", 0, 50, args.lr) for s in range(args.samples)]
    e_gd = np.concatenate([r["energy"] for r in gd])
    print(f"N={args.N}, {args.samples} samples x {args.starts} starts, lr {args.lr}; E_inf = {threshold_energy(3):.4f}")
    print(f"GD            : mean {e_gd.mean():.4f}  std {e_gd.std(ddof=1):.4f}  min {e_gd.min():.4f}")
    for b in args.batch:
        steps_per_pass = -(-args.N // b)
        passes = 10
        sgd_epochs = max(1, round(args.sgd_steps / (steps_per_pass * passes)))
        runs = [run(args.N, s, args.starts, b, sgd_epochs, passes, args.lr) for s in range(args.samples)]
        e = np.concatenate([r["energy"] for r in runs])
        d = e - e_gd
        assert all(r["converged"].all() for r in runs)
        print(
            f"SGD b={b:3d} -> GD: mean {e.mean():.4f}  std {e.std(ddof=1):.4f}  min {e.min():.4f}   "
            f"paired (SGD->GD) - GD: mean {d.mean():+.4f} +- {d.std(ddof=1) / len(d) ** 0.5:.4f}, "
            f"lower for {np.mean(d < -1e-4):.0%} of starts  ({sgd_epochs * steps_per_pass * passes} SGD steps)",
            flush=True,
        )


if __name__ == "__main__":
    main()
