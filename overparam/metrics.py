"""Metrics of ensembles: their names, per-member means, and the statistics of the ensemble average.

Names: a per-member quantity ``name`` of member k of a K-member ensemble is logged as
``name/member_k``; with K = 1 the bare ``name`` is the one network's value. With K > 1 a bare
name, where one is logged, is the members' mean (``train/loss``) or the ensemble's own quantity
(``test/ensemble_error``). ``member_suffix`` and ``member_name`` write that convention for the
scalars of the Task, the callbacks and the report. (Analyses of a pair of members, such as
``InterpolationBarrier``'s ``barriers_init/member_k/...``, and ``LossSurface``'s per-member
prefix name a folder-like group instead.)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torchmetrics import Metric

from overparam.losses import errors


def member_name(name: str, member: int) -> str:
    """``name/member_k``: member k's value of ``name``."""
    return f"{name}/member_{member}"


def member_suffix(member: int, num_members: int) -> str:
    """The suffix of member k's metrics: ``/member_k``, or none for a single network (K = 1)."""
    return f"/member_{member}" if num_members > 1 else ""


class MemberMean(Metric):
    """Mean of per-sample values for each of K members, reduced as sums across ranks.

    ``update(total, count)`` takes the ``(K,)`` sums of a rank's values and how many samples
    they cover; ``compute()`` returns the ``(K,)`` means. Sums and counts are the states
    (``dist_reduce_fx="sum"``), so the DDP value equals the single-process value exactly
    (torchmetrics' own MSE does the same). Taking sums lets a task accumulate them in plain
    tensors during an epoch and update once at its end (the update wrapper costs ~40 us a call).
    """

    full_state_update = False

    def __init__(self, num_members: int = 1) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(num_members, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, total: Tensor, count: Tensor | int) -> None:
        self.total += total.detach().to(self.total.dtype)
        self.count += count

    def compute(self) -> Tensor:
        return self.total / self.count.clamp_min(1)


class EnsembleStatistics(Metric):
    """Ensemble-average error and loss, member errors and losses, and output fluctuations.

    For K members with outputs ``f_k(x)`` (before the sign/argmax) on P' points: the 0/1 error
    and the loss of ``f_bar = 1/K sum_k f_k``; each member's error and loss; and each member's
    output fluctuation ``1/P' sum_x |f_k(x) - f_bar(x)|^2`` (summed over the C outputs; their
    mean over k is the empirical variance over members, with 1/K). Geiger et al. 2020 (J. Stat.
    Mech. 023401, Sec. 3): past the jamming point ``|f_N - <f_N>| ~ N^{-1/4}``, which averaging
    removes.

    ``update(outputs, y)`` takes ``(K, B, C)`` outputs; the states are sums with
    ``dist_reduce_fx="sum"`` (one all-reduce at ``compute``), so the DDP value equals one
    process's. ``compute()`` returns ``ensemble_error``, ``ensemble_loss``,
    ``mean_member_error``, ``mean_member_loss``, ``fluctuation`` (floats), ``member_error``,
    ``member_loss``, ``member_fluctuation`` (``(K,)`` tensors) and ``points``.

    Args:
        num_members: K.
        loss_fn: ``loss_fn(outputs, y, reduction="none")``; None skips the losses.
    """

    full_state_update = False

    def __init__(self, num_members: int, loss_fn: Optional[Callable[..., Tensor]] = None) -> None:
        super().__init__()
        self.K, self.loss_fn = num_members, loss_fn
        # Rows: member errors, member losses, member fluctuations (sums over points).
        self.add_state("members", torch.zeros(3, num_members, dtype=torch.float64), dist_reduce_fx="sum")
        # Ensemble errors, ensemble loss, points.
        self.add_state("scalars", torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, outputs: Tensor, y: Tensor) -> None:
        outputs = outputs.detach()
        f_bar = outputs.mean(0)  # (B, C)
        zeros = torch.zeros(self.K, device=outputs.device, dtype=outputs.dtype)
        self.members += torch.stack(
            [
                errors(outputs, y).sum(-1),  # (K,)
                self.loss_fn(outputs, y, reduction="none").sum(-1) if self.loss_fn else zeros,
                (outputs - f_bar).square().sum(-1).sum(-1),  # (K,)  sum_x |f_k - f_bar|^2
            ]
        ).to(self.members)
        self.scalars += torch.stack(
            [
                errors(f_bar, y).sum(),
                self.loss_fn(f_bar, y, reduction="sum") if self.loss_fn else zeros[0],
                torch.tensor(float(outputs.shape[1]), device=outputs.device, dtype=outputs.dtype),
            ]
        ).to(self.scalars)

    def compute(self) -> dict[str, Any]:
        points = float(self.scalars[2].clamp_min(1))
        member_error, member_loss, member_fluct = (row / points for row in self.members.cpu())
        return {
            "ensemble_error": float(self.scalars[0]) / points,
            "ensemble_loss": float(self.scalars[1]) / points,
            "mean_member_error": float(member_error.mean()),
            "mean_member_loss": float(member_loss.mean()),
            "fluctuation": float(member_fluct.mean()),
            "member_error": member_error,
            "member_loss": member_loss,
            "member_fluctuation": member_fluct,
            "points": int(self.scalars[2]),
        }
