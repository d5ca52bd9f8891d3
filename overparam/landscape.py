"""Loss-landscape geometry: paths between parameter sets, barriers, mode-connecting curves.

A *path* is ``theta(t) = sum_i c_i(t) theta_i`` over control points ``theta_0 .. theta_n``
(flat vectors), with ``theta(0) = theta_0 = a`` and ``theta(1) = theta_n = b``:

* ``linear``: ``theta(t) = (1 - t) a + t b``, for any real t (``t`` in [-1, 2] gives Keskar
  et al. 2017's parametric plots, Fig. 3);
* ``bezier``: Bernstein weights ``c_i(t) = binom(n, i) t^i (1 - t)^(n - i)``; n = 2 is the
  quadratic Bezier curve of Garipov et al. 2018, "Loss surfaces, mode connectivity, and fast
  ensembling of DNNs", Eq. (3);
* ``polychain``: piecewise linear through the control points at ``t = i / n`` (Garipov et
  al. 2018, Eq. (2); Freeman & Bruna 2017's chains of segments).

``line(origin, d)`` is the linear path from ``origin`` to ``origin + d``: the line away from one
solution along a direction, random Gaussian or filter-normalised (Li et al. 2018, "Visualizing
the loss landscape of neural nets", Sec. 4) or a Hessian eigenvector.

``evaluate_path`` computes, at each t, the mean loss ``L(theta(t)) = (1/P) sum_mu l(f(theta(t);
x_mu), y_mu)`` and the 0/1 error over fixed lists of batches: one batched forward pass per batch
and point (no loop over samples), sums and counts all-reduced across ranks and divided last.
For nets with BatchNorm it recomputes the running statistics at every point first
(``recompute_bn``; Garipov et al.'s ``update_bn``): the statistics stored with ``a`` belong to
``a`` alone, so without this step the interior, and ``b`` itself, are evaluated with wrong ones.

``barrier_heights`` reports ``max_t L(theta(t)) - max(L(a), L(b))`` and the height above the
linear interpolation of the endpoint losses, ``max_t [L(theta(t)) - ((1 - t) L(a) + t L(b))]``
(Entezari et al. 2022, "The role of permutation invariance in linear mode connectivity of
neural networks", Eq. 1; Frankle et al. 2020 measure above the mean of the two ends instead),
both over the grid points with ``0 <= t <= 1``. ``fit_curve`` trains the middle control points
by minimising ``E_{t ~ U[0, 1]} L(phi(t))`` with one uniform t per minibatch step (Garipov et
al. 2018, Sec. 3.2).

Engines take ``fn(params, buffers, x)``, params dicts and batches; no Lightning inside.

Example (a double well, whose linear barrier between its minima (-1, 0) and (1, 0) is 1/2)::

    >>> import torch
    >>> from overparam.losses import mse
    >>> fn = lambda p, b, x: torch.stack([p["w"][0] ** 2 - 1, p["w"][1]]).expand(x.shape[0], 2)
    >>> batches = [(torch.zeros(4, 1), torch.zeros(4, 2))]
    >>> path = linear_path({"w": torch.tensor([-1.0, 0.0])}, {"w": torch.tensor([1.0, 0.0])})
    >>> ev = evaluate_path(fn, path, {"train": batches}, mse, points=5)
    >>> ev.barriers()["train/loss/barrier"]
    0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from overparam.distributed import all_reduce_sum
from overparam.errors import ConfigError
from overparam.functional import NetFn, Params, flatten, unflatten
from overparam.losses import errors
from overparam.progress import Progress, track

Batch = tuple[Tensor, Tensor]
LossFn = Callable[..., Tensor]
PATH_KINDS = ("linear", "bezier", "polychain")
DIRECTIONS = ("gaussian", "filter")


# --- checks ---------------------------------------------------------------------------------
def check_same_shapes(a: Params, b: Params, names: tuple[str, str] = ("a", "b")) -> None:
    """Raise a one-line ConfigError unless ``a`` and ``b`` hold the same names and shapes."""
    if list(a) != list(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ConfigError(
            f"{names[0]} and {names[1]} have different parameters: only in {names[0]}: {only_a or '-'}, "
            f"only in {names[1]}: {only_b or '-'}"
        )
    for name in a:
        if a[name].shape != b[name].shape:
            raise ConfigError(
                f"{names[0]} and {names[1]} have different architectures: {name} is "
                f"{tuple(a[name].shape)} in {names[0]} and {tuple(b[name].shape)} in {names[1]}"
            )


def _check_kind(kind: str) -> None:
    if kind not in PATH_KINDS:
        raise ConfigError(f"path must be one of {', '.join(PATH_KINDS)}; got {kind!r}")


# --- paths ----------------------------------------------------------------------------------
class Path:
    """``theta(t) = sum_i c_i(t) theta_i`` over control points (rows of ``controls``).

    Args:
        controls: ``(n + 1, N)`` flat control points, ``theta_0 = a`` and ``theta_n = b``.
        like: a params dict giving the names and shapes of one point.
        kind: ``linear`` (n = 1), ``bezier`` or ``polychain``.
    """

    def __init__(self, controls: Tensor, like: Params, kind: str = "linear") -> None:
        _check_kind(kind)
        if controls.dim() != 2 or controls.shape[0] < 2:
            raise ConfigError(f"a path needs at least 2 control points as an (n + 1, N) tensor, got {tuple(controls.shape)}")
        if kind == "linear" and controls.shape[0] != 2:
            raise ConfigError(f"a linear path has 2 control points, got {controls.shape[0]}")
        self.controls = controls
        self.like = {n: p.detach() for n, p in like.items()}
        self.kind = kind

    @property
    def num_bends(self) -> int:
        """Middle control points."""
        return self.controls.shape[0] - 2

    def coefficients(self, t: Tensor | float) -> Tensor:
        """``(T, n + 1)`` weights ``c_i(t)`` for a ``(T,)`` tensor of t (or one float: ``(n + 1,)``)."""
        scalar = not isinstance(t, Tensor) or t.dim() == 0
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)  # (T, 1)
        n = self.controls.shape[0] - 1
        i = torch.arange(n + 1, dtype=torch.float64)  # (n + 1,)
        if self.kind == "bezier":
            binom = torch.tensor([math.comb(n, k) for k in range(n + 1)], dtype=torch.float64)
            c = binom * t**i * (1 - t) ** (n - i)
        else:  # linear and polychain: hat functions on the nodes i / n, extrapolated at the ends
            segment = (t * n).floor().clamp(0, n - 1)  # (T, 1)
            s = t * n - segment  # position inside the segment (outside [0, 1] at the ends)
            c = (i == segment) * (1 - s) + (i == segment + 1) * s
        c = c.to(self.controls.dtype)
        return c[0] if scalar else c

    def flat_point(self, t: float) -> Tensor:
        return self.coefficients(t).to(self.controls.device) @ self.controls

    def point(self, t: float) -> Params:
        """``theta(t)`` as a params dict."""
        return unflatten(self.flat_point(t), self.like)

    def points(self, ts: Sequence[float]) -> Params:
        """``theta(t)`` for several t, stacked: each tensor gets a leading dim ``len(ts)``."""
        flat = self.coefficients(torch.as_tensor(list(ts))).to(self.controls.device) @ self.controls  # (T, N)
        return _unflatten_rows(flat, self.like)


def _unflatten_rows(flat: Tensor, like: Params) -> Params:
    out, start = {}, 0
    for name, p in like.items():
        out[name] = flat[:, start : start + p.numel()].reshape(flat.shape[0], *p.shape)
        start += p.numel()
    return out


def _flat_pair(a: Params, b: Params) -> Tensor:
    check_same_shapes(a, b)
    return torch.stack([flatten(a).detach(), flatten(b).detach()])


def linear_path(a: Params, b: Params) -> Path:
    """``theta(t) = (1 - t) a + t b``."""
    return Path(_flat_pair(a, b), a, "linear")


def curve_path(a: Params, b: Params, kind: str = "bezier", middles: Optional[Sequence[Params] | Tensor] = None, num_bends: int = 1) -> Path:
    """A Bezier curve or polygonal chain from ``a`` to ``b`` through ``middles``.

    Args:
        a, b: the endpoints.
        kind: ``bezier`` or ``polychain`` (``linear`` gives ``linear_path``).
        middles: the middle control points (params dicts or a ``(n - 1, N)`` tensor); None
            puts ``num_bends`` of them evenly on the segment ``[a, b]``, where both curves
            coincide with the linear path: Garipov et al. 2018's initialisation.
        num_bends: middle points when ``middles`` is None (1: the quadratic Bezier / one bend).
    """
    _check_kind(kind)
    ends = _flat_pair(a, b)
    if kind == "linear":
        return Path(ends, a, "linear")
    if middles is None:
        if num_bends < 1:
            raise ConfigError(f"num_bends must be a positive integer, got {num_bends!r}")
        s = torch.arange(1, num_bends + 1, dtype=ends.dtype, device=ends.device) / (num_bends + 1)
        mid = (1 - s)[:, None] * ends[0] + s[:, None] * ends[1]
    elif isinstance(middles, Tensor):
        mid = middles.detach().reshape(-1, ends.shape[1]).to(ends)
    else:
        for m in middles:
            check_same_shapes(a, m, ("a", "a middle point"))
        mid = torch.stack([flatten(m).detach() for m in middles])
    return Path(torch.cat([ends[:1], mid, ends[1:]]), a, kind)


def line(origin: Params, direction: Params | Tensor) -> Path:
    """``theta(t) = origin + t d``: the line away from ``origin`` along ``d``."""
    d = flatten(direction) if isinstance(direction, dict) else direction.reshape(-1)
    o = flatten(origin).detach()
    if d.numel() != o.numel():
        raise ConfigError(f"the direction has {d.numel()} entries and the parameters {o.numel()}")
    return Path(torch.stack([o, o + d.to(o)]), origin, "linear")


# --- directions ------------------------------------------------------------------------------
def filter_normalize(direction: Params, params: Params, ignore_1d: bool = True) -> Params:
    """Li et al. 2018, Sec. 4: rescale each filter ``d_i <- d_i |theta_i| / |d_i|``.

    A filter is one slice along dim 0 (a conv output channel, a row of a linear weight).
    Parameters with one dimension (biases, BatchNorm) get a zero direction when
    ``ignore_1d`` (Li et al.'s ``--xignore biasbn``, "we do not perturb bias and BN
    parameters"), else ``d = theta`` (their code's other option).
    """
    out = {}
    for name, p in params.items():
        d = direction[name]
        if p.dim() <= 1:
            out[name] = torch.zeros_like(p) if ignore_1d else p.detach().clone()
            continue
        d_rows, p_rows = d.reshape(d.shape[0], -1), p.detach().reshape(p.shape[0], -1)
        scale = p_rows.norm(dim=1, keepdim=True) / (d_rows.norm(dim=1, keepdim=True) + 1e-10)
        out[name] = (d_rows * scale).reshape(p.shape)
    return out


def random_direction(params: Params, seed: int = 0, normalization: str = "filter", ignore_1d: bool = True) -> Params:
    """A Gaussian direction from a CPU generator seeded by ``seed`` (the same on every rank).

    Args:
        params: the point the line leaves from (shapes, dtype, device, filter norms).
        seed: seed of the draw.
        normalization: ``filter`` (Li et al. 2018, the default in their plots) or ``gaussian``
            (i.i.d. N(0, 1) entries: the uniform-direction lines of Goodfellow et al. 2015).
        ignore_1d: see ``filter_normalize``.
    """
    if normalization not in DIRECTIONS:
        raise ConfigError(f"direction must be one of {', '.join(DIRECTIONS)}; got {normalization!r}")
    generator = torch.Generator().manual_seed(seed)
    d = {n: torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) for n, p in params.items()}
    return filter_normalize(d, params, ignore_1d) if normalization == "filter" else d


# --- BatchNorm -------------------------------------------------------------------------------
def batchnorm_layers(module: Optional[nn.Module]) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that keep running statistics, by their qualified names."""
    if module is None:
        return {}
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


@torch.no_grad()
def recompute_bn(module: nn.Module, params: Params, buffers: Params, batches: Sequence[Batch]) -> Params:
    """BatchNorm running statistics of ``module`` at ``params``, recomputed from ``batches``.

    Garipov et al. 2018's ``update_bn`` (and ``torch.optim.swa_utils.update_bn``) reset the
    statistics and run one train-mode forward pass over the data. Here each BN layer ends with
    the mean and the unbiased variance of its inputs over *all* points, as if the whole set
    were one batch: per batch, momentum 1 exposes the batch mean ``m_b`` and unbiased variance
    ``s_b^2`` in the running buffers; ``sum x = b m_b`` and ``sum x^2 = (b - 1) s_b^2 + b m_b^2``
    are accumulated in float64 and summed across ranks. So the first BN layer's statistics do
    not depend on how the points are cut into batches or ranks; deeper BN layers see inputs
    normalised by per-batch statistics of earlier layers during the pass, as in ``update_bn``.
    With one batch the result equals ``update_bn``'s. Only BN layers switch to train mode
    (dropout stays off: the pass is deterministic); modes and momenta are restored.

    Returns:
        a new buffers dict (``buffers`` is not modified).
    """
    layers = batchnorm_layers(module)
    new = {n: b.clone() for n, b in buffers.items()}
    if not layers:
        return new
    prefixes = [f"{name}." if name else "" for name in layers]
    # Per layer: (2, C) = sum x, sum x^2 over this rank's points, in float64.
    sums = {p: torch.zeros(2, new[p + "running_mean"].numel(), dtype=torch.float64, device=new[p + "running_mean"].device) for p in prefixes}
    saved = {name: (m.training, m.momentum) for name, m in layers.items()}
    seen, num_batches = 0, 0
    try:
        for m in layers.values():
            m.train()
            m.momentum = 1.0  # running buffers := this batch's mean and unbiased variance
        for x, _ in batches:
            b = x.shape[0]
            functional_call(module, (params, new), (x,))
            for p in prefixes:
                mean, var = new[p + "running_mean"].double(), new[p + "running_var"].double()
                sums[p][0] += b * mean
                sums[p][1] += (b - 1) * var + b * mean.square()
            seen, num_batches = seen + b, num_batches + 1
    finally:
        for name, m in layers.items():
            m.train(saved[name][0])
            m.momentum = saved[name][1]
    counts = torch.tensor([float(seen), float(num_batches)], dtype=torch.float64, device=sums[prefixes[0]].device)
    flat = all_reduce_sum(torch.cat([sums[p].reshape(-1) for p in prefixes] + [counts]))
    n = flat[-2]
    if n < 2:
        raise ConfigError(f"BatchNorm statistics need at least 2 points, got {int(n)}")
    start = 0
    for p in prefixes:
        mean_buf, var_buf = new[p + "running_mean"], new[p + "running_var"]
        c = mean_buf.numel()
        s1, s2 = flat[start : start + c], flat[start + c : start + 2 * c]
        start += 2 * c
        mean = s1 / n
        mean_buf.copy_(mean.view_as(mean_buf))
        var_buf.copy_(((s2 - n * mean.square()) / (n - 1)).clamp_min(0).view_as(var_buf))
        new[p + "num_batches_tracked"].fill_(int(flat[-1]))
    return new


# --- evaluation ------------------------------------------------------------------------------
@dataclass
class PathEvaluation:
    """Loss and 0/1 error at each t of a path, per split.

    Attributes:
        t: ``(T,)`` path parameters.
        loss: split -> ``(T,)`` mean loss.
        error: split -> ``(T,)`` mean 0/1 error.
        count: split -> number of points (over all ranks).
    """

    t: Tensor
    loss: dict[str, Tensor] = field(default_factory=dict)
    error: dict[str, Tensor] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def barriers(self) -> dict[str, float]:
        """``<split>/<loss|error>/barrier`` and ``.../barrier_linear`` (see ``barrier_heights``)."""
        out = {}
        for split in self.loss:
            for name, values in (("loss", self.loss[split]), ("error", self.error[split])):
                for key, value in barrier_heights(self.t, values).items():
                    out[f"{split}/{name}/{key}"] = value
        return out

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Plain arrays for ``np.savez``: ``t``, ``<split>_loss``, ``<split>_error``."""
        out = {f"{prefix}t": self.t.cpu().numpy()}
        for split in self.loss:
            out[f"{prefix}{split}_loss"] = self.loss[split].cpu().numpy()
            out[f"{prefix}{split}_error"] = self.error[split].cpu().numpy()
        return out


def grid(points: int = 25, t_min: float = 0.0, t_max: float = 1.0) -> Tensor:
    """``points`` evenly spaced t in ``[t_min, t_max]``, plus 0 and 1 when inside and missing.

    Default 25 points: the resolution of Garipov et al. 2018's curve plots (``--num_points``
    61) is not needed for barrier heights of smooth MLP paths; 25 matches the issue's ask.
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ConfigError(f"points must be an integer >= 2, got {points!r}")
    if not t_min < t_max:
        raise ConfigError(f"t_min must be smaller than t_max, got t_min={t_min!r}, t_max={t_max!r}")
    t = torch.linspace(t_min, t_max, points, dtype=torch.float64)
    extra = [v for v in (0.0, 1.0) if t_min <= v <= t_max and not torch.isclose(t, torch.tensor(v, dtype=torch.float64), atol=1e-12).any()]
    t = torch.cat([t, torch.tensor(extra, dtype=torch.float64)]).sort().values
    # Snap to exact 0 and 1 so the endpoints are the checkpoints bit for bit.
    t[torch.isclose(t, torch.zeros_like(t), atol=1e-12)] = 0.0
    t[torch.isclose(t, torch.ones_like(t), atol=1e-12)] = 1.0
    return t


