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
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from overparam.distributed import all_reduce_sum
from overparam.errors import ConfigError, DivergenceError, check_choice, check_positive
from overparam.functional import FunctionalView, ensemble_fn, module_fn, stack_members
from overparam.losses import LOSS_NAMES, errors, get_loss
from overparam.metrics import MemberMean
from overparam.models import count_parameters

SPLITS = ("train", "val", "test")


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
        check_choice("model.loss", loss, LOSS_NAMES)
        check_positive("model.lr", lr)
        check_positive("model.momentum", momentum, allow_zero=True)
        check_positive("model.weight_decay", weight_decay, allow_zero=True)
        check_positive("model.ensemble_size", ensemble_size)
        check_positive("model.num_outputs", num_outputs)
        self.save_hyperparameters()
        self.input_shape = tuple(input_shape)
        self.num_outputs = num_outputs
        self.num_train = num_train
        self.loss_name = loss
        self.loss_fn = get_loss(loss)
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
        self.register_buffer("_nonfinite_step", torch.tensor(-1), persistent=False)
        self._epoch_sums: dict[str, dict[str, Any]] = {}

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
    def _step(self, batch: Sequence[Any], split: str) -> Tensor:
        x, y = batch[0], batch[1]
        out = self.member_outputs(x)  # (K, B, C)
        per_sample = self.loss_fn(out, y, reduction="none")  # (K, B)
        ensemble_errors = errors(out.mean(0), y) if self.ensemble_size > 1 else None
        self.record(split, per_sample, errors(out, y), ensemble_errors)
        return self.batch_loss(per_sample, batch)

    def batch_loss(self, per_sample: Tensor, batch: Sequence[Any]) -> Tensor:
        """This rank's share of the global batch mean, summed over members (whose gradients stay apart).

        Each rank's sum over its slice is divided by the global batch size; DDP averages over
        ranks, so ``world_size`` restores the exact global mean even for unequal slices.
        """
        world_size = self._trainer.world_size if self._trainer is not None else 1
        return per_sample.sum(-1).sum() * world_size / self.global_batch_size(batch)

    def global_batch_size(self, batch: Sequence[Any]) -> int:
        """Points in the whole global batch: carried by resident batches, else equal slices assumed."""
        world_size = self._trainer.world_size if self._trainer is not None else 1
        return batch[2] if len(batch) > 2 else batch[0].shape[0] * world_size

    def record(self, split: str, losses: Tensor, errors_k: Tensor, ensemble_errors: Optional[Tensor] = None) -> None:
        """Add a batch's per-sample ``(K, B)`` losses and errors (and the ensemble's ``(B,)``) to the epoch sums.

        Plain tensor sums on the device, pushed into the torchmetrics states once per epoch.
        """
        sums = self._epoch_sums.setdefault(split, {})
        for name, values in (("loss", losses), ("error", errors_k), ("ensemble_error", ensemble_errors)):
            if values is not None:
                total = values.detach().reshape(-1, values.shape[-1]).sum(-1).double()
                sums[name] = sums[name] + total if name in sums else total
        sums["count"] = sums.get("count", 0) + losses.shape[-1]

    def training_step(self, batch: Sequence[Any], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        if len(batch) > 3:
            # A chunk of a global batch (ResidentBatches' chunk_size): its loss is already its
            # share of the global mean; undo Lightning's 1/accumulate_grad_batches.
            loss = loss * self.trainer.accumulate_grad_batches
        bad = ~torch.isfinite(loss.detach())
        first_bad = (self._nonfinite_step < 0) & bad
        self._nonfinite_step = torch.where(first_bad, self.global_step, self._nonfinite_step)
        return loss

    def validation_step(self, batch: Sequence[Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Sequence[Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Checking every step would sync the accelerator each step; CPU runs pay nothing.
        every = 1 if self.device.type == "cpu" else self.trainer.log_every_n_steps
        if (batch_idx + 1) % every == 0 or self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self.check_finite()

    def check_finite(self) -> None:
        """Raise DivergenceError naming the first step whose loss was NaN or inf."""
        step = int(self._nonfinite_step)
        if step >= 0:
            raise DivergenceError(
                f"training diverged: non-finite loss at step {step} (epoch {self.current_epoch}); "
                "lower model.lr or check the data"
            )

    # --- epoch logging ------------------------------------------------------------------------
    def _log_split(self, split: str) -> None:
        sums = self._epoch_sums.pop(split, {})
        if not sums and not torch.distributed.is_initialized():
            return
        for name in ("loss", "error", "ensemble_error"):
            if name in sums:
                self.metrics[f"{split}_{name}"].update(sums[name], sums["count"])
        loss_k, error_k = self.metrics[f"{split}_loss"].compute(), self.metrics[f"{split}_error"].compute()
        values = {f"{split}/loss": loss_k.mean(), f"{split}/error": error_k.mean()}
        if self.ensemble_size > 1:
            values[f"{split}/ensemble_error"] = self.metrics[f"{split}_ensemble_error"].compute()[0]
            for k in range(self.ensemble_size):
                values[f"{split}/loss/member_{k}"] = loss_k[k]
                values[f"{split}/error/member_{k}"] = error_k[k]
        self.log_dict({n: v.float() for n, v in values.items()}, prog_bar=False, sync_dist=False)
        for name in ("loss", "error", "ensemble_error"):
            self.metrics[f"{split}_{name}"].reset()

    def on_train_epoch_end(self) -> None:
        self.check_finite()
        self._log_split("train")

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
