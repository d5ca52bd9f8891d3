"""ConstraintCounter: the hinge constraints a network leaves unsatisfied (jamming).

With the margin ``m_mu`` of training point mu (``y f(x)`` for one output, ``f_y - max_{j != y}
f_j`` for C >= 2; ``overparam.losses.margins``) every point sets one constraint, satisfied when
``m_mu >= 1``. Its gap is

    Delta_mu = 1 - m_mu,        N_Delta = #{mu : Delta_mu > 0}.

With the (squared) hinge loss ``L = 1/P sum_mu 1/2 max(0, Delta_mu)^2`` only the N_Delta
unsatisfied constraints carry gradient. Below the jamming point N* a network cannot satisfy
all P constraints and gradient descent ends on a positive-loss minimum with N_Delta > 0
(UNSAT, jammed); above it it reaches L = 0 exactly, N_Delta = 0 (SAT). At the transition
N_Delta / N jumps to a finite value (Spigler, Geiger, d'Ascoli, Sagun, Biroli, Wyart 2019,
"A jamming transition from under- to over-parametrization affects generalization in deep
learning", J. Phys. A 52 474001, Fig. 2; Geiger et al. 2019, Phys. Rev. E 100 012115).

The count runs over the WHOLE training set (every DDP rank takes its shard of
``analysis_batches`` and the sums are all-reduced, so every rank holds the global count) and is
done per ensemble member when K > 1. Each check logs

* ``constraints/N_delta``, ``N_delta_over_N``, ``N_delta_over_P``, ``errors`` (the number of
  training points with ``m_mu <= 0``), ``error`` (that over P), ``loss`` (the task's loss on
  the full training set) and ``sat`` (1 when N_Delta = 0); per member as ``.../member_k`` with
  the mean over members under the bare name when K > 1, plus ``sat_fraction``;
* ``<log_dir>/constraints/<tag>.npz``: log-binned histograms of |Delta| over the unsatisfied
  (Delta > 0) and the satisfied (Delta <= 0) constraints, per member, and the raw Delta
  values (rank 0 gathers them) when ``save_deltas``.

Optional stopping through ``trainer.should_stop``: ``stop_when_sat`` once every member has
N_Delta = 0; ``stop_when_jammed`` once every member is SAT or jammed, jammed meaning N_Delta > 0
and a loss that has not dropped by a factor ``1 - min_rel_decrease`` in ``patience`` checks.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from overparam.callbacks.base import FIT_END, AnalysisCallback, analysis_context
from overparam.distributed import all_reduce_sum, is_distributed
from overparam.errors import ConfigError, check_fraction, check_positive
from overparam.losses import errors, margins

SAT, JAMMED, RUNNING = "sat", "jammed", "running"


def constraint_sums(outputs: Tensor, y: Tensor, loss_fn: Any, edges: Tensor) -> tuple[Tensor, Tensor]:
    """Sums over one chunk of points for every member (the pure part of the counter).

    Args:
        outputs: ``(K, B, C)`` member outputs.
        y: ``(B,)`` labels (+-1 floats for C = 1, class indices otherwise).
        loss_fn: ``loss_fn(outputs, y, reduction="none") -> (K, B)``.
        edges: ``(E + 1,)`` increasing bin edges of |Delta| (values outside fall in the end bins).

    Returns:
        ``sums``: ``(K, 4)`` float64 rows ``[N_Delta, errors, loss sum, points]``;
        ``hist``: ``(K, 2, E)`` float64 counts of |Delta| for Delta > 0 (row 0) and Delta <= 0 (row 1).
    """
    delta = 1.0 - margins(outputs, y)  # (K, B)
    unsat = delta > 0
    sums = torch.stack(
        [
            unsat.sum(-1).to(torch.float64),
            errors(outputs, y).sum(-1).to(torch.float64),
            loss_fn(outputs, y, reduction="none").sum(-1).to(torch.float64),
            torch.full((delta.shape[0],), float(delta.shape[1]), dtype=torch.float64, device=delta.device),
        ],
        dim=-1,
    )
    return sums, delta_histograms(delta, edges)


def delta_histograms(delta: Tensor, edges: Tensor) -> Tensor:
    """``(K, 2, E)`` counts of |Delta| per member, unsatisfied (Delta > 0) then satisfied.

    Bins are ``[edges[i], edges[i+1])`` (NumPy's convention); ``torch.bucketize`` with the inner
    edges puts values below ``edges[0]`` into bin 0 and above ``edges[-1]`` into the last bin,
    so every constraint is counted exactly once.
    """
    num_bins = edges.numel() - 1
    bins = torch.bucketize(delta.abs().to(torch.float64), edges[1:-1].to(delta.device), right=True)  # (K, B)
    hist = torch.zeros(delta.shape[0], 2, num_bins, dtype=torch.float64, device=delta.device)
    for row, mask in enumerate((delta > 0, delta <= 0)):
        hist[:, row].scatter_add_(1, bins, mask.to(torch.float64))
    return hist


def gather_to_all(values: Tensor) -> Tensor:
    """Concatenate every rank's ``(K, B_r)`` values along dim 1 (rank order); identity on one process.

    Shards may differ in length by one, so they are padded to the longest before
    ``all_gather`` and cut back afterwards.
    """
    if not is_distributed():
        return values
    world = torch.distributed.get_world_size()
    length = torch.tensor([values.shape[1]], device=values.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    torch.distributed.all_gather(lengths, length)
    longest = int(max(l.item() for l in lengths))
    padded = torch.zeros(values.shape[0], longest, dtype=values.dtype, device=values.device)
    padded[:, : values.shape[1]] = values
    chunks = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(chunks, padded)
    return torch.cat([c[:, : int(l.item())] for c, l in zip(chunks, lengths)], dim=1)


class ConstraintCounter(AnalysisCallback):
    """Count unsatisfied hinge constraints on the full training set; stop at SAT or when jammed.

    Args:
        every_n_epochs: count at the end of every n-th epoch. Default: 1 (the jamming papers
            follow N_Delta during training).
        every_n_steps: also count after every n-th optimizer step (None: never).
        at_fit_start, at_fit_end, at_epochs, name: see ``AnalysisCallback`` (name: ``constraints``).
        stop_when_sat: set ``trainer.should_stop`` once every member has N_Delta = 0.
        stop_when_jammed: set ``trainer.should_stop`` once every member is SAT or jammed.
        patience: checks without a relative loss decrease of ``min_rel_decrease`` after which a
            member with N_Delta > 0 counts as jammed. Default: 20.
        min_rel_decrease: a check improves on the best loss when ``loss < best * (1 - this)``.
            Default: 1e-3.
        bins: log-spaced |Delta| bins of the saved histograms. Default: 60.
        delta_range: ``(smallest, largest)`` |Delta| edges of the histogram (values outside fall
            into the end bins). Default: (1e-8, 1e2); near jamming the small gaps follow power
            laws over many decades (Franz & Parisi 2016), hence log bins.
        save_deltas: also save the raw Delta values (K x P) in each ``.npz``. Default: False.
        save_every: write the ``.npz`` at every ``save_every``-th check and at the last one
            (the fit end). Default: 1.

    Raises:
        ConfigError: for a non-positive ``every_n_steps``, ``patience``, ``bins`` or ``save_every``,
            a ``min_rel_decrease`` outside [0, 1], or a bad ``delta_range``.

    Example::

        Trainer(callbacks=[ConstraintCounter(stop_when_sat=True, stop_when_jammed=True)])

    In a config (``trainer.precision: 64-true`` keeps a vanishing loss exact)::

        trainer:
          callbacks:
            - class_path: ConstraintCounter
              init_args: {stop_when_sat: true, stop_when_jammed: true, patience: 50}
    """

    default_name = "constraints"

    def __init__(
        self,
        every_n_epochs: Optional[int] = 1,
        every_n_steps: Optional[int] = None,
        at_fit_start: bool = False,
        at_fit_end: bool = True,
        at_epochs: Sequence[int] = (),
        stop_when_sat: bool = False,
        stop_when_jammed: bool = False,
        patience: int = 20,
        min_rel_decrease: float = 1e-3,
        bins: int = 60,
        delta_range: Sequence[float] = (1e-8, 1e2),
        save_deltas: bool = False,
        save_every: int = 1,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(at_fit_start, at_fit_end, every_n_epochs, at_epochs, name)
        if every_n_steps is not None:
            check_positive("ConstraintCounter.every_n_steps", every_n_steps)
        check_positive("ConstraintCounter.patience", patience)
        check_positive("ConstraintCounter.bins", bins)
        check_positive("ConstraintCounter.save_every", save_every)
        check_fraction("ConstraintCounter.min_rel_decrease", min_rel_decrease)
        if len(delta_range) != 2 or not 0 < delta_range[0] < delta_range[1]:
            raise ConfigError(
                f"ConstraintCounter.delta_range must be two numbers 0 < smallest < largest, got {list(delta_range)}"
            )
        self.every_n_steps = every_n_steps
        self.stop_when_sat = stop_when_sat
        self.stop_when_jammed = stop_when_jammed
        self.patience = patience
        self.min_rel_decrease = min_rel_decrease
        self.edges = torch.logspace(float(np.log10(delta_range[0])), float(np.log10(delta_range[1])), bins + 1, dtype=torch.float64)
        self.save_deltas = save_deltas
        self.save_every = save_every
        # Plateau tracking per member; plain lists so they go into state_dict.
        self.best_loss: list[float] = []
        self.since_best: list[int] = []
        self.status: list[str] = []
        self.checks = 0

    # --- hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Needs an overparam DataModule (the full training set) and a task with ``member_outputs``."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not hasattr(trainer.datamodule, "analysis_batches"):
            raise ConfigError("ConstraintCounter needs an overparam DataModule (data: ...) to count on the full training set")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After every ``every_n_steps``-th optimizer step: count (``global_step`` is already 1 after the first step)."""
        if self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0:
            # Step checks are not added to ``done``: global_step only grows, also after a resume.
            with analysis_context(pl_module):
                self.analyse(trainer, pl_module, f"step={trainer.global_step}")

    # --- the count ------------------------------------------------------------------------
    def count(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """All-reduced per-member sums over the full training set (and this rank's raw Delta)."""
        datamodule = trainer.datamodule
        num_points = datamodule.split("train")[0].shape[0]
        K = pl_module.ensemble_size
        device = pl_module.device
        sums = torch.zeros(K, 4, dtype=torch.float64, device=device)
        hist = torch.zeros(K, 2, self.edges.numel() - 1, dtype=torch.float64, device=device)
        deltas = []
        with torch.no_grad():
            for x, y in datamodule.analysis_batches("train", size=num_points):
                out = pl_module.member_outputs(x)  # (K, B, C)
                s, h = constraint_sums(out, y, pl_module.loss_fn, self.edges)
                sums += s
                hist += h
                if self.save_deltas:
                    deltas.append(1.0 - margins(out, y))
        # One collective for everything: every rank gets the single-process sums.
        flat = all_reduce_sum(torch.cat([sums.reshape(-1), hist.reshape(-1)]))
        result = {"sums": flat[: sums.numel()].view_as(sums), "hist": flat[sums.numel() :].view_as(hist)}
        if self.save_deltas:
            local = torch.cat(deltas, dim=1) if deltas else torch.zeros(K, 0, dtype=torch.float64, device=device)
            result["deltas"] = gather_to_all(local)
        return result

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        """Count, log, save the histograms, update the SAT/jammed status and maybe stop."""
        result = self.count(trainer, pl_module)
        sums = result["sums"]
        N_delta, n_errors, loss_sum, P = sums.unbind(-1)  # each (K,)
        N = float(pl_module.N)
        loss = loss_sum / P
        K = N_delta.numel()
        self._update_status(N_delta.tolist(), loss.tolist())
        per_member = {
            "N_delta": N_delta,
            "N_delta_over_N": N_delta / N,
            "N_delta_over_P": N_delta / P,
            "errors": n_errors,
            "error": n_errors / P,
            "loss": loss,
            "sat": (N_delta == 0).to(torch.float64),
        }
        metrics = {name: float(v.mean()) for name, v in per_member.items()}
        if K > 1:
            metrics["sat_fraction"] = metrics.pop("sat")
            metrics["jammed_fraction"] = sum(s == JAMMED for s in self.status) / K
            for name, v in per_member.items():
                metrics.update({f"{name}/member_{k}": float(v[k]) for k in range(K)})
        else:
            metrics["jammed"] = float(self.status[0] == JAMMED)
        self.log_metrics(trainer, pl_module, metrics)
        self.history.append({"tag": tag, "epoch": trainer.current_epoch, "step": trainer.global_step, "N": N,
                             "P": float(P[0]), "N_delta": N_delta.tolist(), "errors": n_errors.tolist(),
                             "loss": loss.tolist(), "status": list(self.status)})
        self.checks += 1
        if self.checks % self.save_every == 0 or tag == FIT_END:
            arrays = {"edges": self.edges, "hist_unsat": result["hist"][:, 0], "hist_sat": result["hist"][:, 1],
                      "N_delta": N_delta, "errors": n_errors, "loss": loss, "N": N, "P": P[0],
                      "epoch": trainer.current_epoch, "step": trainer.global_step}
            if "deltas" in result:
                arrays["deltas"] = result["deltas"]
            self.save_npz(trainer, f"{tag.replace('=', '_')}.npz", **arrays)
            # W&B: |Delta| of member 0's unsatisfied and satisfied constraints (log-spaced bins).
            self.log_histogram(trainer, "abs_delta_unsat", counts_edges=(result["hist"][0, 0], self.edges))
            self.log_histogram(trainer, "abs_delta_sat", counts_edges=(result["hist"][0, 1], self.edges))
        self._maybe_stop(trainer, tag)

    # --- SAT / jammed ---------------------------------------------------------------------
    def _update_status(self, N_delta: list[float], loss: list[float]) -> None:
        if not self.status:
            self.status = [RUNNING] * len(N_delta)
            self.best_loss = [float("inf")] * len(N_delta)
            self.since_best = [0] * len(N_delta)
        for k, (n, value) in enumerate(zip(N_delta, loss)):
            if value < self.best_loss[k] * (1.0 - self.min_rel_decrease):
                self.best_loss[k], self.since_best[k] = value, 0
            else:
                self.since_best[k] += 1
            if n == 0:
                self.status[k] = SAT
            elif self.since_best[k] >= self.patience:
                self.status[k] = JAMMED
            else:
                self.status[k] = RUNNING

    def _maybe_stop(self, trainer: pl.Trainer, tag: str) -> None:
        if tag == FIT_END:
            return
        all_sat = all(s == SAT for s in self.status)
        all_done = all(s in (SAT, JAMMED) for s in self.status)
        stop = (self.stop_when_sat and all_sat) or (self.stop_when_jammed and all_done)
        # Counts are all-reduced, so ranks agree; reducing the decision keeps DDP safe anyway.
        stop = trainer.strategy.reduce_boolean_decision(bool(stop), all=False)
        if stop and not trainer.should_stop:
            trainer.should_stop = True
            rank_zero_info(f"ConstraintCounter: stopping at {tag} (step {trainer.global_step}): members {self.status}")

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(best_loss=self.best_loss, since_best=self.since_best, status=self.status, checks=self.checks)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_loss = list(state_dict.get("best_loss", []))
        self.since_best = list(state_dict.get("since_best", []))
        self.status = list(state_dict.get("status", []))
        self.checks = int(state_dict.get("checks", 0))