@torch.no_grad()
def evaluate_combinations(
    fn: NetFn,
    controls: Tensor,
    coefficients: Tensor,
    like: Params,
    data: Mapping[str, Sequence[Batch]],
    loss_fn: LossFn,
    buffers: Optional[Params] = None,
    bn_module: Optional[nn.Module] = None,
    bn_batches: Optional[Sequence[Batch]] = None,
    stored_buffers: Optional[Mapping[int, Params]] = None,
    points_per_call: int = 1,
    progress: Optional[Progress] = None,
) -> dict[str, tuple[Tensor, Tensor, int]]:
    """Mean loss and 0/1 error at the points ``theta_i = sum_j c_ij theta_j`` of a linear family.

    Every landscape evaluation is one: a path's point is ``c(t) @ controls``
    (``evaluate_path``), a plane's is ``(1, a, b) @ (origin, d1, d2)``
    (``overparam.planes.evaluate_plane``). Point i costs one forward pass over the batches
    of each split: ``points_per_call`` points are stacked and evaluated in one call
    ``vmap(fn)`` over their parameters (and their BatchNorm statistics), so forming the
    points is a ``(T', m) @ (m, N)`` product and nothing loops over samples. Loss and error
    sums and counts are accumulated in float64 per point, all-reduced once at the end, and
    divided last: under DDP every rank holds the single-process values.

    Args:
        fn: ``fn(params, buffers, x) -> (B, C)``, one network (K = 1).
        controls: ``(m, N)`` flat parameter vectors.
        coefficients: ``(T, m)`` weights, one row per point.
        like: a params dict giving the names and shapes of one point.
        data: split name -> this rank's list of ``(x, y)`` batches (a fixed subset).
        loss_fn: ``loss_fn(outputs, y, reduction)`` from ``overparam.losses``.
        buffers: non-trainable state passed to ``fn`` (BatchNorm statistics).
        bn_module: the module behind ``fn``; when it has BatchNorm layers, their statistics
            are recomputed at every point from ``bn_batches`` (``recompute_bn``, default
            ``data["train"]``).
        stored_buffers: point index -> statistics to use there instead of recomputing them
            (a path's ends or a plane's centre as the nets were trained).
        points_per_call: points evaluated in one vmapped call (memory x this); 1 is a
            plain call per point.
        progress: reports the points done (``overparam.progress``); None: silent.

    Returns:
        split -> ``(loss (T,), error (T,), count)`` over all ranks, on the CPU.

    Raises:
        ConfigError: ``points_per_call < 1``; a BatchNorm net without a training split; a
            split with no points on any rank.
    """
    if isinstance(points_per_call, bool) or not isinstance(points_per_call, int) or points_per_call < 1:
        raise ConfigError(f"points_per_call must be a positive integer, got {points_per_call!r}")
    buffers = dict(buffers or {})
    stored = dict(stored_buffers or {})
    layers = batchnorm_layers(bn_module)
    if layers:
        bn_batches = bn_batches if bn_batches is not None else data.get("train")
        if bn_batches is None:
            raise ConfigError("networks with BatchNorm need bn_batches (or a 'train' split) to recompute their statistics")
    T = coefficients.shape[0]
    # sums[split]: (T, 3) = loss sum, error sum, count; one all-reduce at the end.
    sums = {split: torch.zeros(T, 3, dtype=torch.float64, device=controls.device) for split in data}
    modes = {name: m.training for name, m in layers.items()}
    vfn = torch.func.vmap(fn, in_dims=(0, 0 if layers else None, None))
    report = track(progress, T, "points")
    try:
        for m in layers.values():
            m.eval()
        for start in range(0, T, points_per_call):
            stop = min(start + points_per_call, T)
            flat = coefficients[start:stop].to(controls) @ controls  # (T', N)
            params = _unflatten_rows(flat, like)
            point_buffers = buffers
            if layers:
                each = []
                for i in range(start, stop):
                    point = {n: p[i - start] for n, p in params.items()}
                    each.append(stored[i] if i in stored else recompute_bn(bn_module, point, buffers, bn_batches))
                point_buffers = {n: torch.stack([b[n] for b in each]) for n in each[0]}
            if stop - start == 1:  # a plain call: no vmap overhead
                one = {n: p[0] for n, p in params.items()}
                one_buffers = {n: b[0] for n, b in point_buffers.items()} if layers else buffers
                call = lambda x, p=one, b=one_buffers: fn(p, b, x).unsqueeze(0)  # (1, B, C)
            else:
                call = lambda x, p=params, b=point_buffers: vfn(p, b, x)  # (T', B, C)
            for split, batches in data.items():
                rows = sums[split][start:stop]
                for x, y in batches:
                    out = call(x)  # (T', B, C)
                    rows[:, 0] += loss_fn(out, y, reduction="none").sum(-1).double()
                    rows[:, 1] += errors(out, y).sum(-1).double()
                    rows[:, 2] += x.shape[0]
            report.update(stop - start)
        report.finish()
    finally:
        for name, m in layers.items():
            m.train(modes[name])
    results = {}
    if sums:
        everything = all_reduce_sum(torch.stack(list(sums.values()))).cpu()  # (S, T, 3)
        for split, s in zip(sums, everything):
            count = s[0, 2].item()
            if count == 0:
                raise ConfigError(f"split {split!r} has no points to evaluate")
            results[split] = (s[:, 0] / count, s[:, 1] / count, int(count))
    return results


