"""Curvature engine against dense oracles: operators, Lanczos, SLQ, trace, subspaces."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from overparam.curvature import (
    ConvergenceWarning,
    GGNOperator,
    HessianOperator,
    ResidualOperator,
    bottom_k,
    dense_ggn,
    dense_hessian,
    density,
    density_band,
    eigsh,
    eigvalsh,
    histogram,
    hutchinson,
    lanczos,
    moment_stderr,
    moments,
    operator_eigsh,
    slq,
    subspace_fraction,
    subspace_overlap,
    top_k,
    warm_eigsh,
)
from overparam.curvature import hvp as hvp_module
from overparam.curvature.slq import rademacher
from overparam.functional import FunctionalView

try:
    from tests.test_curvature_cases import (
        CASES, IDS, check_estimator_convergence, compare_consecutive_matmats, compare_matmat, make_case, make_trained_case,
    )
except ImportError:  # tests/ not a package
    from test_curvature_cases import (
        CASES, IDS, check_estimator_convergence, compare_consecutive_matmats, compare_matmat, make_case, make_trained_case,
    )

CASE = {c["id"]: c for c in CASES}


def _dense(case, **kw):
    view, loss_fn, batches = make_case(case, **kw)
    return view, loss_fn, batches, dense_hessian(view.fn, view.params, loss_fn, batches, view.buffers)


# --- operators ---------------------------------------------------------------------------------
# Every case by forward-over-reverse; double backward on three (one per model and loss family).
MODE_CASES = [(c, "forward_over_reverse") for c in CASES] + [
    (CASE[i], "double_backward") for i in ("mlp-ce", "cnn-sqhinge", "relu-hinge")
]


@pytest.mark.parametrize("case, mode", MODE_CASES, ids=[f"{c['id']}-{m}" for c, m in MODE_CASES])
def test_hessian_operator_matches_dense_hessian(case, mode):
    view, loss_fn, batches, H = _dense(case)
    op = HessianOperator.from_view(view, loss_fn, batches, hvp_mode=mode)
    assert op.num_points == 40 and op.dim == H.shape[0]
    compare_matmat(op.matmat, H)
    compare_consecutive_matmats(op.matmat, op.dim, op.dtype)


GGN_CASES = [(c, False) for c in CASES] + [(CASE["cnn-ce"], True)]


@pytest.mark.parametrize("case, reverse", GGN_CASES, ids=[f"{c['id']}-{'reverse' if r else 'jvp'}" for c, r in GGN_CASES])
def test_ggn_operator_matches_dense_ggn(case, reverse):
    view, loss_fn, batches = make_case(case)
    G = dense_ggn(view.fn, view.params, loss_fn, batches)
    compare_matmat(GGNOperator.from_view(view, loss_fn, batches, reverse=reverse).matmat, G)
    assert float(eigvalsh(G)[-1]) >= -1e-10 * float(eigvalsh(G)[0]), "GGN of a convex loss is PSD"


@pytest.mark.parametrize("case", CASES[:5], ids=IDS[:5])
def test_hessian_is_ggn_plus_residual(case):
    view, loss_fn, batches, H = _dense(case)
    G = GGNOperator.from_view(view, loss_fn, batches)
    R = ResidualOperator.from_view(view, loss_fn, batches, hvp_mode="forward_over_reverse")
    compare_matmat(lambda V: G.matmat(V) + R.matmat(V), H)


def test_residual_vanishes_for_a_linear_model():
    view, loss_fn, batches = make_case({"model": "linear", "loss": "cross_entropy", "C": 3})
    R = ResidualOperator.from_view(view, loss_fn, batches)
    V = torch.randn(R.dim, 2, dtype=torch.float64)
    assert R.matmat(V).abs().max() < 1e-14


def test_hvp_matches_finite_differences_of_the_gradient():
    view, loss_fn, batches = make_case(CASE["mlp-ce"])
    op = HessianOperator.from_view(view, loss_fn, batches, hvp_mode="forward_over_reverse")
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eps = 1e-5
    theta = op.flatten(view.params)

    def grad_at(t):
        shifted = FunctionalView(view.fn, op.unflatten(t), view.buffers)
        return HessianOperator.from_view(shifted, loss_fn, batches, hvp_mode="double_backward").loss_and_gradient()[1]

    fd = (grad_at(theta + eps * v) - grad_at(theta - eps * v)) / (2 * eps)
    torch.testing.assert_close(op.matvec(v), fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("case", [CASE["mlp-sqhinge"], CASE["cnn-ce"]], ids=["mlp-sqhinge", "cnn-ce"])
def test_hessian_is_symmetric(case):
    view, loss_fn, batches = make_case(case)
    op = HessianOperator.from_view(view, loss_fn, batches, hvp_mode="forward_over_reverse")
    g = torch.Generator().manual_seed(2)
    u, v = (torch.randn(op.dim, dtype=torch.float64, generator=g) for _ in range(2))
    uHv, vHu = torch.dot(u, op.matvec(v)), torch.dot(v, op.matvec(u))
    assert abs(float(uHv - vHu)) <= 1e-12 * abs(float(uHv))


def test_loss_and_gradient_match_autograd():
    view, loss_fn, batches = make_case(CASE["cnn-ce"])
    op = HessianOperator.from_view(view, loss_fn, batches, hvp_mode="forward_over_reverse")
    leaves = {n: p.clone().requires_grad_(True) for n, p in view.params.items()}
    total = sum(loss_fn(view.fn(leaves, view.buffers, x), y, reduction="sum") for x, y in batches) / 40
    grads = torch.autograd.grad(total, list(leaves.values()))
    loss, g = op.loss_and_gradient()
    assert loss == pytest.approx(float(total.detach()), rel=1e-12)
    torch.testing.assert_close(g, torch.cat([t.reshape(-1) for t in grads]))


def test_checks_reject_wrong_shapes_and_ensembles():
    view, loss_fn, batches = make_case(CASE["mlp-ce"])
    op = HessianOperator.from_view(view, loss_fn, batches, hvp_mode="double_backward")
    with pytest.raises(ValueError, match=r"must have shape \(%d,\)" % op.dim):
        op.matvec(torch.zeros(op.dim + 1, dtype=torch.float64))
    stacked = FunctionalView(view.fn, view.params, ensemble_size=2)
    with pytest.raises(ValueError, match="K = 1 view"):
        HessianOperator.from_view(stacked, loss_fn, batches)


# --- HVP paths -----------------------------------------------------------------------------------
class _NoForwardAD(torch.autograd.Function):
    """tanh with a backward but no jvp: forward-over-reverse cannot go through it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_auto_mode_falls_back_to_double_backward_without_forward_ad():
    view, loss_fn, batches = make_case(CASE["mlp-ce"])
    fn = lambda p, b, x: view.fn(p, b, _NoForwardAD.apply(x))
    op = HessianOperator(fn, view.params, loss_fn, batches, hvp_mode="auto")
    assert op.hvp_mode == "auto" and op.hvp_timings == {}, "nothing is computed before the first product"
    H = HessianOperator(fn, view.params, loss_fn, batches, hvp_mode="double_backward").to_dense()
    compare_matmat(op.matmat, H)  # 3 products: the choice is made while computing them, correctly
    assert op.hvp_mode == "double_backward"
    assert op.hvp_timings["forward_over_reverse"] == float("inf")
    assert set(op.hvp_timings) == {"forward_over_reverse", "double_backward"}
    assert "functorch transforms" in str(op._chooser.failures["forward_over_reverse"])


