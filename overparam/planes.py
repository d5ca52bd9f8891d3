"""Two-dimensional loss landscapes: the loss and error on a plane through parameter space.

A *plane* is ``theta(a, b) = theta_c + a d1 + b d2`` around a centre ``theta_c`` (a trained
network, flat vectors). Its directions are

* ``filter``: two filter-normalised Gaussian directions (Li et al. 2018, "Visualizing the loss
  landscape of neural nets", Sec. 4: each filter of ``d`` rescaled to the norm of the same
  filter of ``theta_c``, biases and BatchNorm parameters not perturbed), ``overparam.landscape
  .filter_normalize``; the coordinates are then in units of the weights' own scale;
* ``hessian``: the unit eigenvectors of the two largest Hessian eigenvalues at ``theta_c``
  (``overparam.curvature``: ``HessianOperator`` and Lanczos, ``operator_eigsh``); near a minimum
  ``L(a, b) ~ L(0) + (lambda_1 a^2 + lambda_2 b^2) / 2``, with a and b distances;
* ``pca``: the first two principal directions of a training trajectory ``theta_0 .. theta_n``
  around the final point (Li et al. 2018, Sec. 7: PCA of ``M = [theta_i - theta_n]``; as their
  code, with scikit-learn's ``PCA``, the rows are centred on their mean first), unit vectors,
  with the explained variance ratio of each, so the trajectory, which lies close to a
  low-dimensional subspace, can be drawn on the surface;
* ``points``: the plane through three networks ``theta_c, theta_b, theta_c'`` (Garipov et al.
  2018, "Loss surfaces, mode connectivity, and fast ensembling of DNNs", Fig. 1): ``d1 = theta_b
  - theta_c`` and ``d2`` the part of ``theta_c' - theta_c`` orthogonal to it, rescaled to
  ``|d1|``, so the picture is isometric, ``theta_b`` is at (1, 0) and ``theta_c'`` at
  ``(<delta, d1>/|d1|^2, |delta_perp|/|d1|)``.

``evaluate_plane`` evaluates the mean loss ``L(a, b) = (1/P) sum_mu l(f(theta(a, b); x_mu),
y_mu)`` and the 0/1 error on a grid of (a, b) with ``overparam.landscape.evaluate_combinations``:
the grid point ``(1, a, b) @ (theta_c, d1, d2)`` is formed in one small product, several points
share one vmapped call, BatchNorm statistics are recomputed at every point, sums are
all-reduced under DDP. No Lightning inside.

Example (a quadratic bowl ``L = |w|^2 / 2``: on the plane of the two unit axes ``L = (a^2 + b^2) / 2``)::

    >>> import torch
    >>> from overparam.losses import mse
    >>> fn = lambda p, b, x: p["w"].expand(x.shape[0], 2)
    >>> plane = Plane(torch.zeros(2), torch.eye(2), {"w": torch.zeros(2)}, "points")
    >>> ev = evaluate_plane(fn, plane, {"train": [(torch.zeros(1, 1), torch.zeros(1, 2))]}, mse, points=3)
    >>> ev.loss["train"].tolist()
    [[1.0, 0.5, 1.0], [0.5, 0.0, 0.5], [1.0, 0.5, 1.0]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from overparam.errors import ConfigError
from overparam.functional import NetFn, Params, flatten, unflatten
from overparam.landscape import Batch, LossFn, check_same_shapes, evaluate_combinations, grid, random_direction
from overparam.progress import Progress

PLANES = ("filter", "hessian", "pca", "points")
#: Column blocks of a trajectory in the PCA (2^20 parameters: the float64 copy of a block of
#: 100 snapshots is 800 MiB at most, whatever N is).
PCA_BLOCK = 1 << 20


@dataclass
class Plane:
    """``theta(a, b) = origin + a d1 + b d2``.

    Attributes:
        origin: ``(N,)`` the centre theta_c, flat.
        directions: ``(2, N)``: d1 and d2.
        like: a params dict giving the names and shapes of one point.
        kind: ``filter``, ``hessian``, ``pca`` or ``points``.
        info: what the directions came from (eigenvalues and residuals, explained variance,
            the coordinates of the three points, ...): plain numbers and arrays.
    """

    origin: Tensor
    directions: Tensor
    like: Params
    kind: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        N = self.origin.numel()
        if self.directions.shape != (2, N):
            raise ConfigError(f"a plane needs two directions of {N} entries as a (2, N) tensor, got {tuple(self.directions.shape)}")
        self.origin, self.directions = self.origin.detach().reshape(-1), self.directions.detach().to(self.origin)

    @property
    def controls(self) -> Tensor:
        """``(3, N)``: origin, d1, d2 (a point is ``(1, a, b) @ controls``)."""
        return torch.cat([self.origin[None], self.directions])

    def point(self, a: float, b: float) -> Params:
        """``theta(a, b)`` as a params dict."""
        c = torch.tensor([1.0, a, b], dtype=torch.float64).to(self.origin)
        return unflatten(c @ self.controls, self.like)

    def coordinates(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Least-squares coordinates of flat points ``(M, N)`` in the plane, and their distances off it.

        ``(a, b) = argmin |theta - theta(a, b)|`` (Li et al.'s ``project_2D``, ``lstsq``), exact
        for points in the plane whatever the angle between d1 and d2.

        Returns:
            ``(M, 2)`` coordinates and ``(M,)`` distances ``|theta - theta(a, b)|``, float64.
        """
        D = self.directions.double()  # (2, N)
        gram = D @ D.T  # (2, 2)
        coords, off = [], []
        for theta in points.reshape(-1, self.origin.numel()):  # one at a time: (M, N) float64 may not fit
            delta = theta.to(D) - self.origin.double()
            ab = torch.linalg.solve(gram, D @ delta)
            coords.append(ab)
            off.append((delta - ab @ D).norm())
        return torch.stack(coords).cpu(), torch.stack(off).cpu()