def evaluate_path(
    fn: NetFn,
    path: Path,
    data: Mapping[str, Sequence[Batch]],
    loss_fn: LossFn,
    t: Optional[Sequence[float] | Tensor] = None,
    points: int = 25,
    t_min: float = 0.0,
    t_max: float = 1.0,
    buffers: Optional[Params] = None,
    bn_module: Optional[nn.Module] = None,
    bn_batches: Optional[Sequence[Batch]] = None,
    endpoint_buffers: Optional[tuple[Params, Params]] = None,
    points_per_call: int = 1,
    progress: Optional[Progress] = None,
) -> PathEvaluation:
    """Mean loss and 0/1 error of ``fn`` at ``theta(t)`` on each split of ``data``.

    Args:
        fn: ``fn(params, buffers, x) -> (B, C)``, one network (K = 1).
        path: the path.
        data: split name -> this rank's list of ``(x, y)`` batches (a fixed subset).
        loss_fn: ``loss_fn(outputs, y, reduction)`` from ``overparam.losses``.
        t: the path parameters; default ``grid(points, t_min, t_max)``.
        buffers: non-trainable state passed to ``fn`` (BatchNorm statistics).
        bn_module: the module behind ``fn``; when it has BatchNorm layers, their statistics
            are recomputed at every t from ``bn_batches`` (default ``data["train"]``).
        endpoint_buffers: ``(buffers of a, buffers of b)``: at t = 0 and t = 1 use these
            stored statistics instead of recomputing them, so the ends are the trained nets as
            they were evaluated during training (their logged losses), while every other t
            gets recomputed statistics. None (default): recompute everywhere, as Garipov et
            al. do, so all points are treated alike.
        points_per_call: t values evaluated in one vmapped call (memory x this); 1 is a
            plain loop over t (see ``evaluate_combinations``).
        progress: reports the points done (``overparam.progress``); None: silent.

    Returns:
        a ``PathEvaluation``; under DDP every rank holds the single-process values.
    """
    t = grid(points, t_min, t_max) if t is None else torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    stored = {}
    if endpoint_buffers is not None:
        stored = {i: endpoint_buffers[int(v)] for i, v in enumerate(t.tolist()) if v in (0.0, 1.0)}
    results = evaluate_combinations(
        fn, path.controls, path.coefficients(t).reshape(len(t), -1), path.like, data, loss_fn, buffers=buffers,
        bn_module=bn_module, bn_batches=bn_batches, stored_buffers=stored, points_per_call=points_per_call, progress=progress,
    )
    evaluation = PathEvaluation(t=t.cpu())
    for split, (loss, error, count) in results.items():
        evaluation.loss[split], evaluation.error[split], evaluation.count[split] = loss, error, count
    return evaluation


