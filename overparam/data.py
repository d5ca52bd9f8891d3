"""DataModule base: whole datasets as tensors on the training device, batches by index.

No DataLoader and no worker processes: each split is one ``(x, y)`` pair of tensors moved to
the device once, and an epoch is a seeded permutation cut into batches (nanoGPT's
``get_batch`` with a permutation instead of sampling with replacement). Under DDP every rank
draws the same permutation and takes its own disjoint slice of each global batch, so
``batch_size`` is always the *global* batch size.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor

from overparam.errors import ConfigError

Batch = tuple[Tensor, Tensor]
BatchSize = Union[int, str]
FULL_BATCH = "full"


def resolve_batch_size(batch_size: BatchSize, num_points: int, option: str = "data.batch_size") -> int:
    """An int batch size, ``full`` meaning all ``num_points`` (full-batch gradient descent)."""
    if batch_size == FULL_BATCH:
        return num_points
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{option} must be a positive integer or 'full', got {batch_size!r}")
    return min(batch_size, num_points)


def shard(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's contiguous slice of ``indices`` (sizes differ by at most one)."""
    return indices.tensor_split(world_size)[rank]


class ResidentBatches:
    """One epoch of batches from device-resident tensors.

    Yields ``(x, y, n)`` with ``n`` the global batch size, so the task can weight each rank's
    sum exactly (``sum_local / n`` summed over ranks is the global mean even when ranks hold
    unequal slices). The permutation is drawn from ``seed`` and the epoch number at iteration
    time; ``batch_size`` and ``epoch`` are callables so that a loader created once follows
    batch-size switches and epochs.

    Args:
        x, y: the whole split, already on the device.
        batch_size: returns the global batch size now.
        shuffle: a new permutation each epoch (training) or the natural order (evaluation).
        seed: base seed of the permutations (same on every rank).
        epoch: returns the current epoch.
        rank, world_size: this process's slot under DDP.
        batch_size_at: optional ``i -> global size of the i-th batch of this epoch``, read when
            the epoch is planned (``len``/``iter``); overrides ``batch_size``. It lets a
            step-scheduled switch (``BatchSizeSwitch``) land on an exact step mid-epoch.
        chunk_size: optional global chunk size: a global batch larger than it is yielded as
            consecutive chunks ``(x, y, n, num_chunks)``, ``n`` still the whole global batch,
            whose gradients accumulate into one optimizer step (the Trainer's
            ``accumulate_grad_batches`` must equal ``num_chunks``; ``BatchSizeSwitch`` sets it).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: Callable[[], int],
        shuffle: bool,
        seed: int = 0,
        epoch: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size_at: Optional[Callable[[int], int]] = None,
        chunk_size: Optional[int] = None,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.rank, self.world_size = rank, world_size
        self.batch_size_at = batch_size_at
        self.chunk_size = chunk_size

    def _num_points(self) -> int:
        return self.x.shape[0]

    def global_batch_sizes(self) -> list[int]:
        """The global batch sizes of this epoch, in order (the permutation is cut greedily)."""
        n, sizes, start = self._num_points(), [], 0
        while start < n:
            wanted = self.batch_size_at(len(sizes)) if self.batch_size_at is not None else self.batch_size()
            size = min(wanted, n - start)
            # A final global batch smaller than the world size would leave a rank empty: dropped.
            if size < wanted and size < self.world_size:
                break
            sizes.append(size)
            start += size
        return sizes

    def num_chunks(self, size: int) -> int:
        """How many chunks (loader items, backward passes) one global batch of ``size`` takes."""
        return 1 if self.chunk_size is None else -(-size // self.chunk_size)

    def __len__(self) -> int:
        return sum(self.num_chunks(size) for size in self.global_batch_sizes())

    def permutation(self) -> Tensor:
        if not self.shuffle:
            return torch.arange(self._num_points(), device=self.x.device)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch())
        return torch.randperm(self._num_points(), generator=generator).to(self.x.device)

    def __iter__(self) -> Iterator[tuple]:
        order = self.permutation()
        start = 0
        for size in self.global_batch_sizes():
            global_batch = order[start : start + size]
            start += size
            chunks = self.num_chunks(size)
            if chunks == 1:
                local = shard(global_batch, self.rank, self.world_size)
                yield self.x[local], self.y[local], size
                continue
            for piece in global_batch.split(self.chunk_size):
                local = shard(piece, self.rank, self.world_size)
                yield self.x[local], self.y[local], size, chunks


class OverparamDataModule(pl.LightningDataModule):
    """Base of every task's data: subclasses implement ``load_splits`` and the shape properties.

    The properties ``input_shape``, ``num_outputs`` and ``num_train`` (P) must be known from
    the init arguments alone: the CLI links them to the Task before any data is loaded.

    Args:
        batch_size: global training batch size, or ``"full"`` for full-batch gradient descent.
            It may change between epochs (``BatchSizeSwitch``).
        eval_batch_size: batch size of validation/test/analysis passes (memory only).
        seed: seed of the data (generation, subsampling) and of the batch order.
        analysis_size: points of the training set given to analysis callbacks
            (``analysis_batches``); None for all of them.

    Attributes set by ``BatchSizeSwitch`` (None otherwise): ``batch_size_at`` (global size of
    the i-th training batch of the coming epoch) and ``train_chunk_size`` (global batches
    larger than this are yielded in chunks that accumulate into one step).
    """

    batch_size_at: Optional[Callable[[int], BatchSize]] = None
    train_chunk_size: Optional[int] = None

    def __init__(
        self,
        batch_size: BatchSize = 128,
        eval_batch_size: int = 8192,
        seed: int = 0,
        analysis_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if batch_size != FULL_BATCH:
            resolve_batch_size(batch_size, 1)
        if eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be a positive integer, got {eval_batch_size}")
        if analysis_size is not None and analysis_size < 1:
            raise ConfigError(f"data.analysis_size must be a positive integer or null, got {analysis_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.analysis_size = analysis_size
        self.splits: dict[str, Batch] = {}

    # --- what subclasses provide -------------------------------------------------------------
    def load_splits(self) -> dict[str, Batch]:
        """Return ``{"train": (x, y), "test": (x, y)[, "val": (x, y)]}`` as CPU tensors."""
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def num_outputs(self) -> int:
        raise NotImplementedError

    @property
    def num_train(self) -> int:
        """P: the number of training points."""
        raise NotImplementedError

    # --- derived ----------------------------------------------------------------------------
    @property
    def in_dim(self) -> int:
        return math.prod(self.input_shape)

    @property
    def device(self) -> torch.device:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """float64 when the Trainer runs in ``precision: 64-true`` (jamming studies), else float32."""
        if self.trainer is not None and str(self.trainer.precision).startswith("64"):
            return torch.float64
        return torch.float32

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the splits once and move them to the device in the working dtype."""
        wanted = (self.device, self.dtype)
        if self.splits and getattr(self, "_placed_on", None) == wanted:
            return
        splits = self.splits or self.load_splits()
        self.splits = {name: self._place(x, y) for name, (x, y) in splits.items()}
        self._placed_on = wanted

    def _place(self, x: Tensor, y: Tensor) -> Batch:
        x = x.to(self.device)
        if x.is_floating_point():
            x = x.to(self.dtype)
        if y.is_floating_point():
            y = y.to(self.dtype)
        return x, y.to(self.device)

    def split(self, name: str) -> Batch:
        if not self.splits:
            self.setup()
        try:
            return self.splits[name]
        except KeyError:
            raise ConfigError(f"{type(self).__name__} has no {name!r} split; it has {sorted(self.splits)}") from None

    def current_batch_size(self) -> int:
        return resolve_batch_size(self.batch_size, self.split("train")[0].shape[0])

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _loader(self, name: str, shuffle: bool, batch_size: Callable[[], int], **kwargs) -> ResidentBatches:
        x, y = self.split(name)
        rank, world = self._rank_and_world()
        return ResidentBatches(x, y, batch_size, shuffle, self.seed, self._current_epoch, rank, world, **kwargs)

    def _train_batch_size_at(self, i: int) -> int:
        return resolve_batch_size(self.batch_size_at(i), self.split("train")[0].shape[0])

    def train_dataloader(self) -> ResidentBatches:
        planned = self._train_batch_size_at if self.batch_size_at is not None else None
        return self._loader("train", True, self.current_batch_size, batch_size_at=planned, chunk_size=self.train_chunk_size)

    def val_dataloader(self) -> ResidentBatches | list:
        if "val" not in self.splits:
            return []
        return self._loader("val", False, lambda: self.eval_batch_size)

    def test_dataloader(self) -> ResidentBatches:
        return self._loader("test", False, lambda: self.eval_batch_size)

    # --- fixed data for analysis callbacks ------------------------------------------------
    def analysis_batches(
        self,
        split: str = "train",
        size: Optional[int] = None,
        batch_size: Optional[int] = None,
        shard_across_ranks: bool = True,
    ) -> list[Batch]:
        """A fixed, deterministic subset of a split, in chunks, for analysis callbacks.

        The subset is the first ``size`` points (default ``analysis_size``, or all) of a
        permutation seeded by ``seed`` alone, so it is the same at every call, epoch and
        rank. Under DDP each rank gets a disjoint contiguous shard (``shard_across_ranks``):
        engines sum over their shard and all-reduce, which gives the single-process answer.
        """
        x, y = self.split(split)
        size = size or (self.analysis_size if split == "train" else None) or x.shape[0]
        generator = torch.Generator().manual_seed(self.seed + 7919)
        chosen = torch.randperm(x.shape[0], generator=generator)[: min(size, x.shape[0])]
        chosen = chosen.sort().values.to(x.device)
        if shard_across_ranks:
            rank, world = self._rank_and_world()
            chosen = shard(chosen, rank, world)
        chunk = batch_size or self.eval_batch_size
        return [(x[idx], y[idx]) for idx in chosen.split(chunk)] if chosen.numel() else []

