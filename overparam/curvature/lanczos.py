"""Lanczos with full reorthogonalisation and thick restart: extreme eigenpairs of a symmetric operator.

Given ``matvec(v) = A v`` (N x N, symmetric), Lanczos builds an orthonormal basis
V = [v_1 .. v_n] of the Krylov space K_n(A, v_1) and the projection T = V^T A V, with

    A V = V T + beta_n v_{n+1} e_n^T.

The eigenpairs (theta_j, s_j) of T give Ritz pairs (theta_j, V s_j) whose residual norm is
||A V s_j - theta_j V s_j|| = |beta_n s_j[n]| (Golub & Van Loan, "Matrix Computations", 4th ed.,
Section 10.1.4); by Kahan's theorem an eigenvalue of A lies within that residual of theta_j.

* **Convergence is stated.** ``eigsh`` iterates until every wanted Ritz pair has a residual
  <= ``tol * |theta|_max`` (|theta|_max estimates ||A||_2 = max |lambda_i|) or the product budget
  ``max_steps`` is spent, returns the residual and a ``converged`` flag per eigenvalue, and warns
  (``ConvergenceWarning``) when any wanted one did not converge.
* **Memory is bounded by thick restart** (Wu & Simon 2000, "Thick-restart Lanczos method for
  large symmetric eigenvalue problems", SIAM J. Matrix Anal. Appl. 22(2); equivalent to ARPACK's
  implicit restart, Sorensen 1992). When the basis holds ``max_basis`` vectors, the Ritz vectors
  of the ``keep`` Ritz values nearest the wanted end are kept, together with the residual vector
  v_{n+1}; T restarts as diag(theta_kept) with an arrow row beta_n s_j[n] coupling them to
  v_{n+1}, and the recurrence continues from there. The relation above still holds, so the
  residual formula holds across restarts.
* **Reorthogonalisation is one matrix product each way.** Each step removes the three-term (or,
  after a restart, arrow) components, then runs one classical Gram-Schmidt pass against the whole
  basis (``h = V w``, ``w -= V^T h``: two matrix-vector products over the rows of V). A second pass
  runs only when the first removed more than 30% of the norm (the criterion of Daniel, Gragg,
  Kaufman & Stewart 1976, "twice is enough": Giraud et al. 2005), so no ghost eigenvalues appear.
  The basis is stored row by row (each vector contiguous), so a pass reads only the vectors
  already built. Vectors stay in the operator's dtype; T and its eigen-decomposition are float64.
  Each step moves three scalars to the host (alpha, and two norms for the tests above), once.

When beta falls to zero (an invariant subspace, e.g. a low-rank GGN or n = N) the next vector is
a seeded random one orthogonal to V, so the basis can grow to all of R^N.

Under DDP the operator returns the same vector on every rank and the start vector comes from a
shared seed, so every rank builds the same V and T.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from overparam import seeds
from overparam.progress import Progress, track

MatVec = Callable[[Tensor], Tensor]
WHICH = ("largest", "smallest")

#: Relative Ritz residual (of ||A||_2 ~ |theta|_max) at which an eigenpair counts as converged.
#: Default 1e-6: the eigenvalue is then within 1e-6 ||A|| (Kahan), and within residual^2 / gap of
#: an isolated eigenvalue (Golub & Van Loan, Thm. 8.1.13): float32 products carry ~1e-7.
DEFAULT_TOL = 1e-6
#: A second Gram-Schmidt pass when a pass kept less than this share of the norm (DGKS 1976).
_SECOND_PASS = 0.7
#: beta below this times the largest |alpha|, |beta| seen is a breakdown (an invariant subspace).
_BREAKDOWN = 1e-10


class ConvergenceWarning(UserWarning):
    """Some wanted eigenpairs did not reach the residual tolerance within the product budget."""


def default_max_basis(k: int) -> int:
    """Vectors kept at most (memory: ``max_basis * N`` numbers): ``max(3k + 50, 100)``.

    Measured by ``benchmarks/curvature_trust.py`` on trained MNIST nets (MLP N = 89,610, CNN
    N = 23,946, BatchNorm CNN N = 24,170; float32, tol 1e-6): with 100 vectors their bottom-10
    converged in 177, 93 and 92 products, right to 7e-8 |lambda_1| (40 steps, the old default,
    left them 2e-2, 7e-3 and 4e-3 off). In an earlier training of the same MLP the bottom-10 took
    186 products without restart, 269 with 100 vectors and 347 with 60. The top-10 converge in
    23-34 products, before any restart.
    """
    return max(3 * k + 50, 100)


def default_max_steps(k: int) -> int:
    """The product budget: ``max(40k, 600)``, over twice the most the measured bottom-10 needed (269).

    See ``default_max_basis`` for the measurement. A run that converges stops early and costs
    only the products it used; one that does not is flagged and warned about.
    """
    return max(40 * k, 600)


@dataclass
class LanczosResult:
    """Raw output of ``lanczos``: keep it; everything else is post-processing.

    Attributes:
        alphas: (m,) float64 diagonal of T.
        betas: (m,) float64; ``betas[j]`` couples step j and j + 1 (the last one is the residual
            scale of the Ritz pairs). A restart after breakdown stores 0 there.
        basis: (N, m) V in the operator's dtype, or None when it was not kept.
    """

    alphas: Tensor
    betas: Tensor
    basis: Optional[Tensor]

    @property
    def num_steps(self) -> int:
        return int(self.alphas.numel())

    def tridiagonal(self) -> Tensor:
        """T (m x m, float64)."""
        m = self.num_steps
        T = torch.diag(self.alphas)
        if m > 1:
            off = self.betas[: m - 1]
            T += torch.diag(off, 1) + torch.diag(off, -1)
        return T

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(theta, S, residual)``: Ritz values ascending, T's eigenvectors, residual norms."""
        theta, S = torch.linalg.eigh(self.tridiagonal())
        residual = (self.betas[-1] * S[-1, :]).abs()
        return theta, S, residual


