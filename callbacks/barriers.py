"""``InterpolationBarrier``: the loss and error on the segment between the network and a reference.

At the scheduled times (default: at fit end) the callback evaluates
``theta(t) = (1 - t) theta_ref + t theta`` on a grid of t (``overparam.landscape``), on the
training subset ``analysis_batches`` and the other splits asked for, and logs the barrier
heights ``max_t L - max(L(0), L(1))`` and ``max_t [L - chord]`` of loss and error. The
reference is

* ``init``: the network's own initial weights (Goodfellow et al. 2015's "linear path from
  initialisation": a monotone path means no barrier on the way down); per member when K > 1;
* ``member``: another member of the same ensemble (K > 1; default member 0 to member 1), two
  independently initialised nets trained in one run (Draxler et al. 2018, Garipov et al. 2018);
* a checkpoint path (``.ckpt``) or a run folder (its ``checkpoints/last.ckpt``) of the same
  architecture, e.g. the large-batch solution a small-batch continuation started from.

t = 0 is the reference and t = 1 the current network. BatchNorm statistics are recomputed at
every point from the training subset. Outputs go to ``<log_dir>/barriers/``: ``curve_<tag>.npz``
(t, ``<split>_loss``, ``<split>_error``) and ``curve_<tag>.png`` (loss and error against t).
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from overparam import landscape
from overparam.callbacks.base import AnalysisCallback, check_splits_and_size, split_batches
from overparam.errors import ConfigError
from overparam.functional import FunctionalView
from overparam.runs import LAST_CHECKPOINT

REFERENCES = ("init", "member")


class InterpolationBarrier(AnalysisCallback):
    """Barrier heights on the line from a reference to the current weights.

    Args:
        reference: ``init``, ``member`` or the path of a checkpoint / run folder.
        points: grid points in ``[t_min, t_max]`` (0 and 1 are always added). Default 25.
        t_min, t_max: the grid's ends (e.g. -0.5 and 1.5 to look past both ends, as Keskar
            et al. 2017's Fig. 3 does with [-1, 2]). Barriers use the points in [0, 1].
        splits: splits to evaluate (``train`` is the DataModule's ``analysis_batches``).
        size: training points evaluated (default: the DataModule's ``analysis_size``, else all).
        members: with ``reference="member"``, the two members (t = 0 and t = 1).
        **kwargs: the schedule of ``AnalysisCallback`` (``at_fit_end`` default True,
            ``every_n_epochs``, ``at_epochs``, ``at_fit_start``, ``name``).

    Raises:
        ConfigError: an unknown reference or missing checkpoint, fewer than 2 points,
            ``t_min >= t_max``, an unknown split, two equal members (at ``__init__``); K < 2
            with ``member``, a checkpoint of another architecture (at fit start).

    Example::

        Trainer(callbacks=[InterpolationBarrier(reference="init", every_n_epochs=5)])

    In YAML::

        trainer:
          callbacks:
            - class_path: InterpolationBarrier
              init_args: {reference: member, points: 25, t_min: -0.5, t_max: 1.5}
    """

    default_name = "barriers"

    def __init__(
        self,
        reference: str = "init",
        points: int = 25,
        t_min: float = 0.0,
        t_max: float = 1.0,
        splits: Sequence[str] = ("train", "test"),
        size: Optional[int] = None,
        members: Sequence[int] = (0, 1),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        option = type(self).__name__
        if reference not in REFERENCES and not os.path.exists(reference):
            raise ConfigError(f"{option}.reference must be init, member or an existing checkpoint / run folder; got {reference!r}")
        try:
            self.t = landscape.grid(points, t_min, t_max)
        except ConfigError as exc:
            raise ConfigError(f"{option}.{exc}") from None
        check_splits_and_size(option, splits, size)
        if len(members) != 2 or members[0] == members[1] or min(members) < 0:
            raise ConfigError(f"{option}.members must be two different member indices, got {list(members)}")
        self.reference = reference
        self.splits = list(splits)
        self.size = size
        self.members = tuple(members)
        self.initial: Optional[dict[str, torch.Tensor]] = None
        self._checkpoint: Optional[dict[str, torch.Tensor]] = None

    # --- hooks --------------------------------------------------------------------------------
    def on_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before fitting: check the reference against the task (K, architecture)."""
        if stage != "fit":
            return
        K = pl_module.ensemble_size
        if self.reference == "member" and max(self.members) >= K:
            raise ConfigError(
                f"{type(self).__name__}.reference=member needs an ensemble with members {list(self.members)}; "
                f"model.ensemble_size is {K} (set it to 2 or more, or use reference=init)"
            )
        if self.reference not in REFERENCES:
            self._checkpoint = self._checkpoint_params(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the first step: keep the initial weights (reference ``init``), then the schedule."""
        if self.reference == "init" and self.initial is None:
            if trainer.global_step == 0:
                self.initial = {n: p.detach().clone() for n, p in pl_module.functional_view().params.items()}
            else:
                rank_zero_warn(
                    f"{type(self).__name__}: resumed without the initial weights in the checkpoint, so the "
                    "line from init cannot be drawn; this callback does nothing. Start a fresh run to measure it."
                )
        super().on_train_start(trainer, pl_module)

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        """Evaluate every pair's segment, log barrier heights, save the curves and a plot."""
        view = pl_module.functional_view().detached()
        pairs = self._pairs(view, pl_module)
        if not pairs:
            return
        data = split_batches(trainer, self.splits, self.size, type(self).__name__)
        bn_module = getattr(pl_module, "net", None) if pl_module.ensemble_size == 1 else None
        bn_batches = None
        if landscape.batchnorm_layers(bn_module):  # statistics always come from the training set
            bn_batches = data.get("train") or trainer.datamodule.analysis_batches("train", size=self.size)
        metrics, evaluations, arrays = {}, {}, {}
        for label, (a, b, member) in pairs.items():
            ev = landscape.evaluate_path(
                member.single_fn, landscape.linear_path(a, b), data, pl_module.loss_fn,
                t=self.t, buffers=member.buffers, bn_module=bn_module, bn_batches=bn_batches,
            )
            prefix = f"{label}/" if label else ""
            metrics.update({prefix + k: v for k, v in ev.barriers().items() if "/t_" not in k})
            evaluations[label] = ev
            arrays.update(ev.arrays(prefix.replace("/", "_")))
        self.log_metrics(trainer, pl_module, metrics)
        self.history.append({"tag": tag, "epoch": trainer.current_epoch, "step": trainer.global_step, **metrics})
        stem = "curve_" + re.sub(r"[^\w=.-]", "_", tag)
        self.save_npz(trainer, f"{stem}.npz", **arrays)
        if trainer.is_global_zero:
            path = os.path.join(self.output_dir(trainer), f"{stem}.png")
            ends = {"member": f"member {self.members[0]} (t=0) to member {self.members[1]} (t=1)", "init": "init (t=0) to current (t=1)"}
            title = f"{ends.get(self.reference, 'checkpoint (t=0) to current (t=1)')}, {tag}"
            landscape.plot_path(evaluations, path, title)
            self.log_image(trainer, "curve", path)

    # --- helpers ------------------------------------------------------------------------------
    def _pairs(self, view: FunctionalView, pl_module: pl.LightningModule) -> dict[str, tuple[dict, dict, FunctionalView]]:
        """``label -> (theta_ref, theta, member view)`` for every segment to draw."""
        K = view.ensemble_size
        if self.reference == "member":
            m0, m1 = (view.member(k) for k in self.members)
            return {f"member_{self.members[0]}_to_{self.members[1]}" if K > 2 else "": (m0.params, m1.params, m0)}
        reference = self.initial if self.reference == "init" else self._checkpoint
        if reference is None:
            return {}
        reference = {n: t.to(view.params[n]) for n, t in reference.items()}
        ref_view = FunctionalView(view.fn, reference, view.buffers, K, view.single_fn)
        return {
            (f"member_{k}" if K > 1 else ""): (ref_view.member(k).params, view.member(k).params, view.member(k))
            for k in range(K)
        }

    def _checkpoint_params(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The reference checkpoint's tensors, named as in the functional view (matched by identity)."""
        path = self.reference
        if os.path.isdir(path):
            path = os.path.join(path, LAST_CHECKPOINT)
        if not os.path.isfile(path):
            raise ConfigError(f"{type(self).__name__}.reference: no checkpoint at {path}")
        state = torch.load(path, map_location="cpu", weights_only=False).get("state_dict", {})
        module_names = {id(p): n for n, p in pl_module.named_parameters()}
        live = pl_module.functional_view().params
        out = {}
        for name, p in live.items():
            key = module_names.get(id(p), name)
            if key not in state:
                raise ConfigError(f"{type(self).__name__}.reference: {path} has no {key}; is it a checkpoint of this task?")
            out[name] = state[key].detach().to(p.dtype)
        landscape.check_same_shapes(out, {n: p.detach() for n, p in live.items()}, ("the reference checkpoint", "the network"))
        return out

    # --- resume -------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # Several instances (e.g. reference=member and reference=init) may share a Trainer.
        return self._generate_state_key(name=self.name, reference=self.reference)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.initial is not None:
            state["initial"] = {n: t.cpu() for n, t in self.initial.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        initial = state_dict.get("initial")
        self.initial = dict(initial) if initial is not None else None
