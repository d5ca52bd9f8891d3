"""Task: the LightningModule every task plugin extends.

A task owns a network ``f(theta; x)`` (built by ``make_network``), a loss name, and
optionally an ensemble of K independently initialised copies trained together with stacked
parameters (``torch.func.stack_module_state`` + ``vmap``). It logs ``{train,val,test}/loss``
and ``/error`` (per member and for the ensemble average when K > 1), and N and P as
hyperparameters. Engines reach the network through ``functional_view()`` only.

Writing a task::

    class MyTask(Task):
        def __init__(self, width: int = 64, **kwargs):
            super().__init__(**kwargs)
            self.width = width
            self.setup_network()          # builds K members of make_network()

        def make_network(self) -> nn.Module:
            return FullyConnected(self.in_dim, self.num_outputs, self.width)
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import DoublePrecision, Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from overparam.data import TrainStep
from overparam.distributed import all_reduce_sum
from overparam.errors import ConfigError, DivergenceError, check_choice, check_positive
from overparam.functional import FunctionalView, ensemble_fn, module_fn, stack_members
from overparam.losses import LOSS_NAMES, errors, get_loss
from overparam.metrics import MemberMean, member_name
from overparam.models import check_fits_in_memory, count_parameters

SPLITS = ("train", "val", "test")
#: training points whose outputs may wait for the block's batched error count (memory bound).
PENDING_POINTS = 1 << 16


class StepRecord(NamedTuple):
    """What a callback's ``on_train_step`` sees of optimizer step ``index`` (before its update).

    Attributes:
        index: t, the updates done so far (Lightning's ``global_step``): the network is theta_t.
        epoch: the current epoch.
        data: the step's ``TrainStep`` (this rank's chunks and the global batch size).
        outputs: the ``(K, B, C)`` training-mode outputs of theta_t on each chunk (detached).
        losses: the ``(K, B)`` per-sample losses of each chunk (detached).
        evaluates_train_set: the outputs are those of theta_t on every training point (this
            rank's shard) exactly as an evaluation would compute them: the batch is the whole
            training set, not augmented, and no module behaves differently in training mode.
    """

    index: int
    epoch: int
    data: TrainStep
    outputs: tuple[Tensor, ...]
    losses: tuple[Tensor, ...]
    evaluates_train_set: bool


def _mangle(name: str) -> str:
    # ParameterDict keys may not contain dots.
    return name.replace(".", "__")


def _unmangle(name: str) -> str:
    return name.replace("__", ".")


class Task(pl.LightningModule):
    """Base LightningModule of overparam tasks.

    Args:
        input_shape: shape of one input (linked from the DataModule by the CLI).
        num_outputs: C, the number of outputs (1 for binary labels in {-1, +1}; linked).
        num_train: P, the number of training points (linked; logged as a hyperparameter).
        loss: one of ``cross_entropy``, ``squared_hinge``, ``hinge``, ``mse``.
        lr, momentum, weight_decay: the default SGD optimizer (``--optimizer`` replaces it).
        ensemble_size: K independently initialised members trained together (default 1).
        init_seed: member k is initialised from seed ``init_seed + k``, so member k of an
            ensemble equals a single run with ``init_seed + k``.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1,),
        num_outputs: int = 1,
        num_train: int = 0,
        loss: str = "cross_entropy",
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        ensemble_size: int = 1,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive("model.lr", lr)
        check_positive("model.momentum", momentum, allow_zero=True)
        check_positive("model.weight_decay", weight_decay, allow_zero=True)
        check_positive("model.ensemble_size", ensemble_size)
        check_positive("model.num_outputs", num_outputs)
        self.save_hyperparameters()
        self.input_shape = tuple(input_shape)
        self.num_outputs = num_outputs
        self.num_train = num_train
        self.loss_name, self.loss_fn = self.make_loss(loss)
        self.ensemble_size = ensemble_size
        self.init_seed = init_seed
        self._built = False
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{name}": MemberMean(ensemble_size)
                for split in SPLITS
                for name in ("loss", "error", "ensemble_error")
            }
        )
        self._epoch_sums: dict[str, dict[str, Any]] = {}
        self._step_hooks: list[Any] = []
        self.frozen_members: list[int] = []  # ensemble members that train no more (freeze_members)
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []  # training (outputs, y, losses) not yet recorded
        self._pending_points = 0
        self._mode_dependent = True
        self._direct = False
        # Blocks of several optimizer steps per training_step (overparam.data.TrainSteps).
        self.automatic_optimization = False

    def make_loss(self, name: str) -> tuple[str, Callable[..., Tensor]]:
        """``(name, loss_fn)`` of the ``loss`` argument, one of ``overparam.losses``.

        A task whose loss is its own (p-spin's energy) overrides this. ``loss_fn(outputs, y,
        reduction)`` takes ``(..., B, C)`` outputs; ``reduction="none"`` gives ``(..., B)``.
        """
        check_choice("model.loss", name, LOSS_NAMES)
        return name, get_loss(name)

    # --- the network ------------------------------------------------------------------------
    @property
    def in_dim(self) -> int:
        return math.prod(self.input_shape)

    def make_network(self) -> nn.Module:
        """Return one freshly initialised network (called K times under different seeds)."""
        raise NotImplementedError

    def setup_network(self) -> None:
        """Build the K members; subclasses call this at the end of their ``__init__``."""
        if self._built:
            return
        check_fits_in_memory(self.make_network, self.ensemble_size, type(self).__name__)
        nets = []
        for k in range(self.ensemble_size):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.init_seed + k)
                nets.append(self.make_network())
        if self.ensemble_size == 1:
            self.net = nets[0]
        else:
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in nets[0].modules()):
                raise ConfigError(
                    "model.ensemble_size > 1 needs a vmap-safe network, and this one has BatchNorm; "
                    "turn BatchNorm off or use ensemble_size 1"
                )
            params, buffers, template = stack_members(nets)
            self.member_params = nn.ParameterDict({_mangle(n): nn.Parameter(p) for n, p in params.items()})
            self.member_buffers = nn.Module()
            for n, b in buffers.items():
                self.member_buffers.register_buffer(_mangle(n), b)
            # The template only supplies the architecture to functional_call (no storage).
            object.__setattr__(self, "_template", template)
        self.N = count_parameters(nets[0])
        self._built = True

    def configure_model(self) -> None:
        self.setup_network()

    def functional_view(self) -> FunctionalView:
        """``fn(params, buffers, x)`` with the current params (leading dim K for ensembles)."""
        self.setup_network()
        if self.ensemble_size == 1:
            return FunctionalView(
                fn=module_fn(self.net),
                params=dict(self.net.named_parameters()),
                buffers=dict(self.net.named_buffers()),
            )
        single = module_fn(self._template)
        return FunctionalView(
            fn=ensemble_fn(single),
            params={_unmangle(n): p for n, p in self.member_params.items()},
            buffers={_unmangle(n): b for n, b in self.member_buffers.named_buffers()},
            ensemble_size=self.ensemble_size,
            single_fn=single,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Outputs ``(B, C)``, or ``(K, B, C)`` for an ensemble."""
        if self.ensemble_size == 1:
            return self.net(x)
        return self.functional_view()(x)

    def member_outputs(self, x: Tensor) -> Tensor:
        """Outputs with the member dimension always present: ``(K, B, C)``."""
        out = self(x)
        return out.unsqueeze(0) if self.ensemble_size == 1 else out

    # --- steps ------------------------------------------------------------------------------
    def _step(self, batch: Sequence[Tensor], split: str, global_size: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Forward one chunk ``(x, y)``, add its losses and errors to the epoch sums.

        Returns ``(loss, outputs, losses)``: the loss to backpropagate (``batch_loss``), the
        ``(K, B, C)`` outputs and the ``(K, B)`` per-sample losses.
        """
        x, y = batch[0], batch[1]
        out = self.member_outputs(x)  # (K, B, C)
        per_sample = self.loss_fn(out, y, reduction="none")  # (K, B)
        if split != "train":  # training steps are recorded a block at a time (training_step)
            self.record_outputs(split, out, y, per_sample)
        return self.batch_loss(per_sample, global_size), out, per_sample

    def record_outputs(self, split: str, outputs: Tensor, y: Tensor, losses: Tensor) -> None:
        """Add ``(K, B, C)`` outputs' errors and ``(K, B)`` losses (and the ensemble's errors) to the epoch sums."""
        ensemble_errors = errors(outputs.mean(0), y) if self.ensemble_size > 1 else None
        self.record(split, losses, errors(outputs, y), ensemble_errors)

    def batch_loss(self, per_sample: Tensor, global_size: Optional[int] = None) -> Tensor:
        """This rank's share of the global batch mean, summed over members (whose gradients stay apart).

        Each rank's sum over its slice is divided by the global batch size; DDP averages over
        ranks, so ``world_size`` restores the exact global mean even for unequal slices.
        ``global_size`` defaults to this rank's points times the world size (equal slices).
        """
        world_size = self._trainer.world_size if self._trainer is not None else 1
        global_size = global_size or per_sample.shape[-1] * world_size
        return per_sample.sum() * (world_size / global_size)

    def record(self, split: str, losses: Tensor, errors_k: Tensor, ensemble_errors: Optional[Tensor] = None) -> None:
        """Add a batch's per-sample ``(K, B)`` losses and errors (and the ensemble's ``(B,)``) to the epoch sums.

        Plain float64 tensor sums on the device (a few operations per step), pushed into the
        torchmetrics states once per epoch.
        """
        sums = self._epoch_sums.setdefault(split, {"count": 0})
        totals = torch.stack((losses.detach(), errors_k.to(losses.dtype))).sum(-1)  # (2, K): loss, error
        if "loss_error" in sums:
            sums["loss_error"].add_(totals)
        else:
            sums["loss_error"] = totals.double()
        if ensemble_errors is not None:
            total = ensemble_errors.sum(-1, keepdim=True).double()
            sums["ensemble_error"] = sums["ensemble_error"] + total if "ensemble_error" in sums else total
        sums["count"] += losses.shape[-1]

    def epoch_means(self, split: str = "train") -> Optional[dict[str, float]]:
        """Mean loss and 0/1 error (averaged over members) of this epoch's ``split`` so far, this rank.

        For progress displays (one host sync); None before the epoch's first batch.
        """
        sums = self._epoch_sums.get(split)
        if not sums or "loss_error" not in sums:
            return None
        loss, error = (sums["loss_error"].mean(-1) / sums["count"]).tolist()
        return {"loss": loss, "error": error}

    def training_step(self, block: Sequence[TrainStep], block_idx: int) -> None:
        """Train a block of optimizer steps (``overparam.data.STEPS_PER_BLOCK``), one by one.

        The block ends early when a callback stops training (``trainer.should_stop``) or
        ``max_steps`` is reached, so a stop lands on the exact step.
        """
        optimizer = self.optimizers()
        max_steps, first = self.trainer.max_steps, self.global_step
        losses = []
        for step in block:
            if self.trainer.should_stop or 0 <= max_steps <= first + len(losses):
                break
            losses.append(self.train_one_step(step, optimizer))
        self._flush_train_records()
        if losses:
            self.check_finite(torch.stack(losses), first)
        # Loggers write at the Trainer's count of "batches that stepped", which it raises by one
        # per batch after this hook: a block is many steps, so keep that count = optimizer steps.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.global_step - 1

    def _flush_train_records(self) -> None:
        """Errors and sums of the pending training outputs, in one batched pass (not one per step)."""
        if self._pending:
            outputs, ys, losses = zip(*self._pending)
            self._pending, self._pending_points = [], 0
            self.record_outputs("train", torch.cat(outputs, 1), torch.cat(ys), torch.cat(losses, 1))

    def train_one_step(self, step: TrainStep, optimizer: Any) -> Tensor:
        """One optimizer step: forward and backward of every chunk, the step hooks, the update.

        The step hooks (``on_train_step`` of the callbacks that have one) see the network
        theta_t before its update, with the step's gradient in ``.grad``; one that sets
        ``trainer.should_stop`` ends training at theta_t, without this update. Returns the
        step's loss on this rank (detached), for the divergence check.
        """
        optimizer.zero_grad(set_to_none=True)
        outputs, losses, total = [], [], None
        for chunk in step.chunks:
            loss, out, per_sample = self._step(chunk, "train", step.global_size)
            if self._direct:
                loss.backward()
            else:
                self.manual_backward(loss)
            outputs.append(out.detach())
            losses.append(per_sample.detach())
            total = loss.detach() if total is None else total + loss.detach()
            self._pending.append((outputs[-1], chunk[1], losses[-1]))
            self._pending_points += chunk[1].shape[0]
        if self._pending_points > PENDING_POINTS:
            self._flush_train_records()
        if self._step_hooks:
            record = StepRecord(self.global_step, self.current_epoch, step, tuple(outputs), tuple(losses), self._evaluates(step))
            for callback in self._step_hooks:
                callback.on_train_step(self.trainer, self, record)
            if self.trainer.should_stop:
                return total
        self.update(optimizer)
        self._step_lr_schedulers("step")
        return total

    def update(self, optimizer: Any) -> None:
        """Apply the update of the accumulated gradient (a task may constrain it, e.g. p-spin).

        Frozen ensemble members (``freeze_members``) keep their parameters.
        """
        kept = None
        if self.frozen_members:
            index = torch.tensor(self.frozen_members, device=self.device)
            kept = [(p, p.data[index].clone()) for p in self.member_params.values()]
        if not self._direct:
            optimizer.step()
        else:
            # What LightningOptimizer.step does on one device with plain precision, minus the
            # callback dispatch nobody listens to: count the step, the module's hook, the update.
            optimizer._on_before_step()
            self.on_before_optimizer_step(optimizer)
            optimizer.optimizer.step()
            optimizer._on_after_step()
        if kept is not None:
            with torch.no_grad():
                for p, values in kept:
                    p.data[index] = values

    def freeze_members(self, members: Sequence[int]) -> None:
        """Stop training these ensemble members: from the next update on their parameters stay.

        For ensembles whose members end at different steps (a member of a jamming sweep that
        reached SAT); the others train on. Kept in the checkpoint. Has no effect for K = 1
        (stop the run instead).
        """
        if self.ensemble_size > 1:
            self.frozen_members = sorted(set(self.frozen_members) | {int(k) for k in members})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["overparam_frozen_members"] = list(self.frozen_members)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.frozen_members = list(checkpoint.get("overparam_frozen_members", []))

    def _steps_directly(self) -> bool:
        """Whether this fit may skip the Trainer's per-step hook dispatch (``_direct``).

        Lightning's ``manual_backward`` and ``LightningOptimizer.step`` call the backward and
        optimizer-step hooks of every callback and the precision and strategy plugins around
        ``loss.backward()`` and ``optimizer.step()``. On one device, in plain precision, with
        no callback and no module override listening to those hooks, that dispatch does
        nothing but costs ~0.3 ms a step, a quarter of a small network's step; then the Task
        calls ``loss.backward()`` and the optimizer itself (the step is still counted by the
        Trainer, and ``on_before_optimizer_step`` of the module still runs).
        """
        trainer = self.trainer
        hooks = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
        if any(is_overridden(h, c, pl.Callback) for c in trainer.callbacks for h in hooks):
            return False
        if any(is_overridden(h, self, pl.LightningModule) for h in ("on_before_backward", "on_after_backward", "backward")):
            return False
        plain = type(trainer.precision_plugin) in (Precision, DoublePrecision)
        return plain and isinstance(trainer.strategy, SingleDeviceStrategy) and isinstance(trainer.profiler, PassThroughProfiler)

    def _evaluates(self, step: TrainStep) -> bool:
        # The training forward is an evaluation of the whole training set when the batch is
        # all of it and no module behaves differently in training mode.
        return step.whole_train_set and not self._mode_dependent

    def mode_dependent(self) -> bool:
        """Whether the network computes differently in training mode (BatchNorm, dropout)."""
        kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
        return any(isinstance(m, kinds) for m in self.modules())

    def _step_lr_schedulers(self, interval: str) -> None:
        """Step the learning-rate schedulers of ``interval`` (``step`` or ``epoch``) when due.

        Optimisation is manual (a block of steps per ``training_step``), so the Task steps
        the schedulers the Trainer would: a ``step`` scheduler after every ``frequency``-th
        update, an ``epoch`` one after every ``frequency``-th epoch (after validation, so
        ``ReduceLROnPlateau`` can monitor a validation metric). Lightning drops a scheduler's
        ``monitor`` under manual optimisation; ``ReduceLROnPlateau`` reads it from the
        scheduler's own ``monitor`` attribute (``--lr_scheduler ReduceLROnPlateau
        --lr_scheduler.monitor NAME`` sets it).
        """
        for config in self.trainer.lr_scheduler_configs:
            done = self.global_step if interval == "step" else self.current_epoch + 1
            if config.interval != interval or done % config.frequency:
                continue
            monitor = None
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                key = getattr(config.scheduler, "monitor", None)
                monitor = self.trainer.callback_metrics.get(key) if key else None
                if monitor is None:
                    raise ConfigError(
                        f"lr_scheduler ReduceLROnPlateau monitors {key!r}, which is not logged; logged: "
                        f"{', '.join(sorted(self.trainer.callback_metrics)) or 'nothing yet'}"
                    )
            self.lr_scheduler_step(config.scheduler, monitor)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_start(self) -> None:
        # The callbacks with a per-step hook, in the Trainer's order (found once, not per step).
        self._step_hooks = [c for c in self.trainer.callbacks if callable(getattr(c, "on_train_step", None))]
        self._mode_dependent = self.mode_dependent()
        self._direct = self._steps_directly()

    def check_finite(self, losses: Tensor, first: int) -> None:
        """Raise DivergenceError naming the first step whose loss was NaN or inf.

        ``losses``: the block's step losses on this rank, from step ``first``. One host sync
        per block (and one all-reduce under DDP, so every rank stops together).
        """
        bad = ~torch.isfinite(losses)
        if self.trainer.strategy.reduce_boolean_decision(bool(bad.any()), all=False):
            step = first + int(bad.nonzero()[0]) if bad.any() else first
            raise DivergenceError(
                f"training diverged: non-finite loss at step {step} (epoch {self.current_epoch}); "
                "lower model.lr or check the data"
            )

    # --- epoch logging ------------------------------------------------------------------------
    def _log_split(self, split: str) -> None:
        sums = self._epoch_sums.pop(split, {})
        if not sums and not torch.distributed.is_initialized():
            return
        if "loss_error" in sums:
            self.metrics[f"{split}_loss"].update(sums["loss_error"][0], sums["count"])
            self.metrics[f"{split}_error"].update(sums["loss_error"][1], sums["count"])
        if "ensemble_error" in sums:
            self.metrics[f"{split}_ensemble_error"].update(sums["ensemble_error"], sums["count"])
        loss_k, error_k = self.metrics[f"{split}_loss"].compute(), self.metrics[f"{split}_error"].compute()
        values = {f"{split}/loss": loss_k.mean(), f"{split}/error": error_k.mean()}
        if self.ensemble_size > 1:
            values[f"{split}/ensemble_error"] = self.metrics[f"{split}_ensemble_error"].compute()[0]
            for k in range(self.ensemble_size):
                values[member_name(f"{split}/loss", k)] = loss_k[k]
                values[member_name(f"{split}/error", k)] = error_k[k]
        self.log_dict({n: v.float() for n, v in values.items()}, prog_bar=False, sync_dist=False)
        for name in ("loss", "error", "ensemble_error"):
            self.metrics[f"{split}_{name}"].reset()

    def on_train_epoch_end(self) -> None:
        self._log_split("train")
        self._step_lr_schedulers("epoch")

    def on_validation_epoch_end(self) -> None:
        self._log_split("val")

    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Sequence[Tensor]]) -> dict[str, Tensor]:
        """Exact mean loss and 0/1 error per member over ``batches`` (all-reduced across ranks).

        Returns ``{"loss": (K,), "error": (K,)}`` in float64: the network as it is now, unlike
        the epoch's logged ``train/*``, which average over the steps of the epoch.
        """
        total = torch.zeros(2, self.ensemble_size, dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for x, y in batches:
            out = self.member_outputs(x)
            total[0] += self.loss_fn(out, y, reduction="none").sum(-1).double()
            total[1] += errors(out, y).sum(-1).double()
            count += x.shape[0]
        all_reduce_sum(total)
        all_reduce_sum(count)
        return {"loss": total[0] / count, "error": total[1] / count}

    # --- optimisation, hyperparameters ------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )

    def on_fit_start(self) -> None:
        for logger in self.loggers:
            logger.log_hyperparams({"N": self.N, "P": self.num_train, "K": self.ensemble_size})
        rank_zero_info(f"overparam: N = {self.N:,} parameters per member, P = {self.num_train:,} training points")