def _signed(directions: Tensor) -> Tensor:
    """Each row times the sign of its largest-magnitude entry (eigenvectors' signs are arbitrary)."""
    signs = directions.gather(1, directions.abs().argmax(1, keepdim=True)).sign()
    return directions * torch.where(signs == 0, torch.ones_like(signs), signs)


# --- directions -------------------------------------------------------------------------------
def random_plane(params: Params, seed: int = 0, normalization: str = "filter", ignore_1d: bool = True) -> Plane:
    """The plane of two random directions around ``params`` (Li et al. 2018, Sec. 4).

    d1 and d2 are ``random_direction(params, seed)`` and ``random_direction(params, seed + 1)``
    (filter-normalised by default, ``overparam.landscape``). In high dimension they are nearly
    orthogonal; Li et al. do not orthogonalise them and neither does this (``info["cosine"]``
    reports the angle).
    """
    d1, d2 = (flatten(random_direction(params, s, normalization, ignore_1d)) for s in (seed, seed + 1))
    cosine = float(torch.dot(d1.double(), d2.double()) / (d1.double().norm() * d2.double().norm()).clamp_min(1e-300))
    info = {"seed": seed, "normalization": normalization, "norms": np.array([float(d1.norm()), float(d2.norm())]), "cosine": cosine}
    return Plane(flatten(params).detach(), torch.stack([d1, d2]), _like(params), "filter" if normalization == "filter" else "gaussian", info)


def hessian_plane(
    fn: NetFn,
    params: Params,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    buffers: Optional[Params] = None,
    seed: int = 0,
    **eigsh_kwargs: Any,
) -> Plane:
    """The plane of the top-2 Hessian eigenvectors at ``params`` (unit vectors).

    ``H`` is the Hessian of the mean loss over ``batches`` (``HessianOperator``: under DDP each
    rank passes its shard); its two largest eigenpairs come from thick-restart Lanczos
    (``operator_eigsh``, relative residual ``tol`` 1e-6 by default). Each eigenvector's sign is
    fixed so its largest-magnitude entry is positive.

    Args:
        seed: seed of the Lanczos start vector (the same on every rank).
        **eigsh_kwargs: ``max_steps``, ``tol``, ``warn`` of ``overparam.curvature.eigsh``.

    Returns:
        the plane; ``info`` holds ``eigenvalues``, ``residuals`` (Ritz residual norms),
        ``converged`` and ``matvecs``.
    """
    from overparam.curvature import HessianOperator, operator_eigsh

    operator = HessianOperator(fn, params, loss_fn, batches, buffers=buffers)
    result = operator_eigsh(operator, k=2, which="largest", seed=seed, **eigsh_kwargs)
    like = _like(params)
    directions = _signed(result.eigenvectors.T.to(next(iter(like.values()))))  # (2, N)
    info = {
        "eigenvalues": result.eigenvalues.numpy(),
        "residuals": result.residuals.numpy(),
        "converged": result.converged.numpy(),
        "matvecs": result.num_matvecs,
    }
    return Plane(flatten(params).detach(), directions, like, "hessian", info)