def _counting(loss_fn):
    """``(loss, calls)``: ``loss_fn`` that appends to ``calls`` at each evaluation."""
    calls = []

    def loss(out, y, reduction):
        calls.append(1)
        return loss_fn(out, y, reduction=reduction)

    return loss, calls


def test_auto_mode_chooses_without_extra_products():
    view, loss_fn, batches, H = _dense(CASE["cnn-ce"])
    counting_loss, calls = _counting(loss_fn)
    op = HessianOperator.from_view(view, counting_loss, batches, hvp_mode="auto")
    compare_matmat(op.matmat, H, num_vectors=3)  # double backward (builds its graphs), both timed
    assert op.hvp_mode in ("forward_over_reverse", "double_backward")
    assert 0 < op.hvp_timings["forward_over_reverse"] < math.inf and 0 < op.hvp_timings["double_backward"] < math.inf
    assert len(calls) <= 3 * len(batches), "at most one loss evaluation per batch and product: the choice costs nothing extra"


def test_double_backward_keeps_each_batch_graph_within_its_budget():
    view, loss_fn, batches, H = _dense(CASE["mlp-sqhinge"])
    counting_loss, calls = _counting(loss_fn)
    cached = HessianOperator.from_view(view, counting_loss, batches, hvp_mode="double_backward")
    compare_matmat(cached.matmat, H, num_vectors=4)
    assert len(calls) == len(batches), "the forward and first backward run once per batch"
    assert 0 < cached._hvp.cached_bytes <= cached._hvp.cache_bytes
    calls.clear()
    recomputed = HessianOperator.from_view(view, counting_loss, batches, hvp_mode="double_backward", cache_bytes=0)
    compare_matmat(recomputed.matmat, H, num_vectors=4)
    assert len(calls) == 4 * len(batches) and recomputed._hvp.cached_bytes == 0


