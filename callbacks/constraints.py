"""ConstraintCounter: the hinge constraints a network leaves unsatisfied, and the jamming verdict.

The maths (gaps Delta, N_Delta, the gap tolerance and the SAT/jammed verdict) lives in
``overparam.constraints``; this callback counts over the WHOLE training set during training,
logs, saves histograms, decides and stops. Under DDP every rank counts its shard and the sums
are all-reduced, so every rank holds the global count; with K > 1 everything is per member.

Where the counts come from: a check at optimizer step t counts theta_t, the network after t
updates. When the training batch is the whole training set (``batch_size: full``, no
augmentation, no BatchNorm or dropout) the step's own forward pass already holds theta_t's
outputs on every point, and the count reads them: the same numbers at no cost. Otherwise
(minibatches, epoch-end and fit-end checks) it makes its own pass over the training set in
eval mode.

Each logged check gives ``constraints/N_delta``, ``N_delta_over_N``, ``N_delta_over_P``,
``errors`` (training points with ``m_mu <= 0``), ``error``, ``loss`` (the task's loss on the
full training set), ``sat`` and ``jammed`` (1/0: the verdict); per member as ``.../member_k``
with the mean over members under the bare name when K > 1 (plus ``sat_fraction``,
``jammed_fraction``). Step checks are counted at every scheduled step (the verdict sees them
all) but logged every ``trainer.log_every_n_steps`` steps and whenever a member's status
changes. Files in ``<log_dir>/constraints/``: ``<tag>.npz`` with log-binned histograms of |Delta|
over the unsatisfied and the satisfied constraints per member (and the raw Delta values with
``save_deltas``), and ``verdict.json`` at fit end: per member the status (``sat``, ``jammed``
or ``running``, i.e. undecided), the final step, N_Delta and loss, and why the run stopped.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from overparam.callbacks.base import FIT_END, AnalysisCallback, analysis_context
from overparam.constraints import (
    JAMMED,
    SAT,
    JammingVerdict,
    constant_unsatisfied,
    constraint_sums,
    delta_histograms,
    gap_tolerance,
    gaps,
)
from overparam.distributed import all_reduce_sum, is_distributed
from overparam.errors import ConfigError, check_fraction, check_positive
from overparam.losses import margins
from overparam.metrics import member_name

if TYPE_CHECKING:
    from overparam.task import StepRecord


class ConstraintCounter(AnalysisCallback):
    """Count unsatisfied hinge constraints on the full training set; stop at SAT or when jammed.

    Args:
        every_n_epochs: count at the end of every n-th epoch. Default: 1.
        every_n_steps: count theta_t at every n-th optimizer step (None: never). Jamming runs
            use 1 with ``batch_size: full``, where a count costs nothing.
        at_fit_start, at_fit_end, at_epochs, name: see ``AnalysisCallback`` (name: ``constraints``).
        stop_when_sat: set ``trainer.should_stop`` once every member has N_Delta = 0. In an
            ensemble a member that is SAT stops training (``Task.freeze_members``) while the
            others go on, as if it were a run of its own.
        stop_when_jammed: set ``trainer.should_stop`` once every member is SAT or jammed (a
            jammed member of an ensemble is frozen too).
        min_rel_decrease: a run improves while its lowest loss falls below ``(1 - this)`` times
            its value at half the steps (``overparam.constraints.JammingVerdict``). Default 1e-3.
        min_plateau_steps: no jammed verdict before this many steps. Default 1000. Nor while a
            ``ReduceLROnPlateau`` learning-rate schedule is above its ``min_lr`` (the endgame).
        gap_tol: Delta above this counts as unsatisfied (None: ``1024 eps`` of the network's
            dtype, ``overparam.constraints.gap_tolerance``).
        bins: log-spaced |Delta| bins of the saved histograms. Default: 60.
        delta_range: ``(smallest, largest)`` |Delta| edges of the histogram (values outside fall
            into the end bins). Default: (1e-8, 1e2); near jamming the small gaps follow power
            laws over many decades (Franz & Parisi 2016), hence log bins.
        save_deltas: also save the raw Delta values (K x P) in each ``.npz``. Default: False.
        save_every: write the ``.npz`` at every ``save_every``-th logged check and at fit end.
            Default: 1.

    Raises:
        ConfigError: for a non-positive ``every_n_steps``, ``min_plateau_steps``, ``bins`` or
            ``save_every``, a ``min_rel_decrease`` outside [0, 1], a negative ``gap_tol`` or a
            bad ``delta_range``.

    Example::

        Trainer(callbacks=[ConstraintCounter(every_n_steps=1, stop_when_sat=True, stop_when_jammed=True)])

    In a config (``trainer.precision: 64-true`` keeps a vanishing loss exact)::

        trainer:
          callbacks:
            - class_path: ConstraintCounter
              init_args: {every_n_steps: 1, stop_when_sat: true, stop_when_jammed: true}
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
        min_rel_decrease: float = 1e-3,
        min_plateau_steps: int = 1000,
        gap_tol: Optional[float] = None,
        bins: int = 60,
        delta_range: Sequence[float] = (1e-8, 1e2),
        save_deltas: bool = False,
        save_every: int = 1,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(at_fit_start, at_fit_end, every_n_epochs, at_epochs, name, every_n_steps)
        check_positive("ConstraintCounter.min_plateau_steps", min_plateau_steps)
        check_positive("ConstraintCounter.bins", bins)
        check_positive("ConstraintCounter.save_every", save_every)
        check_fraction("ConstraintCounter.min_rel_decrease", min_rel_decrease)
        if gap_tol is not None:
            check_positive("ConstraintCounter.gap_tol", gap_tol, allow_zero=True)
        if len(delta_range) != 2 or not 0 < delta_range[0] < delta_range[1]:
            raise ConfigError(
                f"ConstraintCounter.delta_range must be two numbers 0 < smallest < largest, got {list(delta_range)}"
            )
        self.stop_when_sat = stop_when_sat
        self.stop_when_jammed = stop_when_jammed
        self.min_rel_decrease = min_rel_decrease
        self.min_plateau_steps = min_plateau_steps
        self.gap_tol = gap_tol
        self.edges = torch.logspace(float(np.log10(delta_range[0])), float(np.log10(delta_range[1])), bins + 1, dtype=torch.float64)
        self.save_deltas = save_deltas
        self.save_every = save_every
        self.verdict: Optional[JammingVerdict] = None
        self._verdict_state: Optional[dict[str, Any]] = None  # restored before K is known
        self.logged = 0
        self.stopped_by_me = False
        self._tol: Optional[float] = None

    @property
    def status(self) -> list[str]:
        return list(self.verdict.status) if self.verdict is not None else []

    # --- hooks -----------------------------------------------------------------------------
    def on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Needs an overparam DataModule (the full training set) and a task with ``member_outputs``."""
        if stage == "fit" and not hasattr(trainer.datamodule, "analysis_batches"):
            raise ConfigError("ConstraintCounter needs an overparam DataModule (data: ...) to count on the full training set")

    def analyse_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, record: Optional["StepRecord"]) -> None:
        """Count theta_step, from the step's own forward pass when it covered the training set."""
        if record is not None and record.evaluates_train_set:
            pairs = zip(record.outputs, (y for _, y in record.data.chunks), record.losses)
            self._check(trainer, pl_module, f"step={step}", step, pairs)
            return
        with analysis_context(pl_module):
            self._check(trainer, pl_module, f"step={step}", step, None)

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        """Count the current network (epoch end, fit start, fit end) with a pass of its own."""
        self._check(trainer, pl_module, tag, trainer.global_step, None)
        if tag == FIT_END:
            constant = self._constant_unsatisfied(trainer, pl_module)
            values = {"N_delta_constant": float(sum(constant)) / len(constant)}
            if len(constant) > 1:
                values.update({member_name("N_delta_constant", k): float(c) for k, c in enumerate(constant)})
            self.log_metrics(trainer, pl_module, values)
            self._write_verdict(trainer, constant)

    # --- the count ------------------------------------------------------------------------
    def _own_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
        datamodule = trainer.datamodule
        num_points = datamodule.split("train")[0].shape[0]
        for x, y in datamodule.analysis_batches("train", size=num_points):
            out = pl_module.member_outputs(x)  # (K, B, C)
            yield out, y, pl_module.loss_fn(out, y, reduction="none")

    def _constant_unsatisfied(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[int]:
        """``constant_unsatisfied`` of every member on the whole training set (gathered across ranks)."""
        with torch.no_grad():
            shards = [(out, gaps(out, y)) for out, y, _ in self._own_pass(trainer, pl_module)]
        K, dtype, device = pl_module.ensemble_size, next(pl_module.parameters()).dtype, pl_module.device
        # a rank without points (more ranks than points) still joins the gather with empty tensors
        empty_out = torch.zeros(K, 0, pl_module.num_outputs, dtype=dtype, device=device)
        outputs = torch.cat([o for o, _ in shards], dim=1) if shards else empty_out
        delta = torch.cat([d for _, d in shards], dim=1) if shards else torch.zeros(K, 0, dtype=dtype, device=device)
        if is_distributed():  # points are split over ranks: gather them (fit end only)
            outputs, delta = _gather_points(outputs), _gather_points(delta)
        return constant_unsatisfied(outputs, delta, self._gap_tol(pl_module)).tolist()

    def count(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule,
        pairs: Optional[Iterable[tuple[Tensor, Tensor, Tensor]]] = None, histograms: bool = True,
    ) -> dict[str, Tensor]:
        """All-reduced per-member sums over the full training set, histograms, raw Delta (opt.).

        ``pairs``: ``(outputs (K, B, C), y (B,), per-sample losses (K, B))`` of this rank's shard
        of the training set; None for a pass of its own.
        """
        K, device = pl_module.ensemble_size, pl_module.device
        gap_tol = self._gap_tol(pl_module)
        sums = None
        hist = torch.zeros(K, 2, self.edges.numel() - 1, dtype=torch.float64, device=device) if histograms else None
        deltas = []
        with torch.no_grad():
            for out, y, losses in pairs if pairs is not None else self._own_pass(trainer, pl_module):
                chunk = constraint_sums(out, y, losses, gap_tol)
                sums = chunk if sums is None else sums + chunk
                if histograms:
                    delta = gaps(out, y)
                    hist += delta_histograms(delta, self.edges, gap_tol)
                    if self.save_deltas:
                        deltas.append(delta.to(torch.float64))
        if sums is None:  # this rank holds no point (more ranks than points)
            sums = torch.zeros(K, 4, dtype=torch.float64, device=device)
        if not histograms:
            return {"sums": all_reduce_sum(sums)}
        # One collective for everything: every rank gets the single-process sums.
        flat = all_reduce_sum(torch.cat([sums.reshape(-1), hist.reshape(-1)]))
        result = {"sums": flat[: sums.numel()].view_as(sums)}
        if histograms:
            result["hist"] = flat[sums.numel() :].view_as(hist)
            if self.save_deltas:
                local = torch.cat(deltas, dim=1) if deltas else torch.zeros(K, 0, dtype=torch.float64, device=device)
                result["deltas"] = _gather_points(local)
        return result

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The gap tolerance, once the network is in its training dtype."""
        self._tol = self.gap_tol if self.gap_tol is not None else gap_tolerance(next(pl_module.parameters()).dtype)

    def _gap_tol(self, pl_module: pl.LightningModule) -> float:
        if self._tol is None:
            self.on_fit_start(pl_module.trainer, pl_module)
        return self._tol

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str, step: int, pairs: Any) -> None:
        """Count, update the verdict; log, save and stop when due.

        A step check that is neither logged nor saved counts only what the verdict needs
        (N_Delta and the loss, ``_quick_counts``); the full sums follow if the status changed.
        """
        every = max(1, trainer.log_every_n_steps)
        want_log = not tag.startswith("step=") or step % every == 0
        # Files need the histograms: decided before counting, so a plain step check skips them.
        saving = tag == FIT_END or (want_log and self.logged % self.save_every == 0)
        quick = pairs is not None and not want_log
        before = self.status
        result = None
        if quick:
            pairs = list(pairs)
            rows = self._quick_counts(pairs, self._gap_tol(pl_module))
        else:
            result = self.count(trainer, pl_module, pairs, histograms=saving)
            rows = [[n, loss / P] for n, _, loss, P in result["sums"].tolist()]  # one host transfer
        status = self._verdict(len(rows)).update(step, [r[0] for r in rows], [r[1] for r in rows], _annealing(trainer))
        self._freeze_finished(pl_module, status)
        stop = self._should_stop()
        if quick and status == before and not stop:
            return
        if result is None:
            result = self.count(trainer, pl_module, pairs, histograms=False)
        N_delta, n_errors, loss_sum, P = result["sums"].unbind(-1)  # each (K,)
        loss = loss_sum / P
        self._log(trainer, pl_module, tag, step, N_delta, n_errors, loss, P)
        if saving:
            self._save(trainer, tag, step, result, N_delta, n_errors, loss, P)
        if stop and not trainer.should_stop:
            trainer.should_stop = self.stopped_by_me = True
            rank_zero_info(f"ConstraintCounter: stopping at {tag} (step {step}): members {status}")

    @staticmethod
    def _quick_counts(pairs: list[tuple[Tensor, Tensor, Tensor]], gap_tol: float) -> list[list[float]]:
        """Per member ``[N_Delta, mean loss]`` of a step's outputs (all-reduced), one host transfer."""
        n_delta = sum((margins(out, y) < 1.0 - gap_tol).sum(-1) for out, y, _ in pairs)
        loss = sum(losses.sum(-1) for _, _, losses in pairs)
        points = sum(y.shape[0] for _, y, _ in pairs)
        both = all_reduce_sum(torch.stack((n_delta.to(loss.dtype), loss, torch.full_like(loss, points))).to(torch.float64))
        return [[n, l / p] for n, l, p in zip(*both.tolist())]

    def _verdict(self, K: int) -> JammingVerdict:
        if self.verdict is None:
            self.verdict = JammingVerdict(K, self.min_rel_decrease, self.min_plateau_steps)
            if self._verdict_state is not None:
                self.verdict.load_state_dict(self._verdict_state)
        return self.verdict

    def _freeze_finished(self, pl_module: pl.LightningModule, status: list[str]) -> None:
        """Ensembles: a member whose run would have stopped (SAT, or jammed) trains no more."""
        done = [k for k, s in enumerate(status) if (s == SAT and self.stop_when_sat) or (s == JAMMED and self.stop_when_jammed)]
        if done and len(status) > 1 and hasattr(pl_module, "freeze_members"):
            pl_module.freeze_members(done)

    def _should_stop(self) -> bool:
        status = self.status
        all_sat = all(s == SAT for s in status)
        return bool((self.stop_when_sat and all_sat) or (self.stop_when_jammed and self.verdict.done()))

    # --- outputs ---------------------------------------------------------------------------
    def _log(self, trainer, pl_module, tag, step, N_delta, n_errors, loss, P) -> None:
        N = float(pl_module.N)
        per_member = {
            "N_delta": N_delta,
            "N_delta_over_N": N_delta / N,
            "N_delta_over_P": N_delta / P,
            "errors": n_errors,
            "error": n_errors / P,
            "loss": loss,
            "sat": torch.tensor([s == SAT for s in self.status], dtype=torch.float64),
            "jammed": torch.tensor([s == JAMMED for s in self.status], dtype=torch.float64),
        }
        K = N_delta.numel()
        metrics = {name: float(v.mean()) for name, v in per_member.items()}
        if K > 1:
            metrics["sat_fraction"] = metrics.pop("sat")
            metrics["jammed_fraction"] = metrics.pop("jammed")
            for name, v in per_member.items():
                metrics.update({member_name(name, k): float(v[k]) for k in range(K)})
        self.log_metrics(trainer, pl_module, metrics)
        self.history.append({"tag": tag, "epoch": trainer.current_epoch, "step": step, "N": N, "P": float(P[0]),
                             "N_delta": N_delta.tolist(), "errors": n_errors.tolist(), "loss": loss.tolist(),
                             "status": self.status})
        self.logged += 1

    def _save(self, trainer, tag, step, result, N_delta, n_errors, loss, P) -> None:
        arrays = {"edges": self.edges, "hist_unsat": result["hist"][:, 0], "hist_sat": result["hist"][:, 1],
                  "N_delta": N_delta, "errors": n_errors, "loss": loss, "P": P[0], "epoch": trainer.current_epoch,
                  "step": step, "gap_tol": self._gap_tol(trainer.lightning_module)}
        if "deltas" in result:
            arrays["deltas"] = result["deltas"]
        self.save_npz(trainer, f"{tag.replace('=', '_')}.npz", **arrays)
        # W&B: |Delta| of member 0's unsatisfied and satisfied constraints (log-spaced bins).
        self.log_histogram(trainer, "abs_delta_unsat", counts_edges=(result["hist"][0, 0], self.edges))
        self.log_histogram(trainer, "abs_delta_sat", counts_edges=(result["hist"][0, 1], self.edges))

    @rank_zero_only
    def _write_verdict(self, trainer: pl.Trainer, constant: list[int]) -> None:
        """``verdict.json``: per member the status, the final counts (with the unsatisfied points
        in a dead region, ``constant_unsatisfied``) and why the run ended; a warning for a member
        jammed by dead units."""
        if self.stopped_by_me:
            reason = "stopped by ConstraintCounter: " + ("every member SAT" if all(s == SAT for s in self.status) else "every member SAT or jammed")
        elif trainer.should_stop:
            reason = "stopped by another callback"
        else:
            reason = "reached max_epochs/max_steps"
        members = [{"member": k, "status": s, **self.verdict.last[k], "N_delta_constant": constant[k]}
                   for k, s in enumerate(self.status)]
        dead = [k for k, s in enumerate(self.status) if s != SAT and constant[k] > 0]
        if dead:
            counts = ", ".join(f"member {k}: {constant[k]} of {self.verdict.last[k]['N_delta']:.0f}" for k in dead)
            rank_zero_warn(
                f"ConstraintCounter: unsatisfied points on which the network is constant, a dead region where every "
                f"ReLU path is off and no gradient reaches them ({counts}). A run whose every unsatisfied point is "
                "there is stuck by dead units, not jammed: `overparam report jamming` counts it apart (verdict.json: "
                "N_delta_constant)"
            )
        verdict = {
            "reason": reason, "members": members, "gap_tol": self._gap_tol(trainer.lightning_module),
            "min_rel_decrease": self.min_rel_decrease, "min_plateau_steps": self.min_plateau_steps,
        }  # fmt: skip
        with open(os.path.join(self.output_dir(trainer), "verdict.json"), "w") as fh:
            json.dump(verdict, fh, indent=1)

    # --- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(verdict=self.verdict.state_dict() if self.verdict is not None else None, logged=self.logged)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._verdict_state, self.verdict = state_dict.get("verdict"), None
        self.logged = int(state_dict.get("logged", 0))


def _annealing(trainer: pl.Trainer) -> bool:
    """Whether a ReduceLROnPlateau schedule still has learning rates above its floor (``min_lr``)."""
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            groups = scheduler.optimizer.param_groups
            if any(g["lr"] > floor * (1 + 1e-9) + scheduler.eps for g, floor in zip(groups, scheduler.min_lrs)):
                return True
    return False


def _gather_points(values: Tensor) -> Tensor:
    """Every rank's ``(K, B_r, ...)`` values concatenated along the points (rank order); identity on one process."""
    if not is_distributed():
        return values
    return torch.cat(gather_all_tensors(values.transpose(0, 1).contiguous()), dim=0).transpose(0, 1)
