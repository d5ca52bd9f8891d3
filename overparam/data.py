"""DataModule base: whole datasets as tensors on the training device, batches by index.

No DataLoader and no worker processes: each split is one ``(x, y)`` pair of tensors moved to
the device once, and a pass over the training set is a seeded permutation cut into batches
(nanoGPT's ``get_batch`` with a permutation instead of sampling with replacement). Under DDP
every rank draws the same permutation and takes its own disjoint slice of each global batch,
so ``batch_size`` is always the *global* batch size.

Training data reach the Task as *steps* (``TrainStep``: the data of one optimizer step,
possibly in chunks that accumulate) grouped in *blocks*: one loader item is a list of up to
``STEPS_PER_BLOCK`` consecutive steps, which the Task trains in one ``training_step`` call.
Small networks are bound by per-call framework overhead, so a block pays Lightning's
per-batch machinery once for many optimizer steps; every step still gets its own hooks
(``Task`` calls the analysis callbacks' ``on_train_step``), so step schedules stay exact.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor

from overparam import seeds
from overparam.errors import ConfigError, check_positive

Batch = tuple[Tensor, Tensor]
BatchSize = Union[int, str]
FULL_BATCH = "full"
#: Optimizer steps per loader item (one ``training_step`` call). A pure performance knob: 16
#: steps amortise Lightning's per-batch work (~0.4 ms on a CPU) to a few percent of a small
#: network's step, and every step keeps its own hooks, so no result depends on it.
STEPS_PER_BLOCK = 16


def resolve_batch_size(batch_size: BatchSize, num_points: int, option: str = "data.batch_size") -> int:
    """An int batch size, ``full`` meaning all ``num_points`` (full-batch gradient descent)."""
    if batch_size == FULL_BATCH:
        return num_points
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{option} must be a positive integer or 'full', got {batch_size!r}")
    return min(batch_size, num_points)


def check_labels(y: Tensor, num_outputs: int, where: str) -> None:
    """Labels must fit C = ``num_outputs`` outputs, or the loss indexes past them (an IndexError
    deep in the first step) or learns nothing (0/1 labels on one output).

    ``(P, C)`` floats are regression targets; with C = 1, integer labels are -1 or +1 (floats
    may be regression targets); with C >= 2, labels are class indices 0..C-1.

    Raises:
        ConfigError: naming ``where`` (the DataModule and split), C and an offending label.
    """
    if y.numel() == 0:
        return
    if y.dim() == 2 and y.is_floating_point():
        if y.shape[1] != num_outputs:
            raise ConfigError(f"{where}: regression targets have {y.shape[1]} columns but the task has num_outputs = {num_outputs}")
        return
    if num_outputs == 1:
        if not y.is_floating_point() and not bool(((y == 1) | (y == -1)).all()):
            bad = y[(y != 1) & (y != -1)][0].item()
            raise ConfigError(f"{where}: labels for one output must be -1 or +1, found {bad}")
        return
    bad = (y < 0) | (y >= num_outputs)
    if y.is_floating_point():
        bad |= y != y.round()
    if bool(bad.any()):
        raise ConfigError(f"{where}: labels must be class indices 0..{num_outputs - 1} for num_outputs = {num_outputs}, found {y[bad][0].item()}")


def shard(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's contiguous slice of ``indices`` (sizes differ by at most one)."""
    return indices if world_size == 1 else indices.tensor_split(world_size)[rank]


class TrainStep(NamedTuple):
    """The data of one optimizer step on this rank.

    Attributes:
        chunks: this rank's ``(x, y)`` slices of the global batch: one, or several whose
            gradients accumulate into the one step (a global batch above the chunk size).
        global_size: points in the whole global batch (all ranks, all chunks). Each rank's
            loss is its sum divided by this, so the DDP gradient is the exact global mean
            even when slices differ by one point.
        whole_train_set: the global batch is every training point, as stored (no augmentation):
            the step's forward pass then evaluates the current network on the whole training
            set, which analyses may read instead of a pass of their own.
    """

    chunks: tuple[Batch, ...]
    global_size: int
    whole_train_set: bool

    @property
    def num_points(self) -> int:
        """Points of this step on this rank."""
        return sum(x.shape[0] for x, _ in self.chunks)


def plan_pass(num_points: int, size_of_step: Callable[[int], int], world_size: int = 1) -> list[int]:
    """Global batch sizes of one pass over ``num_points``, cut greedily in order.

    ``size_of_step(i)`` is the wanted size of the pass's i-th step. A final global batch
    smaller than the world size would leave a rank empty: it is dropped.
    """
    sizes, start = [], 0
    while start < num_points:
        wanted = size_of_step(len(sizes))
        size = min(wanted, num_points - start)
        if size < wanted and size < world_size:
            break
        sizes.append(size)
        start += size
    return sizes