def pca_plane(origin: Params, trajectory: Tensor, centre: bool = True) -> Plane:
    """The plane of the first two principal directions of a trajectory around ``origin``.

    Li et al. 2018, Sec. 7: the rows of ``M = [theta_i - theta_n]`` (the centre theta_n, the
    final network, is no row; a snapshot equal to it to float32 rounding is dropped) are centred on their mean
    (``centre``; scikit-learn's ``PCA`` in their code does this) and their top-2 right singular
    vectors span the plane. The Gram matrix of the centred rows is accumulated in float64 over
    column blocks and diagonalised (``R x R`` for R snapshots), so memory stays ``O(R N)``
    float32 whatever N is.

    Args:
        origin: the centre theta_n (params dict).
        trajectory: ``(R, N)`` flat snapshots theta_0 .. theta_n (any float dtype).
        centre: centre the rows first (Li et al.'s code); False takes the plain SVD of M.

    Returns:
        the plane (unit, orthogonal directions, signs fixed); ``info`` holds
        ``explained_variance_ratio`` (2,) (each direction's share of the total variance of the
        rows), ``singular_values`` (all of them), ``rows`` (snapshots used), and
        ``trajectory``/``trajectory_off_plane``: every snapshot's coordinates and distance off
        the plane.

    Raises:
        ConfigError: a trajectory of another size, or one that spans fewer than two dimensions.
    """
    theta = flatten(origin).detach()
    N = theta.numel()
    trajectory = trajectory.reshape(trajectory.shape[0], -1) if trajectory.dim() > 1 else trajectory.reshape(1, -1)
    if trajectory.shape[1] != N:
        raise ConfigError(f"the trajectory's snapshots have {trajectory.shape[1]} entries and the network {N} parameters")
    trajectory = trajectory.to(theta.device)
    rows = [i for i in range(trajectory.shape[0]) if not torch.allclose(trajectory[i].to(theta), theta, rtol=1e-6, atol=0)]
    M = trajectory[rows]
    R = M.shape[0]
    if R < 2 + int(centre):
        raise ConfigError(f"a PCA plane needs at least {2 + int(centre)} snapshots besides the centre, got {R}")
    gram = torch.zeros(R, R, dtype=torch.float64, device=M.device)
    blocks = []
    for start in range(0, N, PCA_BLOCK):
        block = M[:, start : start + PCA_BLOCK].double() - theta[start : start + PCA_BLOCK].double()  # (R, n)
        if centre:
            block -= block.mean(0, keepdim=True)
        gram += block @ block.T
        blocks.append((start, block.shape[1]))
    values, vectors = torch.linalg.eigh(gram)  # ascending
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    if values[1] <= 1e-12 * values[0]:
        raise ConfigError(f"the trajectory spans fewer than 2 dimensions around the centre ({R} snapshots); record more, or other, snapshots")
    directions = torch.zeros(2, N, dtype=torch.float64, device=M.device)
    for start, width in blocks:  # d_k = M_c^T u_k / sigma_k, one column block at a time
        block = M[:, start : start + width].double() - theta[start : start + width].double()
        if centre:
            block -= block.mean(0, keepdim=True)
        directions[:, start : start + width] = (vectors[:, :2].T @ block) / values[:2, None].sqrt()
    plane = Plane(theta, _signed(directions).to(theta), _like(origin), "pca")
    coords, off = plane.coordinates(trajectory)
    plane.info = {
        "explained_variance_ratio": (values[:2] / values.sum()).cpu().numpy(),
        "singular_values": values.sqrt().cpu().numpy(),
        "rows": R,
        "centred": centre,
        "trajectory": coords.numpy(),
        "trajectory_off_plane": off.numpy(),
    }
    return plane