def test_a_data_error_passes_through_the_hvp_with_its_own_message():
    view, loss_fn, batches = make_case(CASE["mlp-ce"])
    (x, y), rest = batches[0], batches[1:]
    broken = [(x, y.clone().fill_(7))] + rest  # labels out of range for C = 3
    for mode in ("auto", "forward_over_reverse", "double_backward"):
        op = HessianOperator.from_view(view, loss_fn, broken, hvp_mode=mode)  # builds, computes nothing
        with pytest.raises(IndexError, match="Target 7 is out of bounds"):
            operator_eigsh(op, k=2)


def test_compiled_mode_falls_back_to_eager_when_compile_fails(monkeypatch):
    def broken_compile(f, **kwargs):
        def fail(*args):
            raise torch._dynamo.exc.TorchDynamoException("Dynamo says no")

        return fail

    monkeypatch.setattr(hvp_module.torch, "compile", broken_compile)
    view, loss_fn, batches, H = _dense(CASE["mlp-ce"])
    op = HessianOperator.from_view(view, loss_fn, batches, hvp_mode="compiled")
    with pytest.warns(UserWarning, match="torch.compile of the HVP failed .*Dynamo says no"):
        compare_matmat(op.matmat, H)


def test_only_dynamo_errors_make_compiled_fall_back(monkeypatch):
    def compile_with_a_bug(f, **kwargs):
        def fail(*args):
            raise ValueError("a bug in the model, not in Dynamo")

        return fail

    monkeypatch.setattr(hvp_module.torch, "compile", compile_with_a_bug)
    view, loss_fn, batches = make_case(CASE["mlp-ce"])
    op = HessianOperator.from_view(view, loss_fn, batches, hvp_mode="compiled")
    with pytest.raises(ValueError, match="a bug in the model"):
        op.matvec(torch.ones(op.dim, dtype=torch.float64))


# --- Lanczos ---------------------------------------------------------------------------------------
def test_lanczos_on_a_diagonal_operator():
    d = torch.cat([torch.tensor([9.0, 7.0, 5.0, -4.0]), torch.linspace(-1, 1, 196)]).double()
    result = top_k(lambda v: d * v, d.numel(), k=3, dtype=torch.float64, tol=1e-10)
    torch.testing.assert_close(result.eigenvalues, torch.tensor([9.0, 7.0, 5.0], dtype=torch.float64), rtol=1e-12, atol=0)
    assert (result.residuals < 1e-8).all()
    # Ritz vectors are the unit vectors (up to sign).
    torch.testing.assert_close(result.eigenvectors[:3].abs(), torch.eye(3, dtype=torch.float64), atol=1e-7, rtol=0)
    low = bottom_k(lambda v: d * v, d.numel(), k=1, dtype=torch.float64, tol=1e-10)
    assert float(low.eigenvalues[0]) == pytest.approx(-4.0, rel=1e-12)