class EvalBatches:
    """A split in its natural order, in chunks of ``batch_size``, this rank's slice of each.

    Yields ``(x, y)``. Evaluation sums over points, so the cut does not change the totals.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return math.ceil(self.x.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        # Every point counts once: a last chunk smaller than the world size leaves some ranks
        # an empty slice rather than being dropped (evaluation sums are reduced per epoch).
        for chunk in torch.arange(self.x.shape[0], device=self.x.device).split(self.batch_size):
            local = shard(chunk, self.rank, self.world_size)
            yield self.x[local], self.y[local]


class TrainSteps:
    """One epoch of training steps from device-resident tensors, in blocks of steps.

    An epoch is ``passes`` passes over the training set; pass r of epoch e draws the
    permutation seeded by ``seed`` and ``e * passes + r`` (the same on every rank), so the
    data order of a given pass does not depend on ``passes``. The sizes of the epoch's steps
    are planned when the epoch starts (``len``/``iter``), from ``size_of_step(i)``, the
    global size wanted for the epoch's i-th step; a schedule that changes the batch size at
    a step (``BatchSizeSwitch``) then lands exactly on it, and Lightning knows the epoch's
    length up front.

    Args:
        x, y: the whole training split, already on the device.
        size_of_step: ``i -> global batch size`` of the epoch's i-th step (read at planning).
        seed: base seed of the permutations.
        epoch: returns the current epoch.
        passes: passes over the training set per epoch (with ``full``: GD steps per epoch).
        rank, world_size: this process's slot under DDP.
        chunk_size: optional global chunk size: a larger global batch is trained as chunks of
            at most this many points whose gradients accumulate into one step.
        transform: optional ``(x, generator) -> x`` applied to every training batch
            (augmentation); its generator is seeded from ``seed``, the epoch and the rank.
        steps_per_block: steps per yielded block (``STEPS_PER_BLOCK``).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        size_of_step: Callable[[int], int],
        seed: int = 0,
        epoch: Callable[[], int] = lambda: 0,
        passes: int = 1,
        rank: int = 0,
        world_size: int = 1,
        chunk_size: Optional[int] = None,
        transform: Optional[Callable[[Tensor, torch.Generator], Tensor]] = None,
        steps_per_block: int = STEPS_PER_BLOCK,
    ) -> None:
        self.x, self.y = x, y
        self.size_of_step = size_of_step
        self.seed, self.epoch, self.passes = seed, epoch, passes
        self.rank, self.world_size = rank, world_size
        self.chunk_size = chunk_size
        self.transform = transform
        self.steps_per_block = steps_per_block

    @property
    def num_points(self) -> int:
        return self.x.shape[0]

    def plan(self) -> list[list[int]]:
        """The global batch sizes of this epoch's steps, one list per pass."""
        plans, done = [], 0
        for _ in range(self.passes):
            sizes = plan_pass(self.num_points, lambda i, done=done: self.size_of_step(done + i), self.world_size)
            plans.append(sizes)
            done += len(sizes)
        return plans

    def __len__(self) -> int:
        """Blocks in this epoch (Lightning's ``num_training_batches``)."""
        return math.ceil(sum(len(p) for p in self.plan()) / self.steps_per_block)

    def permutation(self, pass_index: int) -> Tensor:
        generator = seeds.pass_order(self.seed, pass_index)
        return torch.randperm(self.num_points, generator=generator).to(self.x.device)

    def steps(self) -> Iterator[TrainStep]:
        """This epoch's steps in order."""
        epoch = self.epoch()
        generator = None
        if self.transform is not None:
            generator = seeds.augmentation(self.seed, epoch, self.rank, self.x.device)
        for r, sizes in enumerate(self.plan()):
            order, start = self.permutation(epoch * self.passes + r), 0
            for size in sizes:
                global_batch = order[start : start + size]
                start += size
                pieces = global_batch.split(self.chunk_size) if self.chunk_size else (global_batch,)
                chunks = []
                for piece in pieces:
                    local = shard(piece, self.rank, self.world_size)
                    x = self.x[local]
                    chunks.append((self.transform(x, generator) if generator is not None else x, self.y[local]))
                whole = size == self.num_points and self.transform is None
                yield TrainStep(tuple(chunks), size, whole)

    def __iter__(self) -> Iterator[list[TrainStep]]:
        block: list[TrainStep] = []
        for step in self.steps():
            block.append(step)
            if len(block) == self.steps_per_block:
                yield block
                block = []
        if block:
            yield block


