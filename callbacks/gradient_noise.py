"""GradientNoise: the gradient noise scale B_simple during training, the tail index alpha at epochs.

Engines in ``overparam/noise.py`` (formulas and sources there). Two measurements:

* ``noise/B_simple`` (McCandlish et al. 2018) with its standard error ``noise/B_simple_se``,
  ``noise/G2`` and ``noise/trace_sigma``: ratio of running means over the steps measured since
  the last log, logged at the end of each epoch; the per-step series and every SE go to
  ``<run>/noise/B_simple_epoch<e>.npz`` (``noise.noise_scale``: delta method with
  successive-difference variances; nan and a warning below ``noise.MIN_SE_STEPS`` steps).
  Under DDP the per-rank gradient is the small batch and the all-reduced one the big batch: a
  DDP communication hook reads each rank's local gradient bucket before the all-reduce, so no
  extra forward or backward pass and no per-step collective is made (each rank keeps its share
  of every step's estimate; the series is all-reduced once per epoch, when logged). On one
  device per-sample gradients of the training batch (``vmap(grad)``, chunked) are grouped into
  small batches of ``small_batch`` points.
* ``noise/alpha`` with its 95% interval ``noise/alpha_lo``, ``noise/alpha_hi``, and
  ``noise/alpha/<parameter>`` (Simsekli et al. 2019): the tail index of ``g_minibatch -
  g_full`` over ``num_minibatches`` minibatches of the current training batch size drawn from
  the DataModule's analysis subset, whose full gradient is the reference. The interval is the
  estimator's block-to-block standard error with the minibatches as independent clusters
  (``noise.tail_index``); per-layer intervals are in ``<run>/noise/alpha_<tag>.npz``. Run on
  the analysis schedule (``at_fit_end``, ``every_n_epochs``, ``at_epochs``).

K > 1 (ensembles): every quantity per member (``.../member_k``), the unsuffixed name is the mean
over members (of B_simple and alpha), with the SE or interval of that mean (the members share
their batches, so their errors correlate: handled through the influence series).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from overparam import seeds
from overparam.callbacks.base import AnalysisCallback
from overparam.errors import ConfigError, check_positive
from overparam.metrics import member_suffix
from overparam.noise import (
    DEFAULT_LEVEL,
    MAX_G2_REL_SE,
    MIN_CLUSTERS,
    MIN_SE_STEPS,
    NoiseScale,
    NoiseScaleEstimate,
    TailIndex,
    gradient_noise_samples,
    member_mean_tail_index,
    per_sample_moments,
    tail_indices,
    two_batch_estimates,
)

if TYPE_CHECKING:
    from overparam.task import StepRecord


class GradientNoise(AnalysisCallback):
    """Gradient noise scale and tail index of the SGD noise.

    Args:
        every_n_steps: measure B_simple at every n-th optimizer step (None: never). Under DDP
            a measurement is nearly free; on one device it costs per-sample gradients of the
            batch. Default 10. B_simple's standard error needs ``noise.MIN_SE_STEPS`` (20)
            measured steps per epoch: at most steps-per-epoch / 20.
        small_batch: one device only: points per small batch of the two-batch estimator
            (default 1: per-sample gradients, the unbiased sample variance). Must divide the
            batch size.
        per_sample_chunk: per-sample gradients computed this many at a time (memory bound).
        tail_index: also estimate alpha on the analysis schedule.
        num_minibatches: minibatches whose noise is pooled for alpha (K = num_minibatches * N
            coordinates); they are the independent clusters of alpha's standard error, which
            needs ``noise.MIN_CLUSTERS`` of them. Default 32.
        minibatch_size: global size of those minibatches (default: the current training batch
            size, capped at the analysis subset).
        K1: block length of the tail-index estimator (default sqrt(K), see ``noise.tail_index``).
        at_fit_start, at_fit_end, every_n_epochs, at_epochs, name: the analysis schedule of
            the tail index (``AnalysisCallback``); ``name`` also prefixes every metric.

    Example::

        Trainer(callbacks=[GradientNoise(every_n_steps=5, every_n_epochs=1)])

    YAML::

        trainer:
          callbacks:
            - class_path: GradientNoise
              init_args: {every_n_steps: 5, every_n_epochs: 1}
    """

    default_name = "noise"

    def __init__(
        self,
        every_n_steps: Optional[int] = 10,
        small_batch: int = 1,
        per_sample_chunk: int = 128,
        tail_index: bool = True,
        num_minibatches: int = 32,
        minibatch_size: Optional[int] = None,
        K1: Optional[int] = None,
        at_fit_start: bool = False,
        at_fit_end: bool = True,
        every_n_epochs: Optional[int] = None,
        at_epochs: Sequence[int] = (),
        name: Optional[str] = None,
    ) -> None:
        super().__init__(at_fit_start, at_fit_end, every_n_epochs, at_epochs, name, every_n_steps)
        check_positive("GradientNoise.small_batch", small_batch)
        check_positive("GradientNoise.per_sample_chunk", per_sample_chunk)
        check_positive("GradientNoise.num_minibatches", num_minibatches)
        if minibatch_size is not None:
            check_positive("GradientNoise.minibatch_size", minibatch_size)
        if K1 is not None and K1 < 2:
            raise ConfigError(f"GradientNoise.K1 must be an integer >= 2 or null, got {K1!r}")
        self.small_batch = small_batch
        self.per_sample_chunk = per_sample_chunk
        self.tail_index = tail_index
        self.num_minibatches = num_minibatches
        self.minibatch_size = minibatch_size
        self.K1 = K1
        self.scale = NoiseScale()
        self._warned: set[str] = set()
        self._K = 1
        self._ddp = False
        self._trainer: Optional[pl.Trainer] = None
        self._local_sq: Optional[torch.Tensor] = None  # DDP: (K,) local |grad|^2 from the comm hook

    # --- setup ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the first step: under DDP register the comm hook."""
        super().on_train_start(trainer, pl_module)
        self._K = getattr(pl_module, "ensemble_size", 1)
        self._ddp = trainer.world_size > 1
        self._trainer = trainer
        if self._ddp and self.every_n_steps is not None:
            model = trainer.strategy.model
            if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
                raise ConfigError(
                    f"GradientNoise under {trainer.world_size} processes needs the ddp strategy, got {type(trainer.strategy).__name__}"
                )
            model.register_comm_hook(state=None, hook=self._comm_hook)

    # --- DDP: the local gradient before the all-reduce is the small batch --------------------
    def _comm_hook(self, state, bucket):  # no annotations: DDP checks them against GradBucket/Future
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        # The backward of step t runs while global_step is t: record only on measured steps.
        if not self.steps.due(self._trainer.global_step):
            return allreduce_hook(None, bucket)
        K = self._K
        sq = None
        for g in bucket.gradients():
            # Stacked ensemble parameters carry the member dimension first.
            member = _sq_norms(g, K)
            sq = member if sq is None else sq + member
        if sq is not None:
            self._local_sq = sq if self._local_sq is None else self._local_sq + sq
        return allreduce_hook(None, bucket)

    # --- per step ---------------------------------------------------------------------------------
    def analyse_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, record: Optional["StepRecord"]) -> None:
        """The step's gradient is complete, theta_t not yet updated: this step's two-batch estimate.

        Under DDP from the comm hook's local squared norms and the averaged ``.grad``; on one
        device from per-sample gradients of the step's chunks. Nothing at fit end (no batch).
        """
        if record is None:
            return
        if self._ddp:
            estimates = self._ddp_estimates(trainer, pl_module, record.data.num_points, record.data.global_size)
        else:
            view = pl_module.functional_view()
            moments = [
                [
                    per_sample_moments(m.fn, m.params, m.buffers, pl_module.loss_fn, x, y, self.small_batch, self.per_sample_chunk)
                    for m in view.members()
                ]
                for x, y in record.data.chunks
            ]
            estimates = [self._merge(parts).estimates()[:2] for parts in zip(*moments)]
        G2, S = (torch.stack(v) for v in zip(*estimates))  # (K,) each
        self.scale.update(step, G2, S)
        self._local_sq = None

    @staticmethod
    def _merge(parts: Sequence[Any]) -> Any:
        first = parts[0]
        for p in parts[1:]:
            first.sum_g = first.sum_g + p.sum_g
            first.small_sq_sum = first.small_sq_sum + p.small_sq_sum
            first.groups = first.groups + p.groups
            first.count = first.count + p.count
        return first

    def _ddp_estimates(self, trainer: pl.Trainer, pl_module: pl.LightningModule, b: int, n: int) -> list:
        """``b``: this rank's points in the step, ``n``: the global batch size."""
        K, W = self._K, trainer.world_size
        device = pl_module.device
        # p.grad is the global mean gradient (the Task scales each rank's sum by W / n and DDP
        # averages); the bucket held W / n times this rank's summed gradient.
        big = torch.zeros(K, dtype=torch.float64, device=device)
        for p in pl_module.parameters():
            if p.grad is not None:
                big += _sq_norms(p.grad, K)
        local = self._local_sq if self._local_sq is not None else torch.zeros(K, dtype=torch.float64, device=device)
        local = local * (n / (W * b)) ** 2  # |mean gradient over this rank's b points|^2
        # The estimators are linear in |G_small|^2 (mean over ranks) and |G_big|^2 (the same on
        # every rank): each rank keeps its 1/W share of each step's estimate and the series is
        # all-reduced once, when logged (``NoiseScale.all_reduce``), so a step costs no collective.
        return [two_batch_estimates(local[k] / W, big[k] / W, n / W, n) for k in range(K)]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the epoch's B_simple with its SE and save its series, then run the tail index if scheduled."""
        # Every rank measured the same steps, so all of them take this branch (and its collective) together.
        if self.scale.steps:
            if self._ddp:
                self.scale.all_reduce()
            estimate = self.scale.estimate()
            metrics = self._scale_metrics(estimate)
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
            self.log_metrics(trainer, pl_module, metrics)
            self._save_series(trainer, estimate)
            self._check_scale(trainer, estimate)
            self.scale.reset()
        super().on_train_epoch_end(trainer, pl_module)

    def _scale_metrics(self, e: NoiseScaleEstimate) -> dict[str, float]:
        K = e.B_simple.numel()
        values = {}
        for k in range(K):
            suffix = member_suffix(k, K)
            values.update({
                f"B_simple{suffix}": float(e.B_simple[k]), f"B_simple_se{suffix}": float(e.B_simple_se[k]),
                f"G2{suffix}": float(e.G2[k]), f"trace_sigma{suffix}": float(e.trace_sigma[k]),
            })
        if K > 1:
            values.update({"B_simple": e.B_simple_mean, "B_simple_se": e.B_simple_mean_se})
        return values

    def _save_series(self, trainer: pl.Trainer, e: NoiseScaleEstimate) -> None:
        """``B_simple_epoch<e>.npz``: the per-step series, (K, n), and every estimate with its SE, (K,)."""
        series = self.scale.series()  # (n, K, 2)
        self.save_npz(
            trainer, f"B_simple_epoch{trainer.current_epoch}.npz",
            step=torch.tensor(self.scale.steps), G2_steps=series[..., 0].T, trace_sigma_steps=series[..., 1].T,
            B_simple=e.B_simple, B_simple_se=e.B_simple_se, G2=e.G2, G2_se=e.G2_se,
            trace_sigma=e.trace_sigma, trace_sigma_se=e.trace_sigma_se,
            B_simple_mean=e.B_simple_mean, B_simple_mean_se=e.B_simple_mean_se,
        )

    def _check_scale(self, trainer: pl.Trainer, e: NoiseScaleEstimate) -> None:
        """Warn (each once per fit) when the SE is missing or the delta method behind it does not hold."""
        epoch = trainer.current_epoch
        if e.steps < MIN_SE_STEPS and "steps" not in self._warned:
            self._warned.add("steps")
            rank_zero_warn(
                f"GradientNoise: epoch {epoch} measured B_simple at {e.steps} steps; its standard error needs at "
                f"least {MIN_SE_STEPS} per epoch, so noise/B_simple_se is nan. To get it, measure more often "
                f"(every_n_steps={self.every_n_steps}: at most the steps per epoch / {MIN_SE_STEPS}) or, at "
                f"every_n_steps=1, take more steps per epoch (a smaller batch). Warned once per fit."
            )
        unresolved = (e.G2_se > MAX_G2_REL_SE * e.G2.abs()).nonzero().flatten().tolist()
        if unresolved and "G2" not in self._warned:
            self._warned.add("G2")
            k = unresolved[0]
            rank_zero_warn(
                f"GradientNoise: at epoch {epoch} |G|^2 = {float(e.G2[k]):.4g} +- {float(e.G2_se[k]):.2g} (member {k}) "
                f"is not resolved from 0 (its 95% interval holds 0), so B_simple = tr(Sigma) / |G|^2 has no bounded "
                f"95% interval and noise/B_simple_se (delta method) does not describe its uncertainty. More measured "
                f"steps (a smaller every_n_steps) shrink G2's SE. Warned once per fit; G2_se is in B_simple_epoch*.npz."
            )

    # --- tail index ---------------------------------------------------------------------------------
    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        """Tail index of ``g_minibatch - g_full`` on the analysis subset, pooled and per parameter."""
        if not self.tail_index:
            return
        datamodule = trainer.datamodule
        full = datamodule.analysis_batches()
        subset = datamodule.analysis_batches(shard_across_ranks=False, batch_size=10**12)
        x_all, y_all = subset[0]
        P_sub = x_all.shape[0]
        b = min(self.minibatch_size or datamodule.current_batch_size(), P_sub)
        if b == P_sub:
            rank_zero_warn("GradientNoise: minibatch size equals the analysis subset: no noise to measure; skipping alpha")
            return
        generator = seeds.noise_minibatches(datamodule.seed, len(self.history))
        rank, W = trainer.global_rank, trainer.world_size
        minibatches = []
        for _ in range(self.num_minibatches):
            idx = torch.randperm(P_sub, generator=generator)[:b].to(x_all.device)
            local = idx.tensor_split(W)[rank]
            minibatches.append([(x_all[local], y_all[local])])
        view = pl_module.functional_view()
        values: dict[str, float] = {}
        arrays: dict[str, float] = {}
        pooled = []
        for k, m in enumerate(view.members()):
            noise = gradient_noise_samples(m.fn, m.params, m.buffers, pl_module.loss_fn, full, P_sub, minibatches, b)
            alpha, per_layer = tail_indices(noise, self.K1)
            suffix = member_suffix(k, view.ensemble_size)
            lo, hi = alpha.interval()
            values.update({f"alpha{suffix}": alpha.alpha, f"alpha_lo{suffix}": lo, f"alpha_hi{suffix}": hi})
            values.update({f"alpha/{name}{suffix}": a.alpha for name, a in per_layer.items()})
            arrays.update(_interval_arrays("", suffix, alpha))
            for name, a in per_layer.items():
                arrays.update(_interval_arrays(f"/{name}", suffix, a))
            pooled.append(alpha)
        if view.ensemble_size > 1:
            # The members' mean with the delta-method interval of that mean (shared minibatches).
            mean, se = member_mean_tail_index(pooled)
            z = NormalDist().inv_cdf(0.5 + DEFAULT_LEVEL / 2)
            values.update({"alpha": mean, "alpha_lo": mean - z * se, "alpha_hi": mean + z * se})
            arrays["alpha_se"] = se
        arrays.update(values)
        self._check_alpha(pooled)
        self.history.append({"tag": tag, "epoch": trainer.current_epoch, "minibatch_size": b, **values})
        self.log_metrics(trainer, pl_module, values)
        self.save_npz(trainer, f"alpha_{tag.replace('=', '')}.npz", **{k.replace("/", "."): v for k, v in arrays.items()})

    def _check_alpha(self, pooled: Sequence[TailIndex]) -> None:
        """Warn once per fit when alpha came without an interval (too few minibatches)."""
        if any(math.isfinite(a.alpha) and a.clusters < MIN_CLUSTERS for a in pooled) and "clusters" not in self._warned:
            self._warned.add("clusters")
            rank_zero_warn(
                f"GradientNoise: alpha's interval needs at least {MIN_CLUSTERS} minibatches (its independent "
                f"clusters), got num_minibatches={self.num_minibatches}: noise/alpha_lo and alpha_hi are nan. "
                f"Raise num_minibatches to get them. Warned once per fit."
            )

    # --- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["scale"] = {"steps": list(self.scale.steps), "values": [v.tolist() for v in self.scale.values]}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("scale", {"steps": [], "values": []})
        self.scale = NoiseScale(list(saved["steps"]), [torch.tensor(v, dtype=torch.float64) for v in saved["values"]])