def barrier_heights(t: Tensor, values: Tensor) -> dict[str, float]:
    """Barrier heights of ``values`` (loss or error) along a path, over grid points in [0, 1].

    Returns:
        ``barrier``: ``max_t L(t) - max(L(0), L(1))``;
        ``barrier_linear``: ``max_t [L(t) - ((1 - t) L(0) + t L(1))]`` (Entezari et al. 2022, Eq. 1);
        ``t_barrier`` / ``t_barrier_linear``: where the maxima are. Both heights are >= 0,
        and 0 when the endpoints are the highest points (e.g. on a convex loss).

    Raises:
        ConfigError: when t = 0 or t = 1 is not a grid point.
    """
    t = torch.as_tensor(t, dtype=torch.float64).cpu()
    values = torch.as_tensor(values, dtype=torch.float64).cpu()
    at0, at1 = (t == 0).nonzero(), (t == 1).nonzero()
    if len(at0) == 0 or len(at1) == 0:
        raise ConfigError("barrier heights need t = 0 and t = 1 among the path's points")
    L0, L1 = values[at0[0, 0]], values[at1[0, 0]]
    inside = (t >= 0) & (t <= 1)
    t_in, v_in = t[inside], values[inside]
    excess = v_in - ((1 - t_in) * L0 + t_in * L1)
    i, j = int(v_in.argmax()), int(excess.argmax())
    return {
        "barrier": float(v_in[i] - torch.maximum(L0, L1)),
        "barrier_linear": float(excess[j]),
        "t_barrier": float(t_in[i]),
        "t_barrier_linear": float(t_in[j]),
    }


