"""torchmetrics states for per-member means: one running (sum, count) per ensemble member."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class MemberMean(Metric):
    """Mean of per-sample values for each of K members, reduced as sums across ranks.

    ``update(values)`` takes ``(K, B)`` values; ``compute()`` returns the ``(K,)`` means.
    Sums and counts are the states (``dist_reduce_fx="sum"``), so the DDP value equals the
    single-process value exactly (torchmetrics' own MSE does the same).
    """

    full_state_update = False

    def __init__(self, num_members: int = 1) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(num_members, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        self.total += values.detach().sum(-1).to(self.total.dtype)
        self.count += values.shape[-1]

    def compute(self) -> Tensor:
        return self.total / self.count.clamp_min(1)