def _interval_arrays(name: str, suffix: str, a: TailIndex) -> dict[str, float]:
    """The .npz entries of one tail-index estimate: its SE, 68% and logged-level intervals, what they rest on."""
    lo68, hi68 = a.interval(0.68)
    lo, hi = a.interval(DEFAULT_LEVEL)
    return {
        f"alpha_se{name}{suffix}": a.alpha**2 * a.inv_alpha_se, f"inv_alpha{name}{suffix}": a.inv_alpha,
        f"inv_alpha_se{name}{suffix}": a.inv_alpha_se, f"alpha_lo68{name}{suffix}": lo68, f"alpha_hi68{name}{suffix}": hi68,
        f"alpha_lo{name}{suffix}": lo, f"alpha_hi{name}{suffix}": hi, f"K1{name}{suffix}": a.K1,
        f"K2{name}{suffix}": a.K2, f"clusters{name}{suffix}": a.clusters,
    }


def _sq_norms(g: torch.Tensor, K: int) -> torch.Tensor:
    """``(K,)`` float64 squared norms of a gradient, per member (leading dim K when K > 1)."""
    flat = g.detach().reshape(K, -1) if K > 1 else g.detach().reshape(1, -1)
    return torch.linalg.vector_norm(flat, dim=1).double().square()