def test_lanczos_survives_an_invariant_subspace_and_spans_everything_at_m_equals_n():
    d = torch.tensor([3.0, 3.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # low rank, repeated
    run = lanczos(lambda v: d * v, torch.ones(6, dtype=torch.float64), num_steps=6)
    Q = run.basis
    torch.testing.assert_close(Q.T @ Q, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)
    theta, _, _ = run.ritz()
    torch.testing.assert_close(theta, d.sort().values, atol=1e-12, rtol=0)


def _diagonal(d: Tensor):
    return lambda v: d.to(v.dtype) * v


def test_lanczos_resolves_a_tight_cluster_through_thick_restarts():
    # Top: 5 eigenvalues within 4e-4 of each other above a bulk; bottom: the same, mirrored.
    cluster = 1.0 - 1e-4 * torch.arange(5, dtype=torch.float64)
    bulk = torch.linspace(-0.9, 0.9, 391, dtype=torch.float64)
    d = torch.cat([cluster, bulk, -cluster, torch.tensor([0.95], dtype=torch.float64)])
    for which, want in (("largest", d.sort(descending=True).values[:6]), ("smallest", d.sort().values[:6])):
        result = eigsh(_diagonal(d), d.numel(), k=6, which=which, tol=1e-10, dtype=torch.float64, max_basis=30)
        assert result.num_restarts > 0, "the small basis must have been restarted"
        assert bool(result.converged.all()), result.relative_residuals
        torch.testing.assert_close(result.eigenvalues, want, rtol=0, atol=1e-9)
        # The reported residuals are the true ones after restarts: |A y - theta y|.
        Y = result.eigenvectors
        true = (d[:, None] * Y - Y * result.eigenvalues).norm(dim=0)
        assert float((true - result.residuals).abs().max()) < 1e-9
        torch.testing.assert_close(Y.T @ Y, torch.eye(6, dtype=torch.float64), atol=1e-9, rtol=0)


def test_lanczos_flags_and_warns_when_the_budget_runs_out():
    d = torch.linspace(0, 1, 500, dtype=torch.float64)
    with pytest.warns(ConvergenceWarning, match=r"did not converge in 12 products.*raise max_steps \(now 12\) or max_basis"):
        result = eigsh(_diagonal(d), 500, k=3, which="smallest", max_steps=12, dtype=torch.float64)
    assert result.num_matvecs == 12 and not bool(result.converged.any())
    assert bool((result.relative_residuals > 1e-6).all())


def test_bottom_k_of_a_trained_net_is_right_or_flagged_at_defaults():
    """Issue 13: the bottom-10 of a trained net (clustered bulk edge) came back 1e-2 |lambda_1| off
    after the old 40 steps, with no warning. At the defaults they must be right to 1e-4 |lambda_1|
    or flagged; here all converge."""
    view, loss_fn, batches = make_trained_case()
    exact = eigvalsh(dense_hessian(view.fn, view.params, loss_fn, batches)).flip(0)  # ascending
    lam1 = float(exact.abs().max())
    view32 = FunctionalView(view.fn, {n: p.float() for n, p in view.params.items()}, {})
    op = HessianOperator.from_view(view32, loss_fn, [(x.float(), y) for x, y in batches], hvp_mode="double_backward")
    result = operator_eigsh(op, k=10, which="smallest")
    error = (result.eigenvalues - exact[:10]).abs() / lam1
    assert bool(((error <= 1e-4) | ~result.converged).all()), f"unflagged error: {error.tolist()}"
    assert bool(result.converged.all()) and float(error.max()) <= 1e-6, (error.tolist(), result.converged.tolist())
    # The old default budget: the same eigenvalues are now flagged instead of silently wrong.
    with pytest.warns(ConvergenceWarning):
        short = operator_eigsh(op, k=10, which="smallest", max_steps=40)
    error = (short.eigenvalues - exact[:10]).abs() / lam1
    assert float(error.max()) > 1e-4 and bool(((error <= 1e-4) | ~short.converged).all())


def test_warm_start_needs_fewer_products_on_a_slowly_changing_operator():
    N = 400
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64)).Q
    d = torch.cat([torch.tensor([10.0, 8.0, 7.0, 6.5, 6.0]), torch.rand(N - 5, generator=g) * 5]).double()
    E = torch.randn(N, N, generator=g, dtype=torch.float64)
    E = (E + E.T) / (2 * N**0.5)  # ||E|| ~ 1

    def operator(t: float) -> Tensor:
        return Q @ torch.diag(d) @ Q.T + t * E

    previous = top_k(lambda v: operator(0.0) @ v, N, k=5, dtype=torch.float64)
    cold, warm = [], []
    for step in range(1, 6):  # five "training steps", the operator drifting by 1% of ||E|| each
        A = operator(0.01 * step)
        exact = torch.linalg.eigvalsh(A).flip(0)[:5]
        fresh = top_k(lambda v: A @ v, N, k=5, dtype=torch.float64, seed=step)
        previous = warm_eigsh(lambda v: A @ v, previous, seed=step)
        for result in (fresh, previous):
            assert bool(result.converged.all())
            torch.testing.assert_close(result.eigenvalues, exact, rtol=1e-9, atol=0)
        cold.append(fresh.num_matvecs)
        warm.append(previous.num_matvecs)
    assert sum(warm) < 0.85 * sum(cold), f"warm {warm} vs cold {cold}"
    # An eigenvalue that jumps into the top-5 from the bulk is still found from the warm start.
    u = Q[:, 100]  # a bulk eigenvector
    A = operator(0.05) + 9.0 * torch.outer(u, u)
    jumped = warm_eigsh(lambda v: A @ v, previous, seed=9)
    assert bool(jumped.converged.all())
    torch.testing.assert_close(jumped.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:5], rtol=1e-9, atol=0)


@pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
def test_top_k_matches_eigvalsh_float64(case):
    view, loss_fn, batches, H = _dense(case)
    exact = eigvalsh(H)
    op = HessianOperator.from_view(view, loss_fn, batches, hvp_mode="double_backward")
    result = operator_eigsh(op, k=5, tol=1e-9)
    rel = ((result.eigenvalues - exact[:5]).abs() / exact[:5].abs()).max()
    assert rel <= 1e-6, f"top-5 {result.eigenvalues.tolist()} vs {exact[:5].tolist()}"
    low = operator_eigsh(op, k=2, which="smallest", tol=1e-9, max_steps=op.dim)
    rel_low = ((low.eigenvalues - exact.flip(0)[:2]).abs() / exact.abs().max()).max()
    assert rel_low <= 1e-6
    # The Ritz vectors are eigenvectors: |H y - theta y| matches the reported residual.
    y = result.eigenvectors[:, 0]
    assert float((H @ y - result.eigenvalues[0] * y).norm()) <= 1e-6 * float(exact[0])


BIG = [{"id": f"{m}-{l}", "model": m, "loss": l, "C": 3} for m in ("mlp_big", "cnn_big") for l in ("cross_entropy", "squared_hinge")]


@pytest.mark.slow
@pytest.mark.parametrize("case", BIG, ids=[c["id"] for c in BIG])
def test_top_k_matches_eigvalsh_at_a_few_thousand_parameters(case):
    view, loss_fn, batches, H = _dense(case, P=60, chunks=(25, 35))
    assert 1500 <= H.shape[0] <= 3000
    exact = eigvalsh(H)
    op = HessianOperator.from_view(view, loss_fn, batches, hvp_mode="forward_over_reverse")
    result = operator_eigsh(op, k=5, tol=1e-9, max_steps=200)
    assert ((result.eigenvalues - exact[:5]).abs() / exact[:5].abs()).max() <= 1e-6
    view32, _, batches32 = make_case(case, dtype=torch.float32, P=60, chunks=(25, 35))
    op32 = HessianOperator.from_view(view32, loss_fn, batches32, hvp_mode="double_backward")
    result32 = operator_eigsh(op32, k=5, tol=1e-6, max_steps=200)
    assert ((result32.eigenvalues - exact[:5]).abs() / exact[:5].abs()).max() <= 1e-4


@pytest.mark.parametrize("case", [CASE["mlp-ce"], CASE["cnn-sqhinge"]], ids=["mlp-ce", "cnn-sqhinge"])
def test_top_k_matches_eigvalsh_float32(case):
    view64, loss_fn, batches64, H = _dense(case)
    view, _, batches = make_case(case, dtype=torch.float32)
    op = HessianOperator.from_view(view, loss_fn, batches, hvp_mode="double_backward")
    assert op.dtype == torch.float32
    result = operator_eigsh(op, k=5, tol=1e-6)
    exact = eigvalsh(H)[:5]
    assert ((result.eigenvalues - exact).abs() / exact.abs()).max() <= 1e-4