# --- curve fitting ----------------------------------------------------------------------------
def fit_curve(
    fn: NetFn,
    a: Params,
    b: Params,
    batches: Sequence[Batch],
    loss_fn: LossFn,
    kind: str = "bezier",
    num_bends: int = 1,
    steps: int = 500,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    buffers: Optional[Params] = None,
    bn_module: Optional[nn.Module] = None,
    init: Optional[Path] = None,
    progress: Optional[Progress] = None,
) -> tuple[Path, list[float]]:
    """Train the middle control points of a curve from ``a`` to ``b``; the ends stay fixed.

    Minimises ``E_{t ~ U[0, 1]} L(phi_theta(t))`` by SGD with momentum: each step draws one
    t uniformly (from a generator seeded by ``seed``, so every rank draws the same) and one
    batch (in turn), and steps along the gradient of that batch's mean loss at
    ``phi_theta(t)`` with respect to the middle points (Garipov et al. 2018, Sec. 3.2 and their
    ``train.py``, SGD with momentum 0.9). Under DDP the shard gradients and counts are summed
    across ranks before the step, so every rank takes the single-process step. BatchNorm
    layers of ``bn_module`` use batch statistics during fitting (train mode, as Garipov's).

    Args:
        fn: ``fn(params, buffers, x)`` of one network.
        a, b: the fixed endpoints.
        batches: this rank's list of training batches.
        loss_fn: ``loss_fn(outputs, y, reduction)``.
        kind: ``bezier`` or ``polychain``.
        num_bends: middle control points (1: Garipov's quadratic Bezier / one-bend chain).
        steps: SGD steps. lr, momentum, weight_decay: SGD's.
        seed: seed of the t draws.
        init: a curve to start from (default: the bends evenly on the segment, i.e. the
            linear path).
        progress: reports the steps done and the last step's loss; None: silent.

    Returns:
        the fitted ``Path`` and the loss at each step.
    """
    if kind not in ("bezier", "polychain"):
        raise ConfigError(f"curve must be bezier or polychain; got {kind!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if not batches:
        raise ConfigError("curve fitting needs at least one training batch")
    path = init if init is not None else curve_path(a, b, kind, num_bends=num_bends)
    controls = path.controls.detach()
    middle = controls[1:-1].clone().requires_grad_(True)
    optimizer = torch.optim.SGD([middle], lr=lr, momentum=momentum, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    buffers = {n: v.clone() for n, v in (buffers or {}).items()}  # train-mode BN writes into them
    layers = batchnorm_layers(bn_module)
    modes = {name: m.training for name, m in layers.items()}
    history = []
    report = track(progress, steps, "steps")
    try:
        for m in layers.values():
            m.train()
        for step in range(steps):
            t = torch.rand((), generator=generator, dtype=torch.float64).item()
            x, y = batches[step % len(batches)]
            c = path.coefficients(t).to(controls)  # (n + 1,)
            flat = c[0] * controls[0] + c[1:-1] @ middle + c[-1] * controls[-1]
            out = fn(unflatten(flat, path.like), buffers, x)
            total = loss_fn(out, y, reduction="sum")
            (grad,) = torch.autograd.grad(total, middle)
            # One all-reduce of [gradient of the loss sum, loss sum, count] over ranks.
            count = torch.tensor([float(x.shape[0])], dtype=grad.dtype, device=grad.device)
            packed = all_reduce_sum(torch.cat([grad.reshape(-1), total.detach().reshape(1).to(grad.dtype), count]))
            count = packed[-1].clamp_min(1.0)
            middle.grad = (packed[:-2] / count).view_as(middle)
            optimizer.step()
            history.append(float(packed[-2] / count))
            report.update(loss=history[-1])
        report.finish(loss=history[-1])
    finally:
        for name, m in layers.items():
            m.train(modes[name])
    fitted = Path(torch.cat([controls[:1], middle.detach(), controls[-1:]]), path.like, kind)
    return fitted, history


# --- outputs ----------------------------------------------------------------------------------
def plot_path(evaluations: Mapping[str, PathEvaluation], filename: str, title: str = "") -> str:
    """Loss (left) and 0/1 error (right) against t, one line per split and path; saves a PNG."""
    from overparam.plots import save_figure, subplots

    fig, axes = subplots(1, 2, figsize=(9, 3.4))
    for label, ev in evaluations.items():
        for split in ev.loss:
            style = "-" if split == "train" else "--"
            name = f"{label} {split}".strip()
            axes[0].plot(ev.t.numpy(), ev.loss[split].numpy(), style, marker=".", label=name)
            axes[1].plot(ev.t.numpy(), ev.error[split].numpy(), style, marker=".", label=name)
    for ax, ylabel in zip(axes, ("loss", "0/1 error")):
        ax.set_xlabel("t")
        ax.set_ylabel(ylabel)
        ax.axvline(0, color="grey", lw=0.5)
        ax.axvline(1, color="grey", lw=0.5)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, filename, dpi=110)
    return filename