def points_plane(a: Params, b: Params, c: Params) -> Plane:
    """The plane through three networks, centred on ``a`` (Garipov et al. 2018, Fig. 1).

    ``d1 = b - a``; ``d2`` is the part of ``c - a`` orthogonal to d1 (one Gram-Schmidt step),
    rescaled to ``|d1|``: both axes have the same scale, ``b`` is at (1, 0) and ``c`` at
    ``(<c - a, d1>/|d1|^2, |(c - a)_perp|/|d1|)`` (``info["points"]``).

    Raises:
        ConfigError: other architectures, ``b = a``, or ``c`` on the line through a and b.
    """
    check_same_shapes(a, b, ("a", "b"))
    check_same_shapes(a, c, ("a", "c"))
    origin = flatten(a).detach()
    d1 = flatten(b).detach().double() - origin.double()
    delta = flatten(c).detach().double() - origin.double()
    scale = d1.norm()
    if scale == 0:
        raise ConfigError("the plane through three points needs b different from a")
    along = torch.dot(delta, d1) / scale**2
    d2 = delta - along * d1
    if d2.norm() <= 1e-12 * max(float(delta.norm()), float(scale)):
        raise ConfigError("the plane through three points needs c off the line through a and b")
    height = d2.norm() / scale
    directions = torch.stack([d1, d2 / height]).to(origin)
    info = {"points": np.array([[0.0, 0.0], [1.0, 0.0], [float(along), float(height)]]), "distance_ab": float(scale)}
    return Plane(origin, directions, _like(a), "points", info)


def _like(params: Params) -> Params:
    return {n: p.detach() for n, p in params.items()}


# --- evaluation --------------------------------------------------------------------------------
@dataclass
class PlaneEvaluation:
    """Loss and 0/1 error on a grid of the plane, per split.

    Attributes:
        a, b: ``(A,)`` and ``(B,)`` grid coordinates along d1 and d2.
        loss: split -> ``(A, B)`` mean loss, ``loss[i, j]`` at ``(a[i], b[j])``.
        error: split -> ``(A, B)`` mean 0/1 error.
        count: split -> number of points (over all ranks).
        plane: the plane evaluated.
    """

    a: Tensor
    b: Tensor
    plane: Plane
    loss: dict[str, Tensor] = field(default_factory=dict)
    error: dict[str, Tensor] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def _centre(self) -> tuple[int, int]:
        i, j = (self.a == 0).nonzero(), (self.b == 0).nonzero()
        if len(i) == 0 or len(j) == 0:
            raise ConfigError("the centre (0, 0) is not a grid point")
        return int(i[0, 0]), int(j[0, 0])

    def centre(self) -> dict[str, float]:
        """``<split>/loss`` and ``<split>/error`` at the centre (0, 0)."""
        i, j = self._centre()
        return {f"{split}/{what}": float(values[split][i, j]) for split in self.loss for what, values in (("loss", self.loss), ("error", self.error))}

    @property
    def centre_is_interior(self) -> bool:
        """Whether (0, 0) is a grid point with grid points on both sides along both axes."""
        return bool((self.a == 0).any() and (self.b == 0).any() and (self.a < 0).any() and (self.a > 0).any()
                    and (self.b < 0).any() and (self.b > 0).any())

    def curvature(self, split: str = "train") -> dict[str, float]:
        """Second derivatives of the loss at the centre, by central differences on the grid.

        With steps ``h-`` and ``h+`` to the neighbours (the grid may be uneven around 0),
        ``L_aa = 2 [(L(h+) - L(0))/h+ - (L(0) - L(-h-))/h-] / (h+ + h-)``, likewise ``L_bb``,
        and ``L_ab = [L(+,+) - L(+,-) - L(-,+) + L(-,-)] / ((h+ + h-)_a (h+ + h-)_b)``. On a
        quadratic these are exact; otherwise they carry an ``O(h^2)`` error. ``L_aa`` estimates
        ``d1^T H d1`` (for a unit Hessian eigenvector, its eigenvalue).

        Raises:
            ConfigError: the centre is not an interior grid point.
        """
        i, j = self._centre()
        if not (0 < i < len(self.a) - 1 and 0 < j < len(self.b) - 1):
            raise ConfigError("the curvature at the centre needs grid points on both sides of (0, 0)")
        L = self.loss[split].double()
        ha = (float(self.a[i] - self.a[i - 1]), float(self.a[i + 1] - self.a[i]))
        hb = (float(self.b[j] - self.b[j - 1]), float(self.b[j + 1] - self.b[j]))

        def second(f_minus: float, f0: float, f_plus: float, h: tuple[float, float]) -> float:
            return 2 * ((f_plus - f0) / h[1] - (f0 - f_minus) / h[0]) / (h[0] + h[1])

        mixed = (L[i + 1, j + 1] - L[i + 1, j - 1] - L[i - 1, j + 1] + L[i - 1, j - 1]) / ((ha[0] + ha[1]) * (hb[0] + hb[1]))
        return {
            "L_aa": second(float(L[i - 1, j]), float(L[i, j]), float(L[i + 1, j]), ha),
            "L_bb": second(float(L[i, j - 1]), float(L[i, j]), float(L[i, j + 1]), hb),
            "L_ab": float(mixed),
            "h_a": min(ha),
            "h_b": min(hb),
        }

    def arrays(self, directions: bool = True) -> dict[str, np.ndarray]:
        """Plain arrays for ``np.savez``: ``a``, ``b``, ``<split>_loss``, ``<split>_error``
        (``(A, B)``), ``plane`` (the kind), the plane's ``info``, ``curvature:<name>`` of the
        train loss when the centre is interior, and ``directions`` ((2, N) float32) unless
        ``directions`` is False."""
        out: dict[str, np.ndarray] = {"a": self.a.numpy(), "b": self.b.numpy(), "plane": np.array(self.plane.kind)}
        for split in self.loss:
            out[f"{split}_loss"] = self.loss[split].numpy()
            out[f"{split}_error"] = self.error[split].numpy()
        out.update({k: np.asarray(v) for k, v in self.plane.info.items()})
        if "train" in self.loss and self.centre_is_interior:
            out.update({f"curvature:{k}": np.array(v) for k, v in self.curvature("train").items()})
        if directions:
            out["directions"] = self.plane.directions.float().cpu().numpy()
        return out