def test_ggn_top_eigenvalues_match_dense():
    view, loss_fn, batches = make_case(CASE["mlp-ce"])
    G = dense_ggn(view.fn, view.params, loss_fn, batches)
    result = operator_eigsh(GGNOperator.from_view(view, loss_fn, batches), k=3, tol=1e-9)
    exact = eigvalsh(G)[:3]
    assert ((result.eigenvalues - exact).abs() / exact).max() <= 1e-6


# --- SLQ, density, trace ------------------------------------------------------------------------------
def test_slq_quadrature_is_exact_for_low_moments_of_each_probe():
    view, loss_fn, batches, H = _dense(CASE["mlp-ce"])
    op = HessianOperator.from_view(view, loss_fn, batches, hvp_mode="double_backward")
    m = 6
    result = slq(op.matvec, op.dim, num_probes=2, num_steps=m, seed=11, dtype=torch.float64)
    for i in range(2):
        v = rademacher(op.dim, 11 + i, torch.float64, "cpu")
        for j in range(0, 2 * m):  # Gauss quadrature is exact up to degree 2m - 1
            want = v @ torch.linalg.matrix_power(H, j) @ v
            got = (result.weights[i] * result.nodes[i].pow(j)).sum()
            assert float(got) == pytest.approx(float(want), rel=1e-8, abs=1e-14), f"probe {i}, moment {j}"


def test_slq_moments_converge_to_normalised_traces():
    view, loss_fn, batches, H = _dense(CASE["mlp-sqhinge"])
    N = H.shape[0]
    target = torch.stack([torch.trace(torch.linalg.matrix_power(H, j)) / N for j in (1, 2, 3)])
    evals = torch.linalg.eigvalsh(H)
    matvec = lambda v: H @ v  # the dense oracle: this test is about the estimator, not the HVP

    def sample(i):
        r = slq(matvec, N, num_probes=1, num_steps=20, seed=100 + i, dtype=torch.float64)
        return moments(r.nodes, r.weights, [1, 2, 3])

    check_estimator_convergence(sample, target, target_rel_error=0.05, max_samples=200)
    assert float(evals.abs().max()) > 0


@pytest.mark.parametrize("outliers, lowest", [(0, 0.87), (10, 0.84)], ids=["bulk", "10-outliers"])
def test_slq_moment_standard_errors_cover_the_exact_moments(outliers, lowest):
    """|moment - exact| < 2 SE at the rate slq.py states: 92-93% for a bulk, 89-90% with 10
    outliers (10 probes; 100 seeded runs here, binomial SD 3%)."""
    g = torch.Generator().manual_seed(0)
    d = torch.cat([torch.linspace(5, 20, outliers), torch.randn(300 - outliers, generator=g).mul(0.5).add(0.3)]).double()
    Q = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64)).Q  # a diagonal A has no variance
    A = Q @ torch.diag(d) @ Q.T
    exact = torch.stack([d.pow(j).mean() for j in (1, 2, 3, 4)])
    covered = torch.zeros(4, dtype=torch.float64)
    runs = 100
    for seed in range(runs):
        r = slq(lambda v: A @ v, 300, num_probes=10, num_steps=4, seed=1000 * seed, dtype=torch.float64)
        mean, se = moments(r.nodes, r.weights, [1, 2, 3, 4]), moment_stderr(r.nodes, r.weights, [1, 2, 3, 4])
        covered += ((mean - exact).abs() < 2 * se).double()
    rate = covered / runs
    assert bool(((rate >= lowest) & (rate <= 0.99)).all()), rate.tolist()


