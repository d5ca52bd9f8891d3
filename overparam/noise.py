"""SGD gradient noise: the gradient noise scale B_simple and the tail index alpha.

No Lightning here: functions take ``fn(params, buffers, x)``, a params dict, a loss function
``loss_fn(outputs, y, reduction)`` and tensors, return sums and counts, and all-reduce them
(``overparam.distributed.all_reduce_sum``) so under DDP every rank holds the 1-process answer.

**Gradient noise scale** (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of
Large-Batch Training", Appendix A.1). With G the full-batch gradient and Sigma the per-sample
gradient covariance, a mean gradient over B points has ``E|G_B|^2 = |G|^2 + tr(Sigma)/B``.
Two batch sizes B_small < B_big give unbiased estimates::

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

and ``B_simple = tr(Sigma) / |G|^2`` is estimated as the ratio of running means of the two
(a mean of ratios is biased). Under DDP the per-rank gradient is the small batch and the
all-reduced one the big batch (no extra passes); on one device per-sample gradients
(``torch.func.vmap(grad)``) grouped by ``small_batch`` play the small batches. With
``small_batch = 1`` the estimators are the unbiased sample moments:
``tr(Sigma) = (sum_i |g_i|^2 - B |g_bar|^2)/(B - 1)``.

**Tail index** (Mohammadi, Mohammadpour, Ogata 2015, "On estimating the tail index and the
spectral measure of multivariate alpha-stable distributions", Metrika, Corollary 2.4, as used
by Simsekli, Sagun, Gurbuzbalaban 2019, "A Tail-Index Analysis of Stochastic Gradient Noise in
Deep Neural Networks", Section 4). For K = K1 K2 i.i.d. symmetric alpha-stable samples X_k and
block sums ``Y_i = sum_{j=1}^{K1} X_{(i-1) K1 + j}`` (which are alpha-stable with scale
``K1^{1/alpha}``)::

    1/alpha ~ (1/log K1) (mean_i log|Y_i| - mean_k log|X_k|).

The noise samples are the coordinates of ``g_minibatch - g_full``, pooled over all
parameters (``alpha``) or over one parameter tensor (per layer). Pooling coordinates of very
different scales is not i.i.d. sampling: it biases alpha down even for Gaussian noise, so
report both.

**Uncertainty** (issue 13; measurements in docs/dynamics.md, ``benchmarks/noise_trust.py``).
``noise_scale`` gives B_simple, |G|^2 and tr(Sigma) with standard errors from the per-step
series: the delta method for a ratio of means, with successive-difference variances (the
steps' errors are uncorrelated, their expectations drift). ``tail_index`` gives alpha with the
standard error of the estimator's K2 block statistics, the minibatches of the noise taken as
independent clusters; ``TailIndex.interval`` inverts the normal interval of 1/alpha. Both
state sampling error only: not the estimator's finite-K1 bias on noise that is not exactly
stable, nor pooling's, nor the seed-to-seed spread of training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from statistics import NormalDist
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.func import grad, vmap

from overparam.distributed import all_reduce_sum
from overparam.functional import NetFn, Params, flatten, unflatten

LossFn = Callable[..., Tensor]
MIN_SAMPLES = 1024  # fewer give no usable alpha (nan): sqrt(K) = 32 blocks at least; e.g. a 10-unit bias over 32 minibatches
#: Level of the logged intervals (``alpha_lo``, ``alpha_hi``).
DEFAULT_LEVEL = 0.95
#: Fewest measured steps for a standard error of B_simple (nan below). Measured on synthetic
#: linear regression (2000 seeds, docs/dynamics.md): +- 1.96 SE covers 87-91% at 5-10 steps,
#: 92-93% at 20, 94% at 50; +- 1 SE 62-66% at 5-10 steps, 67-68% from 20.
MIN_SE_STEPS = 20
#: |G|^2 counts as resolved from 0 when its SE is at most this fraction of it: otherwise its 95%
#: interval holds 0 and so the 95% interval of B_simple = tr(Sigma) / |G|^2 is unbounded
#: (Fieller 1954, "Some problems in interval estimation", JRSS B 16), which no SE describes.
MAX_G2_REL_SE = 1 / NormalDist().inv_cdf(0.975)
#: Fewest independent clusters (minibatches) for the tail index's standard error (nan below):
#: the CR1 variance has C - 1 degrees of freedom, and below 16 the normal quantile's 95%
#: interval covers under ~93% (t with 15 degrees of freedom).
MIN_CLUSTERS = 16


# --- gradient noise scale ---------------------------------------------------------------------
def two_batch_estimates(small_sq: Tensor, big_sq: Tensor, B_small: float, B_big: float) -> tuple[Tensor, Tensor]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from ``|G_small|^2`` and ``|G_big|^2`` (McCandlish et al. A.1).

    Args:
        small_sq: squared norm of a mean gradient over ``B_small`` points (or the average of
            several such norms, which is still unbiased and has less variance).
        big_sq: squared norm of the mean gradient over ``B_big`` points.
    """
    if not B_big > B_small:
        raise ValueError(f"two-batch estimator needs B_big > B_small, got B_small={B_small}, B_big={B_big}")
    G2 = (B_big * big_sq - B_small * small_sq) / (B_big - B_small)
    S = (small_sq - big_sq) / (1.0 / B_small - 1.0 / B_big)
    return G2, S


