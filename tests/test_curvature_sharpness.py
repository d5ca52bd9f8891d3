"""Sharpness engine: tracked top-k on drifting quadratics, stability thresholds, Adam's preconditioner."""

from __future__ import annotations

import math

import pytest
import torch

from overparam.curvature import (
    HessianOperator,
    PreconditionedOperator,
    adam_preconditioner,
    adam_threshold,
    dense_hessian,
    eigsh,
    eigvalsh,
    sgd_threshold,
    track_top_k,
)

try:
    from tests.test_curvature_cases import CASES, make_case
except ImportError:  # tests/ not a package
    from test_curvature_cases import CASES, make_case

CASE = {c["id"]: c for c in CASES}


def _drifting_quadratics(steps: int, N: int = 300, drift: float = 0.01, seed: int = 0) -> list[torch.Tensor]:
    """A_t = Q_t diag(lambda_t) Q_t^T: a bulk in [0, 1], five outliers 3..7, both drifting by ~1% a step."""
    generator = torch.Generator().manual_seed(seed)
    lam = torch.cat([torch.tensor([7.0, 6.0, 5.0, 4.0, 3.0]), torch.rand(N - 5, generator=generator, dtype=torch.float64)])
    Q = torch.linalg.qr(torch.randn(N, N, generator=generator, dtype=torch.float64)).Q
    out = []
    for _ in range(steps):
        out.append((Q * lam) @ Q.T)
        skew = torch.randn(N, N, generator=generator, dtype=torch.float64) * drift / N**0.5
        Q = torch.linalg.matrix_exp(skew - skew.T) @ Q  # a small rotation
        lam = lam * (1 + drift * torch.randn(N, generator=generator, dtype=torch.float64))
    return out


def test_tracked_eigenvalues_are_exact_and_warm_costs_fewer_products():
    previous, warm_products, cold_products = None, [], []
    for t, A in enumerate(_drifting_quadratics(8)):
        tracked = track_top_k(lambda v: A @ v, A.shape[0], 3, previous, tol=1e-10, dtype=torch.float64)
        exact = eigvalsh(A)[:3]
        torch.testing.assert_close(tracked.result.eigenvalues, exact, rtol=1e-9, atol=0, msg=f"measurement {t}")
        assert bool(tracked.result.converged.all()) and tracked.warm == (t > 0)
        if t > 0:
            assert 0.9 < tracked.overlap <= 1 + 1e-12, "a 1% drift keeps the top-3 subspace"
            warm_products.append(tracked.result.num_matvecs)
            cold = eigsh(lambda v: A @ v, A.shape[0], 3, tol=1e-10, dtype=torch.float64, seed=t)
            cold_products.append(cold.num_matvecs)
        else:
            assert math.isnan(tracked.overlap)
        previous = tracked.result
    assert sum(warm_products) < sum(cold_products), (warm_products, cold_products)


def test_tracking_restarts_cold_when_k_changes():
    A = _drifting_quadratics(1)[0]
    first = track_top_k(lambda v: A @ v, A.shape[0], 2, tol=1e-8, dtype=torch.float64)
    again = track_top_k(lambda v: A @ v, A.shape[0], 3, first.result, tol=1e-8, dtype=torch.float64)
    assert not again.warm and math.isnan(again.overlap)
    torch.testing.assert_close(again.result.eigenvalues, eigvalsh(A)[:3], rtol=1e-7, atol=0)


def _stable(optimizer_cls, lam: float, steps: int = 400, **kwargs) -> bool:
    """Whether the optimizer on f(x) = lam x^2 / 2 from x = 1 ends near 0 (not blown up)."""
    x = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = optimizer_cls([x], **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * x.square()).sum().backward()
        opt.step()
    return abs(float(x.detach())) < 1.0


@pytest.mark.parametrize(
    "kwargs", [dict(lr=0.1), dict(lr=0.1, momentum=0.9), dict(lr=0.1, momentum=0.5, dampening=0.3), dict(lr=0.1, momentum=0.9, nesterov=True)]
)
def test_sgd_threshold_is_the_edge_of_stability_of_torch_sgd(kwargs):
    threshold = sgd_threshold(**kwargs)
    assert _stable(torch.optim.SGD, 0.98 * threshold, **kwargs)
    assert not _stable(torch.optim.SGD, 1.02 * threshold, **kwargs)


def test_threshold_closed_forms():
    assert sgd_threshold(0.01) == pytest.approx(200.0)
    assert sgd_threshold(0.01, momentum=0.9) == pytest.approx(380.0)
    assert sgd_threshold(0.01, momentum=0.9, nesterov=True) == pytest.approx(3.8 / 2.8 / 0.01)
    assert adam_threshold(1e-3, beta1=0.9) == pytest.approx(38_000.0)


def test_adam_preconditioner_reproduces_torch_adams_update():
    # After t updates, Adam's next update is theta -= lr * exp_avg / P (P from the state after it).
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.Parameter(torch.randn(5, generator=generator, dtype=torch.float64))
    opt = torch.optim.Adam([x], lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    A = torch.diag(torch.linspace(0.1, 3.0, 5, dtype=torch.float64))
    for _ in range(4):
        before = x.detach().clone()
        opt.zero_grad()
        (0.5 * x @ A @ x).backward()
        opt.step()
        state = opt.state[x]
        P = adam_preconditioner(state["exp_avg_sq"], float(state["step"]), 0.8, 0.95, 1e-6)
        torch.testing.assert_close(x.detach(), before - 0.01 * state["exp_avg"] / P, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="at least one update"):
        adam_preconditioner(state["exp_avg_sq"], 0, 0.8, 0.95, 1e-6)


@pytest.mark.parametrize("case_id", ["mlp-mse", "cnn-ce"])
def test_preconditioned_sharpness_equals_eigvalsh_of_p_inverse_h(case_id):
    view, loss_fn, batches = make_case(CASE[case_id])
    H = HessianOperator.from_view(view, loss_fn, batches, hvp_mode="forward_over_reverse")
    generator = torch.Generator().manual_seed(1)
    P = torch.rand(H.dim, generator=generator, dtype=torch.float64) * 2 + 0.05  # a known positive diagonal
    op = PreconditionedOperator(H, P)
    got = eigsh(op.matvec, op.dim, 3, tol=1e-10, dtype=torch.float64).eigenvalues
    dense = dense_hessian(view.fn, view.params, loss_fn, batches, view.buffers)
    spectrum = torch.linalg.eigvals(dense / P[:, None]).real.sort(descending=True).values  # P^-1 H, not symmetric
    torch.testing.assert_close(got, spectrum[:3], rtol=1e-8, atol=1e-10)


def test_preconditioned_operator_rejects_a_bad_diagonal():
    view, loss_fn, batches = make_case(CASE["mlp-mse"])
    H = HessianOperator.from_view(view, loss_fn, batches)
    with pytest.raises(ValueError, match="must be positive"):
        PreconditionedOperator(H, torch.zeros(H.dim, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"must have shape \("):
        PreconditionedOperator(H, torch.ones(3, dtype=torch.float64))
