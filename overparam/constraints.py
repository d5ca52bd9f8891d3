"""Hinge constraints of a classifier and the SAT/jammed verdict of a training run (no Lightning).

With the margin ``m_mu`` of training point mu (``y f(x)`` for one output, ``f_y - max_{j != y}
f_j`` for C >= 2; ``overparam.losses.margins``) every point sets one constraint, satisfied when
``m_mu >= 1``. Its gap is

    Delta_mu = 1 - m_mu,        N_Delta = #{mu : Delta_mu > tol}.

With the squared hinge loss ``L = 1/P sum_mu 1/2 max(0, Delta_mu)^2`` only the N_Delta
unsatisfied constraints carry gradient. Below the jamming point N* gradient descent ends on a
minimum with L > 0 and N_Delta > 0 (UNSAT, jammed); above it, it reaches L = 0, N_Delta = 0
(SAT). At the transition N_Delta / N jumps to a finite value (Spigler, Geiger, d'Ascoli,
Sagun, Biroli, Wyart 2019, J. Phys. A 52 474001; Geiger et al. 2019, Phys. Rev. E 100 012115).

**The gap tolerance.** A margin computed in floating point is known only to about (terms
summed) x eps: a SAT run whose last constraints sit at Delta ~ 1e-16 in float64 (its loss at
1e-32) has reached SAT to machine precision, and its gradient has vanished with them, so it
can never move those constraints further. ``gap_tolerance`` is ``1024 eps`` of the dtype
(2.3e-13 in float64, 1.2e-4 in float32): above the round-off of margins of networks with up to
~1,000 units per layer, and far below the gaps of a jammed network (whose loss, an average of
Delta^2 / 2 over P points, is a finite number at a minimum).

**The verdict** (``JammingVerdict``): SAT when N_Delta = 0 (at the tolerance); jammed only when
a run has stopped improving over the whole second half of its steps: neither has its lowest
N_Delta fallen, nor has its lowest loss dropped by a factor ``1 - min_rel_decrease``, since
step t / 2 (and t is at least ``min_plateau_steps``), and its optimiser has finished its
endgame (a learning rate annealed on plateaus has reached its floor: at a constant lr Adam
circles a jammed minimum, 2% above it, and a stall there is not yet the minimum). A fixed number of checks without
improvement is meaningless for runs of 10^4-10^5 steps whose loss still falls like a power
law: with a window that grows with the run, a loss ~ t^-a is called a plateau only if
``2^-a > 1 - min_rel_decrease`` (a < 0.0014 at the default 1e-3), while a jammed run, which
converges exponentially to its minimum, is recognised after about twice the steps it needed
to get there. Anything else is ``running``: a run that ends running is undecided, not jammed.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Sequence

import torch
from torch import Tensor

from overparam.losses import margins

SAT, JAMMED, RUNNING = "sat", "jammed", "running"
#: multiple of the dtype's machine epsilon below which a gap counts as closed (module docstring).
GAP_TOL_EPS = 1024


def gap_tolerance(dtype: torch.dtype) -> float:
    """The default tolerance on Delta for ``dtype``: ``GAP_TOL_EPS * eps``."""
    return GAP_TOL_EPS * torch.finfo(dtype).eps


def gaps(outputs: Tensor, y: Tensor) -> Tensor:
    """``Delta = 1 - margin``, ``(K, B)`` from ``(K, B, C)`` outputs and ``(B,)`` labels."""
    return 1.0 - margins(outputs, y)


def constraint_sums(outputs: Tensor, y: Tensor, losses: Tensor, gap_tol: float = 0.0) -> Tensor:
    """Sums over one chunk of points for every member (reduce across chunks and ranks by adding).

    Args:
        outputs: ``(K, B, C)`` member outputs.
        y: ``(B,)`` labels (+-1 floats for C = 1, class indices otherwise).
        losses: ``(K, B)`` per-sample losses of the task (``loss_fn(outputs, y, reduction="none")``).
        gap_tol: a constraint is unsatisfied when ``Delta > gap_tol``.

    Returns:
        ``(K, 4)`` float64 rows ``[N_Delta, errors, loss sum, points]``.
    """
    m = margins(outputs, y)  # (K, B)
    # Delta > gap_tol is margin < 1 - gap_tol; errors are margin <= 0 (ties count, as in losses.errors).
    counts = torch.stack((m < 1.0 - gap_tol, m <= 0)).sum(-1).T  # (K, 2)
    points = torch.full_like(losses[:, :1], m.shape[1])
    return torch.cat((counts.to(losses.dtype), losses.sum(-1, keepdim=True), points), -1).to(torch.float64)


def delta_histograms(delta: Tensor, edges: Tensor, gap_tol: float = 0.0) -> Tensor:
    """``(K, 2, E)`` counts of |Delta| per member, unsatisfied (Delta > gap_tol) then satisfied.

    Bins are ``[edges[i], edges[i+1])`` (NumPy's convention); ``torch.bucketize`` with the inner
    edges puts values below ``edges[0]`` into bin 0 and above ``edges[-1]`` into the last bin,
    so every constraint is counted exactly once.
    """
    num_bins = edges.numel() - 1
    bins = torch.bucketize(delta.abs().to(torch.float64), edges[1:-1].to(delta.device), right=True)  # (K, B)
    hist = torch.zeros(delta.shape[0], 2, num_bins, dtype=torch.float64, device=delta.device)
    for row, mask in enumerate((delta > gap_tol, delta <= gap_tol)):
        hist[:, row].scatter_add_(1, bins, mask.to(torch.float64))
    return hist


def constant_unsatisfied(outputs: Tensor, delta: Tensor, gap_tol: float = 0.0) -> Tensor:
    """Per member, the largest group of unsatisfied points on which the network gives one output.

    A ReLU network is exactly constant on the inputs where every path from the input is off (a
    dead region): there its output is the last layer's bias, no gradient reaches the weights,
    and the best it can do is the constant that fits the group's labels on average. A run
    jammed with such a group (two or more points with bitwise equal outputs; other ties have
    probability zero) is stuck by dead units, not by too few parameters: the jamming of the
    papers is a network that uses all of its parameters.

    Args:
        outputs: ``(K, P, C)`` outputs of every member on the whole training set.
        delta: ``(K, P)`` gaps (``gaps(outputs, y)``).
        gap_tol: a constraint is unsatisfied when ``Delta > gap_tol``.

    Returns:
        ``(K,)`` int64: the size of the largest such group (0 when no two unsatisfied points tie).
    """
    sizes = []
    for out, d in zip(outputs, delta):
        unsat = out[d > gap_tol]
        largest = int(torch.unique(unsat, dim=0, return_counts=True)[1].max()) if unsat.shape[0] > 1 else 0
        sizes.append(largest if largest > 1 else 0)
    return torch.tensor(sizes, dtype=torch.int64)


class JammingVerdict:
    """SAT, jammed or running, per member, from counts taken as training goes (module docstring).

    ``update(step, N_delta, loss)`` takes one count per member at optimizer step ``step``
    (non-decreasing across calls). It keeps the lowest N_Delta and loss so far and, at steps
    spaced by factors of 2^(1/4), milestones of them; the plateau test compares the present
    with the last milestone at or before ``step / 2``, so the state stays O(log steps). A
    member that reached SAT stays SAT, with ``last`` the counts of its first SAT step (the
    other members of an ensemble may train on, and Adam's momentum moves it a little).

    Args:
        num_members: K.
        min_rel_decrease: the lowest loss must drop below ``(1 - this)`` times its value at
            step / 2 for the run to count as improving. Default 1e-3.
        min_plateau_steps: no jammed verdict before this step. Default 1000.

    Example::

        >>> v = JammingVerdict(1, min_plateau_steps=10)
        >>> for t in range(0, 41):
        ...     _ = v.update(t, [3.0], [0.25])          # a plateau with 3 unsatisfied constraints
        >>> v.status
        ['jammed']
    """

    def __init__(self, num_members: int, min_rel_decrease: float = 1e-3, min_plateau_steps: int = 1000) -> None:
        self.min_rel_decrease = min_rel_decrease
        self.min_plateau_steps = min_plateau_steps
        self.status = [RUNNING] * num_members
        self.best_loss = [math.inf] * num_members
        self.best_N_delta = [math.inf] * num_members
        self.last = [{"step": -1, "N_delta": math.nan, "loss": math.nan} for _ in range(num_members)]
        # Per member: (step, best N_Delta, best loss) at geometrically spaced steps.
        self.milestones: list[list[tuple[int, float, float]]] = [[] for _ in range(num_members)]

    def _next_milestone(self, k: int) -> float:
        marks = self.milestones[k]
        return 0.0 if not marks else max(marks[-1][0] * 2**0.25, marks[-1][0] + 1)

    def update(self, step: int, N_delta: Sequence[float], loss: Sequence[float], annealing: bool = False) -> list[str]:
        """Add the counts of ``step``; returns the per-member status.

        ``annealing``: the optimiser's endgame is still under way (a learning rate above the
        floor of its annealing schedule): no member is called jammed yet, whatever its loss does.
        """
        for k, (n, value) in enumerate(zip(N_delta, loss)):
            if self.status[k] == SAT:
                continue  # SAT is for good: a zero-loss solution was found (an ensemble trains on)
            self.best_N_delta[k] = min(self.best_N_delta[k], n)
            self.best_loss[k] = min(self.best_loss[k], value)
            self.last[k] = {"step": int(step), "N_delta": float(n), "loss": float(value)}
            if step >= self._next_milestone(k):
                self.milestones[k].append((int(step), self.best_N_delta[k], self.best_loss[k]))
            jammed = not annealing and self._plateau(k, step)
            self.status[k] = SAT if n == 0 else (JAMMED if jammed else RUNNING)
        return list(self.status)

    def _plateau(self, k: int, step: int) -> bool:
        if step < self.min_plateau_steps:
            return False
        marks = self.milestones[k]
        i = bisect.bisect_right([m[0] for m in marks], step / 2) - 1
        if i < 0:
            return False
        _, n_then, loss_then = marks[i]
        fell = self.best_N_delta[k] < n_then or self.best_loss[k] < (1 - self.min_rel_decrease) * loss_then
        return not fell

    def done(self) -> bool:
        """Every member SAT or jammed."""
        return all(s in (SAT, JAMMED) for s in self.status)

    def state_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "best_loss": self.best_loss,
            "best_N_delta": self.best_N_delta,
            "last": self.last,
            "milestones": [[list(m) for m in marks] for marks in self.milestones],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.status = list(state["status"])
        self.best_loss = list(state["best_loss"])
        self.best_N_delta = list(state["best_N_delta"])
        self.last = [dict(row) for row in state["last"]]
        self.milestones = [[tuple(m) for m in marks] for marks in state["milestones"]]