class OverparamDataModule(pl.LightningDataModule):
    """Base of every task's data: subclasses implement ``load_splits`` and the shape properties.

    The properties ``input_shape``, ``num_outputs`` and ``num_train`` (P) must be known from
    the init arguments alone: the CLI links them to the Task before any data is loaded.

    Args:
        batch_size: global training batch size, or ``"full"`` for full-batch gradient descent.
            It may change between epochs or at a step (``BatchSizeSwitch``).
        eval_batch_size: batch size of validation/test/analysis passes (memory only).
        seed: seed of the data (generation, subsampling) and of the batch order.
        analysis_size: points of the training set given to analysis callbacks
            (``analysis_batches``); None for all of them.
        passes_per_epoch: passes over the training set in one epoch (default 1). With
            ``batch_size: full`` an epoch is then this many gradient-descent steps: long GD
            runs (jamming) set 100 or more, so the once-per-epoch work (metrics, checkpoint,
            validation, epoch-scheduled analyses) is paid once per that many steps.

    A batch-size schedule (``BatchSizeSwitch``) is installed with ``schedule_batches``.
    """

    def __init__(
        self,
        batch_size: BatchSize = 128,
        eval_batch_size: int = 8192,
        seed: int = 0,
        analysis_size: Optional[int] = None,
        passes_per_epoch: int = 1,
    ) -> None:
        super().__init__()
        if batch_size != FULL_BATCH:
            resolve_batch_size(batch_size, 1)
        if eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be a positive integer, got {eval_batch_size}")
        if analysis_size is not None and analysis_size < 1:
            raise ConfigError(f"data.analysis_size must be a positive integer or null, got {analysis_size}")
        check_positive("data.passes_per_epoch", passes_per_epoch)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.analysis_size = analysis_size
        self.passes_per_epoch = passes_per_epoch
        self.splits: dict[str, Batch] = {}
        self._size_at: Optional[Callable[[int], BatchSize]] = None
        self._chunk_size: Optional[int] = None

    def schedule_batches(self, size_at: Optional[Callable[[int], BatchSize]], chunk_size: Optional[int] = None) -> None:
        """Train with a batch-size schedule from the next epoch on.

        Args:
            size_at: ``i -> global batch size`` (an int or ``"full"``) of the coming epoch's
                i-th optimizer step, read when the epoch is planned (so a switch can land on an
                exact step mid-epoch); None: ``batch_size`` throughout.
            chunk_size: global batches larger than this are trained in chunks whose gradients
                accumulate into one step (exact GD in bounded memory); None: no chunks.
        """
        self._size_at, self._chunk_size = size_at, chunk_size

    # --- what subclasses provide -------------------------------------------------------------
    def load_splits(self) -> dict[str, Batch]:
        """Return ``{"train": (x, y), "test": (x, y)[, "val": (x, y)]}`` as CPU tensors.

        ``x`` is ``(P, *input_shape)`` (floating, or integer tokens); ``y`` is ``(P,)``: class
        indices (int64) for C >= 2 outputs, +-1 floats for one output with a binary task, or
        ``(P, C)`` floats for regression.
        """
        raise NotImplementedError

    def train_transform(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Random transformation of a training batch (augmentation); None: no transformation.

        Subclasses that augment override this method; ``generator`` lives on the data's
        device and is seeded from the data seed, the epoch and the rank.
        """
        raise NotImplementedError

    @property
    def augments(self) -> bool:
        """Whether ``train_transform`` is used (subclasses that augment return True)."""
        return False

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
        for name, (_, y) in splits.items():
            check_labels(y, self.num_outputs, f"{type(self).__name__} {name} split")
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

    def _size_of_step(self, i: int) -> int:
        if self._size_at is None:
            return self.current_batch_size()
        return resolve_batch_size(self._size_at(i), self.split("train")[0].shape[0])

    def train_dataloader(self) -> TrainSteps:
        x, y = self.split("train")
        rank, world = self._rank_and_world()
        return TrainSteps(
            x, y, self._size_of_step, self.seed, self._current_epoch, self.passes_per_epoch, rank, world,
            chunk_size=self._chunk_size, transform=self.train_transform if self.augments else None,
        )  # fmt: skip

    def _eval_loader(self, name: str) -> EvalBatches:
        x, y = self.split(name)
        rank, world = self._rank_and_world()
        return EvalBatches(x, y, self.eval_batch_size, rank, world)

    def val_dataloader(self) -> EvalBatches | list:
        if "val" not in self.splits:
            return []
        return self._eval_loader("val")

    def test_dataloader(self) -> EvalBatches:
        return self._eval_loader("test")

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
        generator = seeds.analysis_subset(self.seed)
        chosen = torch.randperm(x.shape[0], generator=generator)[: min(size, x.shape[0])]
        chosen = chosen.sort().values.to(x.device)
        if shard_across_ranks:
            rank, world = self._rank_and_world()
            chosen = shard(chosen, rank, world)
        chunk = batch_size or self.eval_batch_size
        return [(x[idx], y[idx]) for idx in chosen.split(chunk)] if chosen.numel() else []