class _Krylov:
    """An orthonormal basis V (rows) of at most ``capacity`` vectors and T = V^T A V (float64).

    ``size`` columns of T are complete; ``V[size]`` is the next vector, coupled to the basis by
    ``beta``. After a restart the first ``size`` rows are Ritz vectors (an arrow in T).
    """

    def __init__(self, matvec: MatVec, v0: Tensor, capacity: int, seed: int) -> None:
        self.matvec, self.capacity, self.dim = matvec, capacity, v0.numel()
        self.V = torch.empty(capacity + 1, self.dim, dtype=v0.dtype, device=v0.device)
        self.V[0] = v0 / torch.linalg.vector_norm(v0)
        self.T = torch.zeros(capacity + 1, capacity + 1, dtype=torch.float64)
        self.size, self.lo, self.beta, self.scale = 0, 0, 0.0, 0.0
        self.num_matvecs = 0
        self.generator = seeds.lanczos_restarts(seed)

    def _project_out(self, w: Tensor, n: int) -> Tensor:
        """One classical Gram-Schmidt pass against ``V[:n]``: one matrix product each way."""
        return torch.addmv(w, self.V[:n].T, self.V[:n] @ w, alpha=-1)

    def step(self) -> None:
        """One product: complete column ``size`` of T and the next basis vector."""
        j, V = self.size, self.V
        q = V[j]
        w = self.matvec(q)
        self.num_matvecs += 1
        if j > self.lo:  # the couplings already known: beta_{j-1}, or the arrow after a restart
            couplings = self.T[self.lo : j, j].to(device=w.device, dtype=w.dtype)
            w = torch.addmv(w, V[self.lo : j].T, couplings, alpha=-1)
        alpha = torch.dot(q, w)
        w = w - alpha * q
        before = torch.linalg.vector_norm(w)
        h = V[: j + 1] @ w
        w = torch.addmv(w, V[: j + 1].T, h, alpha=-1)
        alpha, before, beta = torch.stack([alpha + h[j], before, torch.linalg.vector_norm(w)]).tolist()
        if beta < _SECOND_PASS * before:
            w = self._project_out(w, j + 1)
            beta = float(torch.linalg.vector_norm(w))
        self.T[j, j] = alpha
        self.scale = max(self.scale, abs(alpha), beta)
        self.size, self.lo = j + 1, j
        if j + 1 == self.dim:  # V spans R^N: T is similar to A
            self.beta = 0.0
            return
        if beta <= _BREAKDOWN * self.scale:  # invariant subspace: go on from a random direction
            beta, w = 0.0, self._random_orthogonal(j + 1)
            V[j + 1] = w / torch.linalg.vector_norm(w)
        else:
            V[j + 1] = w / beta
        self.T[j + 1, j] = self.T[j, j + 1] = self.beta = beta

    def _random_orthogonal(self, n: int) -> Tensor:
        r = torch.randn(self.dim, generator=self.generator, dtype=torch.float64)
        r = r.to(device=self.V.device, dtype=self.V.dtype)
        return self._project_out(self._project_out(r, n), n)

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(theta, S, residual)`` of the current basis: Ritz values ascending, residual norms."""
        n = self.size
        theta, S = torch.linalg.eigh(self.T[:n, :n])
        return theta, S, (self.beta * S[n - 1]).abs()

    def restart(self, theta: Tensor, S: Tensor, keep: Tensor) -> None:
        """Keep the Ritz vectors ``V^T S[:, keep]`` and the residual vector (Wu & Simon 2000)."""
        n, m = self.size, keep.numel()
        Y = S[:, keep].T.to(device=self.V.device, dtype=self.V.dtype) @ self.V[:n]  # (m, N)
        self.V[m] = self.V[n]
        self.V[:m] = Y
        arrow = self.beta * S[n - 1, keep]
        self.T.zero_()
        self.T[:m, :m] = torch.diag(theta[keep])
        self.T[m, :m] = self.T[:m, m] = arrow
        self.size, self.lo = m, 0

    def vectors(self, S: Tensor) -> Tensor:
        """Ritz vectors ``V^T S`` as columns (N, k)."""
        n = self.size
        return (S.T.to(device=self.V.device, dtype=self.V.dtype) @ self.V[:n]).T.contiguous()


def lanczos(matvec: MatVec, v0: Tensor, num_steps: int, keep_basis: bool = True, seed: int = 0) -> LanczosResult:
    """Run ``num_steps`` Lanczos steps from ``v0`` with full reorthogonalisation (no restart).

    The raw run behind SLQ: T is tridiagonal, and its eigen-decomposition gives the Gauss
    quadrature of ``v0``.

    Args:
        matvec: ``v -> A v`` on flat vectors of ``v0``'s shape, dtype and device (it must not
            modify its input: the input is a row of the basis).
        v0: start vector (normalised here).
        num_steps: m, at most N.
        keep_basis: return V (it is always kept internally, for reorthogonalisation).
        seed: seed of the random vectors drawn after a breakdown (shared across ranks).

    Returns:
        ``LanczosResult`` with m steps.
    """
    m = min(num_steps, v0.numel())
    krylov = _Krylov(matvec, v0, m, seed)
    for _ in range(m):
        krylov.step()
    alphas = krylov.T.diagonal()[:m].clone()
    betas = torch.cat([krylov.T.diagonal(-1)[: m - 1], torch.tensor([krylov.beta], dtype=torch.float64)])
    return LanczosResult(alphas, betas, krylov.V[:m].T if keep_basis else None)


@dataclass
class EigenResult:
    """Extreme eigenpairs from Lanczos, with what is needed to trust them.

    Attributes:
        eigenvalues: (k,) float64, largest first for ``largest``, smallest first for ``smallest``.
        eigenvectors: (N, k) orthonormal Ritz vectors in the operator's dtype (or None).
        residuals: (k,) float64 Ritz residual norms ||A y - theta y|| (exact in exact arithmetic).
        converged: (k,) bool, ``residuals <= tol * scale``.
        scale: |theta|_max, the estimate of ||A||_2 the tolerance is relative to.
        tol: the relative tolerance asked for.
        which: ``largest`` or ``smallest``.
        num_matvecs: operator applications spent.
        num_restarts: thick restarts done.
    """

    eigenvalues: Tensor
    eigenvectors: Optional[Tensor]
    residuals: Tensor
    converged: Tensor
    scale: float
    tol: float
    which: str
    num_matvecs: int
    num_restarts: int

    @property
    def relative_residuals(self) -> Tensor:
        """``residuals / scale``: what ``tol`` is compared with."""
        return self.residuals / max(self.scale, 1e-300)


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the k wanted Ritz values, the extreme one first (theta ascending)."""
    order = torch.arange(theta.numel())
    return order.flip(0)[:k] if which == "largest" else order[:k]


