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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.func import grad, vmap

from overparam.distributed import all_reduce_sum
from overparam.functional import NetFn, Params, flatten, unflatten

LossFn = Callable[..., Tensor]
MIN_SAMPLES = 1024  # fewer give no usable alpha (nan): sqrt(K) = 32 blocks at least; e.g. a 10-unit bias over 32 minibatches


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


@dataclass
class NoiseScale:
    """Running means of ``|G|^2`` and ``tr(Sigma)``; ``B_simple`` is their ratio."""

    G2_sum: float = 0.0
    S_sum: float = 0.0
    n: int = 0
    records: list = field(default_factory=list)

    def update(self, G2: float, S: float) -> None:
        self.G2_sum += float(G2)
        self.S_sum += float(S)
        self.n += 1

    @property
    def G2(self) -> float:
        return self.G2_sum / max(self.n, 1)

    @property
    def trace_sigma(self) -> float:
        return self.S_sum / max(self.n, 1)

    @property
    def B_simple(self) -> float:
        return self.S_sum / self.G2_sum if self.G2_sum != 0 else float("nan")

    def reset(self) -> None:
        self.G2_sum, self.S_sum, self.n = 0.0, 0.0, 0


# --- tail index -----------------------------------------------------------------------------------
def tail_index(X: Tensor, K1: Optional[int] = None) -> float:
    """Mohammadi et al. (2015) estimator of the tail index of symmetric alpha-stable samples.

    Args:
        X: samples (any shape; flattened). Exact zeros (e.g. dead ReLU units) carry no
            information on the tail and would give log 0: they are dropped.
        K1: block length. Default ``floor(sqrt(K))``: K1 and K2 = K / K1 both grow, which
            the estimator's consistency needs (Simsekli et al.'s code takes a block length
            near sqrt(K) dividing K).

    Returns:
        alpha in (0, inf); values a little above 2 happen for Gaussian samples (not clipped).
    """
    X = X.detach().reshape(-1).double()
    X = X[X != 0]
    K = X.numel()
    if K < MIN_SAMPLES:
        return float("nan")
    K1 = K1 or int(math.isqrt(K))
    K2 = K // K1
    X = X[: K1 * K2]
    Y = X.view(K2, K1).sum(1)
    inv_alpha = (Y.abs().log().mean() - X.abs().log().mean()) / math.log(K1)
    return float(1.0 / inv_alpha)


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


def tail_indices(noise: Params, K1: Optional[int] = None) -> tuple[float, dict[str, float]]:
    """``alpha`` of all coordinates pooled (parameters in name order) and per parameter tensor.

    The pooled samples are laid out parameter by parameter (sorted by name, so K = 1 and an
    ensemble member agree), each as (minibatch, coordinates) in row-major order.
    """
    pooled = torch.cat([noise[n].reshape(-1) for n in sorted(noise)])
    return tail_index(pooled, K1), {n: tail_index(v, K1) for n, v in noise.items()}