def per_sample_grad_fn(fn: NetFn, loss_fn: LossFn) -> Callable[[Params, Params, Tensor, Tensor], Params]:
    """``(params, buffers, x, y) -> {name: (B, *shape)}``: per-sample loss gradients, vectorised."""

    def sample_loss(params: Params, buffers: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(fn(params, buffers, x.unsqueeze(0)), y.unsqueeze(0), reduction="sum")

    return vmap(grad(sample_loss), in_dims=(None, None, 0, 0))


@dataclass
class NoiseMoments:
    """Sums behind one two-batch estimate: ``sum_g`` (sum of per-sample gradients, flat),
    ``small_sq_sum`` (sum over groups of |group mean gradient|^2), ``groups`` and ``count``."""

    sum_g: Tensor
    small_sq_sum: Tensor
    groups: Tensor
    count: Tensor

    def estimates(self) -> tuple[Tensor, Tensor, float, float]:
        """``(|G|^2, tr(Sigma), B_small, B_big)`` of the whole batch."""
        B_big = float(self.count)
        B_small = B_big / float(self.groups)
        big_sq = (self.sum_g / B_big).square().sum()
        small_sq = self.small_sq_sum / self.groups
        G2, S = two_batch_estimates(small_sq, big_sq, B_small, B_big)
        return G2, S, B_small, B_big


def per_sample_moments(
    fn: NetFn,
    params: Params,
    buffers: Params,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    small_batch: int = 1,
    chunk: int = 128,
) -> NoiseMoments:
    """Per-sample gradients of one batch, grouped into small batches of ``small_batch`` points.

    Groups are consecutive points; ``chunk`` (rounded to a multiple of ``small_batch``) bounds
    memory at ``chunk * N`` numbers. Sums are all-reduced (each rank passes its own shard,
    whose length must be a multiple of ``small_batch``). Default chunk 128: 227 MB of float32
    per-sample gradients for MNIST-FC (N = 443,610).
    """
    if x.shape[0] % small_batch:
        raise ValueError(f"batch of {x.shape[0]} points is not a multiple of small_batch={small_batch}")
    per_sample = per_sample_grad_fn(fn, loss_fn)
    params = {n: p.detach() for n, p in params.items()}
    step = max(small_batch, chunk // small_batch * small_batch)
    sums = {n: torch.zeros(p.numel(), dtype=torch.float64, device=x.device) for n, p in params.items()}
    small_sq = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], step):
        g = per_sample(params, buffers, x[start : start + step], y[start : start + step])
        for n, t in g.items():  # per parameter: no (b, N) concatenated copy
            t = t.reshape(t.shape[0], -1)  # (b, numel)
            sums[n] += t.sum(0).double()
            group_means = t if small_batch == 1 else t.reshape(-1, small_batch, t.shape[1]).mean(1)  # (b / small_batch, numel)
            # A norm, not square().sum(): no second (b, numel) temporary.
            small_sq += torch.linalg.vector_norm(group_means, dim=1).double().square().sum()
        del g
    sum_g = torch.cat(list(sums.values()))
    counts = torch.tensor([x.shape[0], x.shape[0] // small_batch], dtype=torch.float64, device=x.device)
    all_reduce_sum(sum_g), all_reduce_sum(small_sq), all_reduce_sum(counts)
    return NoiseMoments(sum_g, small_sq, counts[1], counts[0])


def mean_se(x: Tensor, min_points: int = 2) -> Tensor:
    """Standard error of the mean of series ``x`` (last dim: time), from successive differences.

    ``se^2 = (1/n) sum_{t<n} (x_{t+1} - x_t)^2 / (2 (n - 1))``: the mean square successive
    difference over 2 (von Neumann, Kent, Bellinson & Hart 1941, "The mean square successive
    difference", Ann. Math. Statist. 12) estimates the variance s^2 of the errors e_t of
    ``x_t = m_t + e_t`` when the e_t are uncorrelated and the expectations m_t drift slowly: a
    drift adds ``(m_{t+1} - m_t)^2 / 2``, second order in the step, where the sample variance
    would add the whole spread of m_t. NaN below ``min_points`` points (at least 2).
    """
    n = x.shape[-1]
    if n < max(min_points, 2):
        return torch.full(x.shape[:-1], float("nan"), dtype=x.dtype, device=x.device)
    return (x.diff(dim=-1).square().sum(-1) / (2 * (n - 1) * n)).sqrt()


@dataclass
class NoiseScaleEstimate:
    """``B_simple``, ``|G|^2`` and ``tr(Sigma)`` over a series of steps with their standard errors.

    Attributes are ``(K,)`` tensors, one entry per ensemble member, except ``B_simple_mean``
    and ``B_simple_mean_se`` (the member mean and its SE) and ``steps`` (the series length).
    """

    B_simple: Tensor
    B_simple_se: Tensor
    G2: Tensor
    G2_se: Tensor
    trace_sigma: Tensor
    trace_sigma_se: Tensor
    B_simple_mean: float
    B_simple_mean_se: float
    steps: int


def noise_scale(G2: Tensor, S: Tensor) -> NoiseScaleEstimate:
    """``B_simple = mean_t S_t / mean_t G2_t`` from per-step two-batch estimates, with its SE.

    Args:
        G2: ``(K, n)`` per-step estimates of ``|G|^2`` (K members, n measured steps in order).
        S: ``(K, n)`` per-step estimates of ``tr(Sigma)``.

    The ratio's error is, to first order (the delta method for a ratio of means), the mean of
    the influence series ``W_t = (S_t - B G2_t) / mean(G2)``: its SE carries the sample
    covariance of the two series (they share each step's gradients). The member mean
    ``(1/K) sum_k B_k`` has the influence series ``mean_k W_{k,t}``, so members trained on the
    same batches, whose errors correlate, are handled exactly. Every SE is ``mean_se`` of an
    influence series. What it assumes: each step's estimate is unbiased for the value at
    theta_t given the past (a fresh batch), so the errors are uncorrelated across steps
    (martingale differences), although theta_t and with it the estimated values drift; the
    SE is that of the measurement at the visited theta_t, not a seed-to-seed spread.
    Successive differences remove the drift to first order; the sample covariance would not
    (it counts the drift of |G|^2 over an epoch as noise). The delta method also needs
    |G|^2 resolved from 0 (``MAX_G2_REL_SE``); where it is not, the ratio's interval is
    unbounded and its SE describes nothing. Measured coverage (docs/dynamics.md): synthetic
    linear regression with |G|^2 falling 16-fold over 30 steps, +- 1 / 1.96 SE cover 64% / 93%
    (the sample-variance SE 80% / 99%); MNIST MLP trajectories, 32 steps per epoch, 70% / 94%
    over 80 epochs, but 50% / 85% in the first epoch from initialisation.
    """
    G2, S = G2.double(), S.double()
    n = G2.shape[-1]
    G2_mean, S_mean = G2.mean(-1), S.mean(-1)
    B = S_mean / G2_mean
    W = (S - B[:, None] * G2) / G2_mean[:, None]  # (K, n) influence series of B_k
    se = partial(mean_se, min_points=MIN_SE_STEPS)
    return NoiseScaleEstimate(
        B_simple=B,
        B_simple_se=se(W),
        G2=G2_mean,
        G2_se=se(G2),
        trace_sigma=S_mean,
        trace_sigma_se=se(S),
        B_simple_mean=float(B.mean()),
        B_simple_mean_se=float(se(W.mean(0))),
        steps=n,
    )


@dataclass
class NoiseScale:
    """The per-step two-batch estimates measured since the last ``reset``, in step order.

    ``values[i]`` is a ``(K, 2)`` tensor (``|G|^2``, ``tr(Sigma)`` per member) of step
    ``steps[i]``. Kept as tensors (no device sync per step); ``estimate()`` reduces them.
    """

    steps: list[int] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)

    def update(self, step: int, G2: Tensor, S: Tensor) -> None:
        """Add step ``step``'s estimates, ``(K,)`` each."""
        self.steps.append(step)
        self.values.append(torch.stack([G2, S], -1).detach().double())  # (K, 2)

    def series(self) -> Tensor:
        """``(n, K, 2)``: the measured steps' ``|G|^2`` and ``tr(Sigma)`` per member."""
        return torch.stack(self.values)

    def all_reduce(self) -> None:
        """Sum each step's estimates over ranks (one collective): under DDP each rank holds a share."""
        self.values = list(all_reduce_sum(self.series()).unbind(0))

    def estimate(self) -> NoiseScaleEstimate:
        """B_simple, |G|^2, tr(Sigma) with their SEs over the steps held (``noise_scale``)."""
        series = self.series()
        return noise_scale(series[..., 0].T, series[..., 1].T)

    def reset(self) -> None:
        self.steps, self.values = [], []


# --- tail index -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TailIndex:
    """A tail-index estimate with its standard error.

    Attributes:
        alpha: the estimate, ``1 / inv_alpha`` (nan with fewer than ``MIN_SAMPLES`` samples).
        inv_alpha: ``1/alpha``, the mean of the K2 block statistics (see ``tail_index``).
        inv_alpha_se: its standard error.
        K1: block length.
        K2: number of blocks.
        influence: ``(C,)`` each cluster's share of the error of ``inv_alpha``, ``sum over its
            blocks of (T_i - inv_alpha) / K2``, indexed by cluster label;
            ``inv_alpha_se^2 = C/(C-1) sum influence^2`` over the C clusters that hold blocks.
        clusters: C.
    """

    alpha: float
    inv_alpha: float
    inv_alpha_se: float
    K1: int
    K2: int
    influence: Tensor
    clusters: int

    def interval(self, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
        """``(lo, hi)`` for alpha: the normal interval ``inv_alpha +- z se`` of 1/alpha, inverted.

        The map u -> 1/u is monotone, so the interval covers alpha exactly as often as the
        one of 1/alpha covers 1/alpha; it is asymmetric around alpha (longer above). ``hi`` is
        inf when ``inv_alpha - z se <= 0``.
        """
        if not math.isfinite(self.inv_alpha_se):
            return math.nan, math.nan
        z = NormalDist().inv_cdf(0.5 + level / 2)
        lo_u, hi_u = self.inv_alpha - z * self.inv_alpha_se, self.inv_alpha + z * self.inv_alpha_se
        return 1.0 / hi_u, (1.0 / lo_u if lo_u > 0 else math.inf)


def tail_index(X: Tensor, K1: Optional[int] = None, groups: Optional[Tensor] = None) -> TailIndex:
    """Mohammadi et al. (2015) estimator of the tail index of symmetric alpha-stable samples.

    Args:
        X: samples (any shape; flattened). Exact zeros (e.g. dead ReLU units) carry no
            information on the tail and would give log 0: they are dropped.
        K1: block length. Default ``floor(sqrt(K))``: K1 and K2 = K / K1 both grow, which
            the estimator's consistency needs (Simsekli et al.'s code takes a block length
            near sqrt(K) dividing K).
        groups: non-negative integer cluster labels, one per sample (X's shape): samples with
            different labels are independent, those sharing one may depend on each other
            (for SGD noise, the coordinates of one minibatch's noise). A block belongs to the
            cluster of its first sample. Default: every block is its own cluster (i.i.d.
            samples).

    Returns:
        The estimate with its standard error. alpha is in (0, inf); values a little above 2
        happen for Gaussian samples (not clipped).

    **Standard error.** With ``T_i = (log|Y_i| - mean_{k in block i} log|X_k|) / log K1``, the
    estimator is exactly ``1/alpha = mean_i T_i``, a mean of K2 block statistics. For i.i.d.
    samples the T_i are i.i.d. with finite variance (log|X| has all moments), so the central
    limit theorem over the K2 blocks gives ``se = std(T) / sqrt(K2)``; with clusters, the
    cluster-robust (CR1) variance of a mean, ``C/(C-1) sum_c (sum_{i in c} (T_i - mean T) /
    K2)^2`` (Liang & Zeger 1986; Cameron & Miller 2015, "A Practitioner's Guide to
    Cluster-Robust Inference", Sec. IIC), which needs only the clusters to be independent. For
    exactly stable samples ``E T_i = 1/alpha`` at every K1 (``Y_i`` is distributed as
    ``K1^{1/alpha} X``), so the interval covers alpha at its level (measured over 2000 draws
    of K = 10^4 at alpha = 1.5: 69% / 96% for the 68% / 95% intervals); for noise only in the
    domain of attraction of a stable law the estimator has a bias at finite K1 that the SE
    does not include. On the SGD noise of an MNIST MLP the minibatch-cluster SE matched the
    spread over 60 redraws of the minibatches (pooled: 0.0130 vs 0.0130 and 0.0094 vs 0.0092
    at 16 and 32 minibatches), where the i.i.d. SE was 2.1-2.4x too small.
    """
    X = X.detach().reshape(-1).double()
    labels = None if groups is None else groups.detach().reshape(-1).to(X.device)
    if labels is not None and labels.numel() != X.numel():
        raise ValueError(f"groups must have one label per sample: {X.numel()} samples, got {labels.numel()} labels")
    keep = X != 0
    X = X[keep]
    K = X.numel()
    if K < MIN_SAMPLES:
        nan = float("nan")
        return TailIndex(nan, nan, nan, 0, 0, torch.zeros(0, dtype=torch.float64), 0)
    K1 = K1 or int(math.isqrt(K))
    K2 = K // K1
    X = X[: K1 * K2].view(K2, K1)
    T = (X.sum(1).abs().log() - X.abs().log().mean(1)) / math.log(K1)  # (K2,) block statistics
    inv_alpha = T.mean()
    block_cluster = torch.arange(K2, device=X.device) if labels is None else labels[keep][: K1 * K2].view(K2, K1)[:, 0]
    influence = torch.bincount(block_cluster, weights=(T - inv_alpha) / K2)
    C = int(torch.count_nonzero(torch.bincount(block_cluster)))
    se = math.sqrt(C / (C - 1) * float(influence.square().sum())) if C >= MIN_CLUSTERS else math.nan
    return TailIndex(float(1.0 / inv_alpha), float(inv_alpha), se, K1, K2, influence.cpu(), C)


def member_mean_tail_index(estimates: Sequence[TailIndex]) -> tuple[float, float]:
    """``(mean_k alpha_k, its SE)`` over ensemble members whose samples share cluster labels.

    Members measured on the same minibatches have correlated errors: by the delta method
    (``d alpha = -alpha^2 d(1/alpha)``) the mean's error has the per-cluster influence
    ``-(1/K) sum_k alpha_k^2 influence_k``, whose CR1 variance is the SE squared.
    """
    alpha = sum(e.alpha for e in estimates) / len(estimates)
    size = max(e.influence.numel() for e in estimates)
    influence = torch.zeros(size, dtype=torch.float64)
    for e in estimates:
        influence[: e.influence.numel()] -= e.alpha**2 * e.influence / len(estimates)
    C = max(e.clusters for e in estimates)
    if not all(math.isfinite(e.inv_alpha_se) for e in estimates):
        return alpha, math.nan
    return alpha, math.sqrt(C / (C - 1) * float(influence.square().sum()))


def mean_gradient(fn: NetFn, params: Params, buffers: Params, loss_fn: LossFn, batches: Sequence[tuple[Tensor, Tensor]], count: int) -> Params:
    """``(1/count) sum over batches (all ranks) of grad sum_i loss_i``: exact under DDP."""
    params = {n: p.detach() for n, p in params.items()}

    def summed(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(fn(p, buffers, x), y, reduction="sum")

    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in batches:
        if x.shape[0] == 0:
            continue
        g = grad(summed)(params, x, y)
        for n in total:
            total[n] += g[n]
    flat = all_reduce_sum(flatten(total))
    return {n: t / count for n, t in unflatten(flat, total).items()}


def gradient_noise_samples(
    fn: NetFn,
    params: Params,
    buffers: Params,
    loss_fn: LossFn,
    full_batches: Sequence[tuple[Tensor, Tensor]],
    full_count: int,
    minibatches: Sequence[Sequence[tuple[Tensor, Tensor]]],
    minibatch_size: int,
) -> Params:
    """SGD noise ``g_minibatch - g_full`` per parameter: ``{name: (num_minibatches, *shape)}``.

    ``full_batches`` (this rank's shard of the reference set, ``full_count`` points over all
    ranks) gives the full gradient; each entry of ``minibatches`` is this rank's shard of one
    global minibatch of ``minibatch_size`` points.
    """
    G = mean_gradient(fn, params, buffers, loss_fn, full_batches, full_count)
    noise = {n: [] for n in G}
    for shards in minibatches:
        g = mean_gradient(fn, params, buffers, loss_fn, shards, minibatch_size)
        for n in G:
            noise[n].append(g[n] - G[n])
    return {n: torch.stack(v) for n, v in noise.items()}


def tail_indices(noise: Params, K1: Optional[int] = None) -> tuple[TailIndex, dict[str, TailIndex]]:
    """Tail index of all coordinates pooled (parameters in name order) and per parameter tensor.

    The pooled samples are laid out parameter by parameter (sorted by name, so K = 1 and an
    ensemble member agree), each as (minibatch, coordinates) in row-major order. The
    minibatches are the clusters of the standard error: they are independent draws, while
    the coordinates of one minibatch's noise share its points.
    """
    groups = {n: torch.arange(v.shape[0], device=v.device).repeat_interleave(v[0].numel()) for n, v in noise.items()}
    pooled = torch.cat([noise[n].reshape(-1) for n in sorted(noise)])
    pooled_groups = torch.cat([groups[n] for n in sorted(noise)])
    return tail_index(pooled, K1, pooled_groups), {n: tail_index(v, K1, groups[n]) for n, v in noise.items()}