#: Weight of the random direction in a warm start (``start_vector``), against 1 per previous vector.
WARM_RANDOM_SHARE = 0.1


def start_vector(dim: int, v0: Optional[Tensor], seed: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The Lanczos start vector: seeded Gaussian, ``v0`` itself, or a warm start from a block.

    A block ``v0`` of shape (N, b) (e.g. the Ritz vectors of a previous run) is orthonormalised
    to Y, and the start is ``Y 1 + 0.1 g / ||g||`` with g the seeded Gaussian: the Krylov space
    holds the old eigenvectors after about b steps, and every other direction keeps a component
    of ~0.1 / sqrt(N), so an eigenvalue that has moved into the wanted set still surfaces, about
    log(10) / (convergence rate) steps later than from a cold start (tested). Measured on a
    slowly drifting 400 x 400 operator (top-5, 1% drift per step): 22 products instead of 28 at
    tol 1e-6, 14 instead of 21 at tol 1e-3; with share 1 (an equal share) 24 and 16, with 0 18
    and 11 but no protection.
    """
    g = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if v0 is None:
        return g.to(device=device, dtype=dtype)
    if v0.dim() == 1:
        return v0.to(device=device, dtype=dtype)
    if v0.dim() != 2 or v0.shape[0] != dim:
        raise ValueError(f"v0 must have shape ({dim},) or ({dim}, b). Got {tuple(v0.shape)}.")
    Y = torch.linalg.qr(v0.to(device=device, dtype=torch.float64)).Q
    return (Y.sum(1) + WARM_RANDOM_SHARE * (g / g.norm()).to(Y.device)).to(dtype)


def eigsh(
    matvec: MatVec,
    dim: int,
    k: int = 1,
    which: str = "largest",
    max_steps: Optional[int] = None,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    v0: Optional[Tensor] = None,
    eigenvectors: bool = True,
    max_basis: Optional[int] = None,
    warn: bool = True,
    progress: Optional[Progress] = None,
) -> EigenResult:
    """The k largest (or smallest) eigenpairs of a symmetric operator by thick-restart Lanczos.

    Runs until every wanted Ritz pair has residual ``<= tol * |theta|_max`` (checked after every
    product) or ``max_steps`` products are spent. A converged value is within ``tol ||A||`` of an
    eigenvalue of A (Kahan's bound), and within residual^2 / gap of an isolated one. What no
    Krylov method can promise is that it is the i-th one: an eigenvector that the start vector
    (nearly) lacks, such as the second copy of an exactly repeated eigenvalue, is found late or
    never, and then the values from there on belong to more central eigenvalues (Ritz values
    interlace: never more extreme ones). A random start makes this unlikely for distinct ones.

    Args:
        matvec: ``v -> A v`` on flat (N,) vectors (it must not modify its input).
        dim: N.
        k: number of eigenpairs.
        which: ``largest`` (top-k) or ``smallest`` (bottom-k).
        max_steps: product budget (default ``default_max_steps(k)`` = max(40k, 600), measured).
        tol: relative residual at which a pair has converged (default 1e-6, ``DEFAULT_TOL``).
        seed: seed of the Gaussian start vector (shared across ranks).
        dtype, device: of the vectors (the operator's).
        v0: a start vector (N,), or a block (N, b) of previous Ritz vectors to warm-start from
            (``start_vector``; ``warm_eigsh`` does this for a previous result).
        eigenvectors: also return Ritz vectors.
        max_basis: vectors kept at most before a thick restart (default
            ``default_max_basis(k)`` = max(3k + 50, 100), capped at N; memory ``max_basis * N``).
        warn: emit a ``ConvergenceWarning`` when a wanted pair did not converge (a caller that
            reports otherwise, e.g. a callback on rank 0, turns it off and reads ``converged``).
        progress: reports the products spent (of the budget) and the pairs converged so far
            (``overparam.progress``); None: silent.

    Returns:
        ``EigenResult`` with residuals and a ``converged`` flag per eigenvalue.

    Raises:
        ValueError: for ``which`` or ``k`` out of range, or a ``v0`` of the wrong shape.
    """
    if which not in WHICH:
        raise ValueError(f"which must be 'largest' or 'smallest'; got {which!r}")
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in 1..{dim}; got {k}")
    budget = max(max_steps or default_max_steps(k), k)
    capacity = min(dim, max(max_basis or default_max_basis(k), k + 2))
    # Kept at a restart: the k wanted and a fifth of the rest. Measured on the bottom-10 of a
    # trained MLP (default_max_basis) at 100 vectors: keeping 15-30% of the rest took 260-275
    # products, 50% 297, 85% 403 (each cycle then adds too few new directions), none 300.
    keep = min(k + (capacity - k) // 5, capacity - 1)
    krylov = _Krylov(matvec, start_vector(dim, v0, seed, dtype, device), capacity, seed)
    restarts = 0
    report = track(progress, budget, "products")
    while True:
        krylov.step()
        theta, S, residual = krylov.ritz()
        scale = max(float(theta.abs().max()), 1e-30)
        idx = _wanted(theta, k, which)
        converged = int((residual[idx] <= tol * scale).sum())
        report.update(converged=f"{converged}/{k}")
        done = krylov.size >= k and converged == idx.numel()
        if done or krylov.num_matvecs >= budget or krylov.size == dim:
            break
        if krylov.size == capacity:
            krylov.restart(theta, S, _wanted(theta, keep, which))
            restarts += 1
    idx = _wanted(theta, min(k, theta.numel()), which)
    result = EigenResult(
        eigenvalues=theta[idx],
        eigenvectors=krylov.vectors(S[:, idx]) if eigenvectors else None,
        residuals=residual[idx],
        converged=residual[idx] <= tol * scale,
        scale=scale,
        tol=tol,
        which=which,
        num_matvecs=krylov.num_matvecs,
        num_restarts=restarts,
    )
    report.finish(converged=f"{int(result.converged.sum())}/{k}")
    if warn and not bool(result.converged.all()):
        warnings.warn(convergence_message(result, budget, capacity), ConvergenceWarning, stacklevel=2)
    return result


def convergence_message(result: EigenResult, max_steps: int, max_basis: int) -> str:
    """One line: how many did not converge, how far off, and what to raise."""
    missing = int((~result.converged).sum())
    worst = float(result.relative_residuals.max())
    return (
        f"Lanczos: {missing} of the {result.eigenvalues.numel()} {result.which} eigenvalues did not converge in "
        f"{result.num_matvecs} products (largest relative Ritz residual {worst:.1e} > tol {result.tol:.0e}); "
        f"raise max_steps (now {max_steps}) or max_basis (now {max_basis}), or loosen tol"
    )


def warm_eigsh(matvec: MatVec, previous: EigenResult, **kwargs) -> EigenResult:
    """``eigsh`` for the same k and end of the spectrum, warm-started from ``previous``'s vectors.

    For an operator that changes slowly (the Hessian along training, measured every few steps),
    the previous Ritz vectors span nearly the wanted eigenspace, and Lanczos from
    ``start_vector(previous.eigenvectors)`` converges in fewer products than from a random vector
    (tested). ``kwargs`` go to ``eigsh`` (tol, max_steps, seed, ...).
    """
    if previous.eigenvectors is None:
        raise ValueError("warm_eigsh needs the previous result's eigenvectors (eigenvectors=True)")
    vectors = previous.eigenvectors
    dim, k = vectors.shape
    return eigsh(
        matvec, dim, k, previous.which, v0=vectors, dtype=vectors.dtype, device=vectors.device, **kwargs
    )


def top_k(matvec: MatVec, dim: int, k: int = 1, **kwargs) -> EigenResult:
    """The k largest eigenpairs (``eigsh(..., which="largest")``)."""
    return eigsh(matvec, dim, k, which="largest", **kwargs)


def bottom_k(matvec: MatVec, dim: int, k: int = 1, **kwargs) -> EigenResult:
    """The k smallest eigenpairs (``eigsh(..., which="smallest")``)."""
    return eigsh(matvec, dim, k, which="smallest", **kwargs)


def operator_eigsh(operator, k: int = 1, which: str = "largest", **kwargs) -> EigenResult:
    """``eigsh`` on a ``CurvatureOperator`` (its dim, dtype and device)."""
    return eigsh(operator.matvec, operator.dim, k, which, dtype=operator.dtype, device=operator.device, **kwargs)