def axis(points: int = 21, lo: float = -1.0, hi: float = 1.0) -> Tensor:
    """``points`` evenly spaced coordinates in ``[lo, hi]``, plus 0 and 1 when inside and missing.

    ``overparam.landscape.grid``: the centre (0, 0) is then a grid point bit for bit, and so is
    the second network of a ``points`` plane at (1, 0). Default 21 x 21 points on [-1, 1]: Li
    et al. 2018's surfaces (``--x=-1:1:51``; 21 is the resolution the issue asks for, and
    their Fig. 5 contours are smooth at it for MLPs).
    """
    return grid(points, lo, hi)


#: Margin around the trajectory (pca) or the three networks (points) in ``default_axes``: the
#: fraction of their extent added on each side (room for the contours around them).
MARGIN = {"pca": 0.15, "points": 0.3}


def axis_through(lo: float, hi: float, points: int = 21, through_one: bool = False) -> Tensor:
    """About ``points`` evenly spaced coordinates covering ``[lo, hi]``, with 0 (and 1) among them exactly.

    For ranges taken from data (a trajectory's box, three networks), where ``axis`` would insert
    0 next to a grid point close to it: the step is ``(hi - lo) / (points - 1)`` (with
    ``through_one``, the nearest ``1/m``), and the ends move out to multiples of it, so 0 (and 1)
    are grid points at the grid's own spacing and the central differences at the centre use
    neighbours one step away on both sides.

    Raises:
        ConfigError: fewer than 2 points, or 0 (1) outside ``[lo, hi]``.
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ConfigError(f"points must be an integer >= 2, got {points!r}")
    if not lo <= 0 <= hi or (through_one and not lo <= 1 <= hi):
        raise ConfigError(f"the range [{lo:g}, {hi:g}] must hold 0{' and 1' if through_one else ''}")
    step = (hi - lo) / (points - 1)
    if through_one:
        m = max(1, round(1 / step))
        return torch.arange(math.floor(lo * m + 1e-9), math.ceil(hi * m - 1e-9) + 1, dtype=torch.float64) / m
    return torch.arange(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1, dtype=torch.float64) * step


def default_axes(plane: Plane, points: int = 21) -> tuple[Tensor, Tensor]:
    """The grid of a plane when no range is given.

    ``[-1, 1]^2`` (``axis``) for ``filter`` and ``hessian`` planes (Li et al. 2018's range for
    filter-normalised directions); for ``pca`` the box around the trajectory and for ``points``
    the box around the three networks, each with a ``MARGIN`` and through 0 (and through 1 on
    the first axis of a ``points`` plane, where the second network is) by ``axis_through``.
    """
    where = plane.info.get("trajectory" if plane.kind == "pca" else "points") if plane.kind in MARGIN else None
    if where is None:
        return axis(points), axis(points)
    where = np.vstack([where, [0.0, 0.0]])
    lo, hi = where.min(0), where.max(0)
    pad = MARGIN[plane.kind] * np.maximum(hi - lo, 1e-12)
    lo, hi = lo - pad, hi + pad
    return (axis_through(float(lo[0]), float(hi[0]), points, through_one=plane.kind == "points"),
            axis_through(float(lo[1]), float(hi[1]), points))


@torch.no_grad()
def evaluate_plane(
    fn: NetFn,
    plane: Plane,
    data: Mapping[str, Sequence[Batch]],
    loss_fn: LossFn,
    points: int = 21,
    a_range: tuple[float, float] = (-1.0, 1.0),
    b_range: Optional[tuple[float, float]] = None,
    axes: Optional[tuple[Tensor, Tensor]] = None,
    buffers: Optional[Params] = None,
    bn_module: Optional[nn.Module] = None,
    bn_batches: Optional[Sequence[Batch]] = None,
    centre_buffers: Optional[Params] = None,
    points_per_call: int = 7,
    progress: Optional[Progress] = None,
) -> PlaneEvaluation:
    """Mean loss and 0/1 error of ``fn`` on a grid of ``plane``, on each split of ``data``.

    Args:
        fn: ``fn(params, buffers, x) -> (B, C)``, one network (K = 1).
        plane: the plane.
        data: split name -> this rank's list of ``(x, y)`` batches (a fixed subset).
        loss_fn: ``loss_fn(outputs, y, reduction)`` from ``overparam.losses``.
        points: grid points per axis (``axis``; default 21).
        a_range, b_range: the grid's extent along d1 and d2 (``b_range`` default: ``a_range``).
        axes: ``(a, b)`` coordinates instead of ``points`` and the ranges.
        buffers: non-trainable state passed to ``fn`` (BatchNorm statistics).
        bn_module: the module behind ``fn``; when it has BatchNorm layers, their statistics are
            recomputed at every grid point from ``bn_batches`` (default ``data["train"]``), as
            ``torch.optim.swa_utils.update_bn`` would (``overparam.landscape.recompute_bn``).
        centre_buffers: statistics to use at (0, 0) instead of recomputing them (the trained
            net as it was evaluated during training: its logged losses).
        points_per_call: grid points per vmapped call (default 7, a third of a 21-point row;
            memory grows with it: ``points_per_call`` outputs of every layer per batch).
        progress: reports the grid points done (``overparam.progress``); None: silent.

    Returns:
        a ``PlaneEvaluation``; under DDP every rank holds the single-process values.
    """
    if axes is None:
        a = axis(points, *a_range)
        b = axis(points, *(b_range if b_range is not None else a_range))
    else:
        a, b = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in axes)
    A, B = torch.meshgrid(a, b, indexing="ij")  # (A, B) each
    coefficients = torch.stack([torch.ones(A.numel(), dtype=torch.float64), A.reshape(-1), B.reshape(-1)], 1)  # (A*B, 3)
    stored = {}
    if centre_buffers is not None:
        centre = ((A.reshape(-1) == 0) & (B.reshape(-1) == 0)).nonzero()
        stored = {int(i): centre_buffers for i in centre[:, 0]}
    results = evaluate_combinations(
        fn, plane.controls, coefficients, plane.like, data, loss_fn, buffers=buffers, bn_module=bn_module,
        bn_batches=bn_batches, stored_buffers=stored, points_per_call=points_per_call, progress=progress,
    )
    evaluation = PlaneEvaluation(a=a.cpu(), b=b.cpu(), plane=plane)
    for split, (loss, error, count) in results.items():
        evaluation.loss[split], evaluation.error[split] = loss.reshape(len(a), len(b)), error.reshape(len(a), len(b))
        evaluation.count[split] = count
    return evaluation
