"""The two collective operations engines need, as no-ops outside torch.distributed.

Engines return sums over their shard and call ``all_reduce_sum``; with a shared seed for
random probes every rank then holds the single-process answer (torchmetrics' pattern: reduce
sums, divide last).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place (and return it); identity on one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def total_count(count: int, device: torch.device | str = "cpu") -> int:
    """The number of points over all ranks, from this rank's count."""
    if not is_distributed():
        return count
    t = torch.tensor([count], device=device, dtype=torch.float64)
    return int(all_reduce_sum(t).item())