def test_density_band_is_the_probe_to_probe_standard_error():
    nodes = torch.tensor([[0.0, 1.0], [0.2, 1.0], [0.1, 1.2]], dtype=torch.float64)
    weights = torch.tensor([[0.5, 0.5], [0.4, 0.6], [0.7, 0.3]], dtype=torch.float64)
    grid, phi, se = density_band(nodes, weights, sigma=0.1)
    torch.testing.assert_close(phi, density(nodes, weights, grid=grid, sigma=0.1)[1])
    per_probe = torch.stack([density(nodes[i : i + 1], weights[i : i + 1], grid=grid, sigma=0.1)[1] for i in range(3)])
    torch.testing.assert_close(se, per_probe.std(0) / 3**0.5)
    assert torch.isnan(density_band(nodes[:1], weights[:1])[2]).all(), "one probe cannot state its uncertainty"
    assert torch.isnan(moment_stderr(nodes[:1], weights[:1], [1, 2])).all()


def test_density_integrates_to_one_and_histogram_counts_n():
    nodes = torch.tensor([[0.0, 0.1, 5.0], [0.05, 0.2, 4.0]], dtype=torch.float64)
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]], dtype=torch.float64)
    grid, phi = density(nodes, weights, num_points=4001)
    assert float(torch.trapezoid(phi, grid)) == pytest.approx(1.0, abs=1e-6)
    edges, counts = histogram(nodes, weights, dim=1000, bins=10)
    assert float(counts.sum()) == pytest.approx(1000.0)
    assert float(counts[-1]) == pytest.approx(1000 * (0.2 + 0.0) / 2)  # only 5.0 in the last bin


def test_hutchinson_converges_to_the_trace():
    view, loss_fn, batches, H = _dense(CASE["cnn-ce"])
    target = torch.trace(H).reshape(1)

    def sample(i):
        return torch.tensor([hutchinson(lambda v: H @ v, H.shape[0], num_probes=1, seed=i, dtype=torch.float64).trace])

    check_estimator_convergence(sample, target, target_rel_error=0.05, max_samples=400)
    estimate = hutchinson(lambda v: H @ v, H.shape[0], num_probes=8, dtype=torch.float64)
    assert estimate.samples.numel() == 8 and estimate.stderr > 0


# --- gradient in the top subspace (issue 10) ------------------------------------------------------------
def _quadratic(rotation_angle: float = 0.0):
    """Linear least squares with H = R^T diag(d) R known in closed form (N = 6, P = 6)."""
    d = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    R = torch.eye(6, dtype=torch.float64)
    c, s = math.cos(rotation_angle), math.sin(rotation_angle)
    R[0, 0], R[0, 3], R[3, 0], R[3, 3] = c, -s, s, c
    X = 6**0.5 * torch.diag(d.sqrt()) @ R  # X^T X / P = R^T diag(d) R
    y = torch.arange(1.0, 7.0, dtype=torch.float64).unsqueeze(1)
    fn = lambda p, b, x: x @ p["w"]
    from overparam.losses import mse

    w = torch.full((6, 1), 0.3, dtype=torch.float64)
    return HessianOperator(fn, {"w": w}, mse, [(X, y)], hvp_mode="double_backward"), d, R, X, y, w


def test_gradient_fraction_in_top_subspace_equals_the_analytic_value():
    op, d, R, X, y, w = _quadratic()
    _, g = op.loss_and_gradient()
    g_exact = (X.T @ (X @ w - y) / 6).reshape(-1)
    torch.testing.assert_close(g, g_exact)
    result = operator_eigsh(op, k=2, tol=1e-12)
    expected = float(g_exact[:2].square().sum() / g_exact.square().sum())  # H = diag(d): top-2 = e1, e2
    assert subspace_fraction(g, result.eigenvectors) == pytest.approx(expected, rel=1e-10)
    full = operator_eigsh(op, k=6, tol=1e-14)
    assert subspace_fraction(g, full.eigenvectors) == pytest.approx(1.0, rel=1e-12)  # k = N: exact


def test_subspace_overlap_equals_the_analytic_value():
    angle = 0.4
    op0, *_ = _quadratic(0.0)
    op1, *_ = _quadratic(angle)
    U = operator_eigsh(op0, k=1, tol=1e-12).eigenvectors
    V = operator_eigsh(op1, k=1, tol=1e-12).eigenvectors
    # Top eigenvector turns from e1 to R^T e1 = (cos, 0, 0, -sin, ...): overlap cos^2.
    assert subspace_overlap(U, V) == pytest.approx(math.cos(angle) ** 2, rel=1e-10)
    assert subspace_overlap(U, U) == pytest.approx(1.0)
