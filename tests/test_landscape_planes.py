"""Engine tests of ``overparam.planes``: 2D surfaces against closed forms, the 1D path engine,
``torch.optim.swa_utils.update_bn``, a trajectory in a known plane, and DDP = one process."""

from __future__ import annotations

import copy
import doctest

import numpy as np
import pytest
import torch
from torch import nn

from overparam import planes
from overparam.curvature import HessianOperator, eigvalsh
from overparam.errors import ConfigError
from overparam.functional import flatten, module_fn, unflatten
from overparam.landscape import evaluate_path, line, random_direction
from overparam.losses import cross_entropy, mse
from overparam.planes import Plane, evaluate_plane, hessian_plane, pca_plane, points_plane, random_plane
from tests.test_landscape import bn_net, train_a_little, two_ranks_and_one_process


def test_docstring_example():
    assert doctest.testmod(planes).failed == 0


def regression_case(seed=0, outputs=2):
    """Linear regression (convex quadratic): the surface on any plane is a quadratic in (a, b)."""
    torch.manual_seed(seed)
    X, Y = torch.randn(60, 4, dtype=torch.float64), torch.randn(60, outputs, dtype=torch.float64)
    model = nn.Linear(4, outputs).double()
    params = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    return model, params, list(zip(X.split(25), Y.split(25))), X, Y


def residuals(params, X, Y):
    return X @ params["weight"].T + params["bias"] - Y  # (P, 2)


def test_quadratic_surface_equals_the_closed_form():
    model, params, batches, X, Y = regression_case()
    d1, d2 = (random_direction(params, seed, normalization="gaussian") for seed in (1, 2))
    plane = Plane(flatten(params), torch.stack([flatten(d1), flatten(d2)]), params, "gaussian")
    ev = evaluate_plane(module_fn(model), plane, {"train": batches}, mse, points=9, a_range=(-2, 1), b_range=(-1, 3))
    # r(a, b) = r0 + a R1 + b R2 (the model is linear in its parameters): L = mean |r|^2 / 2.
    r0 = residuals(params, X, Y)
    R1, R2 = (residuals(d, X, torch.zeros_like(Y)) for d in (d1, d2))
    A, B = torch.meshgrid(ev.a, ev.b, indexing="ij")
    r = r0 + A[..., None, None] * R1 + B[..., None, None] * R2  # (9, 9, P, 2)
    torch.testing.assert_close(ev.loss["train"], 0.5 * r.square().sum(-1).mean(-1), rtol=1e-12, atol=1e-12)
    # Second differences are exact on a quadratic and give d^T H d of the Hessian operator.
    H = HessianOperator(module_fn(model), params, mse, batches)
    curvature = ev.curvature()
    assert curvature["L_aa"] == pytest.approx(R1.square().sum(-1).mean().item(), rel=1e-9)
    assert curvature["L_aa"] == pytest.approx(torch.dot(flatten(d1), H @ flatten(d1)).item(), rel=1e-9)
    assert curvature["L_bb"] == pytest.approx(torch.dot(flatten(d2), H @ flatten(d2)).item(), rel=1e-9)
    assert curvature["L_ab"] == pytest.approx(torch.dot(flatten(d1), H @ flatten(d2)).item(), rel=1e-9)


def test_centre_and_axes_equal_the_network_and_the_1d_path_engine():
    model, params, batches, X, Y = regression_case(1)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    labels = torch.randint(3, (60,), generator=torch.Generator().manual_seed(0))
    batches = list(zip(X.split(25), labels.split(25)))
    params = {n: p.detach() for n, p in net.named_parameters()}
    plane = random_plane(params, seed=3)
    fn = module_fn(net)
    ev = evaluate_plane(fn, plane, {"train": batches}, cross_entropy, points=7, points_per_call=4)
    i0, j0 = (int((axis == 0).nonzero()[0, 0]) for axis in (ev.a, ev.b))
    assert ev.loss["train"][i0, j0].item() == pytest.approx(cross_entropy(net(X), labels).item(), rel=1e-12), "the centre is the network"
    for k, (axis, values) in enumerate(((ev.a, ev.loss["train"][:, j0]), (ev.b, ev.loss["train"][i0, :]))):
        path = line(params, unflatten(plane.directions[k], params))
        along = evaluate_path(fn, path, {"train": batches}, cross_entropy, t=axis)
        torch.testing.assert_close(values, along.loss["train"], rtol=1e-12, atol=1e-12)
    assert abs(plane.info["cosine"]) < 0.5 and plane.info["norms"].shape == (2,)


def test_hessian_plane_holds_the_top_eigenvectors():
    model, params, batches, X, Y = regression_case(2, outputs=1)  # one output: no repeated eigenvalues
    fn = module_fn(model)
    plane = hessian_plane(fn, params, mse, batches)
    dense = HessianOperator(fn, params, mse, batches).to_dense()
    exact = eigvalsh(dense)[:2]  # descending
    np.testing.assert_allclose(plane.info["eigenvalues"], exact.numpy(), rtol=1e-8)
    assert plane.info["converged"].all()
    D = plane.directions
    torch.testing.assert_close(D @ D.T, torch.eye(2, dtype=D.dtype), rtol=0, atol=1e-8)
    ev = evaluate_plane(fn, plane, {"train": batches}, mse, points=5, a_range=(-0.5, 0.5))
    curvature = ev.curvature()
    assert curvature["L_aa"] == pytest.approx(exact[0].item(), rel=1e-7), "along a unit eigenvector the curvature is its eigenvalue"
    assert curvature["L_bb"] == pytest.approx(exact[1].item(), rel=1e-7)
    assert curvature["L_ab"] == pytest.approx(0.0, abs=1e-7 * exact[0].item())


def test_pca_recovers_a_trajectory_in_a_known_plane():
    generator = torch.Generator().manual_seed(0)
    N = 300
    like = {"w": torch.zeros(20, 10, dtype=torch.float64), "b": torch.zeros(100, dtype=torch.float64)}
    final = torch.randn(N, generator=generator, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(N, 2, generator=generator, dtype=torch.float64))  # (N, 2) orthonormal
    steps = torch.linspace(0, 1, 12, dtype=torch.float64)
    coords = torch.stack([3 * (1 - steps) ** 2, torch.sin(4 * steps) * (1 - steps)], 1)  # a curved path ending at 0
    trajectory = final + coords @ basis.T  # (12, N); the last snapshot is the centre
    plane = pca_plane(unflatten(final, like), trajectory)
    ratio = plane.info["explained_variance_ratio"]
    assert ratio.sum() == pytest.approx(1.0, abs=1e-12), f"a trajectory in a plane is explained by it: {ratio}"
    assert plane.info["rows"] == 11, "the centre itself is no row (Li et al.'s M = [theta_i - theta_n], i < n)"
    D = plane.directions.double()
    torch.testing.assert_close(D @ D.T, torch.eye(2, dtype=D.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close((D @ basis).det().abs(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=0)
    np.testing.assert_allclose(plane.info["trajectory_off_plane"], 0.0, atol=1e-10)
    rebuilt = final + torch.as_tensor(plane.info["trajectory"]) @ D
    torch.testing.assert_close(rebuilt, trajectory, rtol=0, atol=1e-10)
    # Against numpy's SVD of the centred rows (scikit-learn's PCA): the same explained variances.
    M = (trajectory[:-1] - final).numpy()
    s = np.linalg.svd(M - M.mean(0), compute_uv=False)
    np.testing.assert_allclose(ratio, s[:2] ** 2 / (s**2).sum(), rtol=1e-10)
    # A trajectory off the plane: the ratio drops below 1 and the distances show it.
    noisy = trajectory + 0.05 * torch.randn(12, N, generator=generator, dtype=torch.float64)
    off = pca_plane(unflatten(final, like), noisy)
    assert off.info["explained_variance_ratio"].sum() < 0.999 and off.info["trajectory_off_plane"].max() > 0.1


def test_points_plane_puts_the_three_networks_where_it_says():
    model, a, batches, X, Y = regression_case(3)
    b = {n: p + torch.randn_like(p) for n, p in a.items()}
    c = {n: p + torch.randn_like(p) for n, p in a.items()}
    plane = points_plane(a, b, c)
    where = plane.info["points"]
    coords, off = plane.coordinates(torch.stack([flatten(a), flatten(b), flatten(c)]))
    np.testing.assert_allclose(coords.numpy(), where, atol=1e-12)
    np.testing.assert_allclose(off.numpy(), 0.0, atol=1e-12)
    D = plane.directions
    assert D[0].norm().item() == pytest.approx(D[1].norm().item(), rel=1e-12) and abs(torch.dot(D[0], D[1]).item()) < 1e-9
    ev = evaluate_plane(module_fn(model), plane, {"train": batches}, mse, axes=([0.0, 1.0, where[2, 0]], [0.0, where[2, 1]]))
    for params, (i, j) in ((a, (0, 0)), (b, (1, 0)), (c, (2, 1))):
        expected = 0.5 * residuals(params, X, Y).square().sum(-1).mean().item()
        assert ev.loss["train"][i, j].item() == pytest.approx(expected, rel=1e-12)


def test_batchnorm_statistics_are_recomputed_at_every_grid_point_like_update_bn():
    torch.manual_seed(0)
    X, Y = torch.randn(200, 6, dtype=torch.float64), torch.randint(3, (200,))
    batches = list(zip(X.split(50), Y.split(50)))
    net = train_a_little(bn_net(1), X, Y)
    params = {n: p.detach() for n, p in net.named_parameters()}
    plane = random_plane(params, seed=0)
    stored = {n: b.clone() for n, b in net.named_buffers()}
    ev = evaluate_plane(module_fn(net), plane, {"train": batches}, cross_entropy, points=3, a_range=(-0.5, 0.5),
                        buffers=stored, bn_module=net, points_per_call=4)
    for i, a in enumerate(ev.a.tolist()):
        for j, b in enumerate(ev.b.tolist()):
            at = copy.deepcopy(net)
            for name, p in plane.point(a, b).items():
                at.get_parameter(name).data.copy_(p)
            torch.optim.swa_utils.update_bn([X], at)  # one batch of all points
            at.eval()
            with torch.no_grad():
                assert ev.loss["train"][i, j].item() == pytest.approx(cross_entropy(at(X), Y).item(), rel=1e-12), (a, b)
    assert all(torch.equal(b, stored[n]) for n, b in net.named_buffers()), "the net's own statistics are untouched"
    assert not net[1].training, "modes restored"
    # The stored (EMA) statistics at the centre: the net as trained; other points unchanged.
    as_trained = evaluate_plane(module_fn(net), plane, {"train": batches}, cross_entropy, points=3, a_range=(-0.5, 0.5),
                                buffers=stored, bn_module=net, centre_buffers=stored)
    with torch.no_grad():
        assert as_trained.loss["train"][1, 1].item() == pytest.approx(cross_entropy(net(X), Y).item(), rel=1e-12)
    assert abs(as_trained.loss["train"][1, 1] - ev.loss["train"][1, 1]) > 1e-6
    torch.testing.assert_close(as_trained.loss["train"][0], ev.loss["train"][0], rtol=1e-12, atol=0)


def test_default_axes_hold_the_centre_at_the_grids_own_step():
    """Ranges taken from a trajectory or three points: 0 (and 1) on the grid, one even step around them."""
    a = planes.axis_through(-4.89, 0.638, 21)
    steps = np.diff(a.numpy())
    assert (a == 0).sum() == 1 and np.allclose(steps, steps[0]) and a[0] <= -4.89 and a[-1] >= 0.638
    assert 21 <= len(a) <= 22
    b = planes.axis_through(-0.34, 1.3, 21, through_one=True)
    assert (b == 0).sum() == 1 and (b == 1).sum() == 1 and np.allclose(np.diff(b.numpy()), 1 / 12)
    like = {"w": torch.zeros(3, dtype=torch.float64)}
    plane = points_plane(like, {"w": torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)}, {"w": torch.tensor([0.4, 0.8, 0.0], dtype=torch.float64)})
    a, b = planes.default_axes(plane, 11)
    assert (a == 1).any() and a.min() < 0 and b.max() > 0.8 and (b == 0).any()
    assert [len(v) for v in planes.default_axes(random_plane(like), 11)] == [11, 11]


def test_bad_inputs_give_one_line_errors():
    like = {"w": torch.zeros(4, dtype=torch.float64)}
    centre = torch.zeros(4, dtype=torch.float64)
    cases = [
        (lambda: Plane(centre, torch.zeros(3, 4), like, "points"), r"two directions of 4 entries as a \(2, N\) tensor, got \(3, 4\)"),
        (lambda: pca_plane(like, torch.randn(2, 4)), "needs at least 3 snapshots besides the centre, got 2"),
        (lambda: pca_plane(like, torch.randn(3, 5)), "snapshots have 5 entries and the network 4"),
        (lambda: pca_plane(like, torch.outer(torch.arange(1.0, 5.0), torch.ones(4))), "spans fewer than 2 dimensions"),
        (lambda: points_plane(like, like, {"w": torch.ones(4)}), "needs b different from a"),
        (lambda: points_plane(like, {"w": torch.ones(4)}, {"w": 2 * torch.ones(4)}), "needs c off the line"),
        (lambda: points_plane(like, {"w": torch.ones(5)}, like), "different architectures"),
    ]
    for make, message in cases:
        with pytest.raises(ConfigError, match=message):
            make()
    plane = Plane(centre, torch.eye(4, dtype=torch.float64)[:2], like, "points")
    fn = lambda p, b, x: p["w"][:2].expand(x.shape[0], 2)
    data = {"train": [(torch.zeros(1, 1), torch.zeros(1, 2, dtype=torch.float64))]}
    with pytest.raises(ConfigError, match="points_per_call must be a positive integer, got 0"):
        evaluate_plane(fn, plane, data, mse, points_per_call=0)
    with pytest.raises(ConfigError, match="points must be an integer >= 2"):
        evaluate_plane(fn, plane, data, mse, points=1)
    with pytest.raises(ConfigError, match=r"the range \[0.5, 2\] must hold 0"):
        planes.axis_through(0.5, 2.0)
    with pytest.raises(ConfigError, match="needs grid points on both sides"):
        evaluate_plane(fn, plane, data, mse, points=3, a_range=(0, 1)).curvature()


# --- DDP: two ranks give the single-process answer ----------------------------------------------
def _compute(shard=None):
    """On a rank: its half of 90 points in batches of 20; in one process: all of them."""
    torch.manual_seed(0)
    X, Y = torch.randn(90, 6, dtype=torch.float64), torch.randint(3, (90,))
    net = bn_net(1).eval()
    idx = torch.arange(90).tensor_split(2)[shard[0]] if shard else torch.arange(90)
    batches = [(X[i], Y[i]) for i in idx.split(20)]
    params, buffers, fn = {n: p.detach() for n, p in net.named_parameters()}, dict(net.named_buffers()), module_fn(net)
    surface = evaluate_plane(fn, random_plane(params, seed=1), {"train": batches}, cross_entropy, points=3,
                             buffers=buffers, bn_module=net, points_per_call=2)
    top = hessian_plane(fn, params, cross_entropy, batches, buffers=buffers)
    return surface.loss["train"], surface.error["train"], torch.as_tensor(top.info["eigenvalues"]), top.directions.abs()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_ranks_equal_one_process():
    results, single = two_ranks_and_one_process(_compute)
    for r in range(2):
        for name, got, expected, tol in zip(("loss", "error", "eigenvalues", "eigenvectors"), results[r], single, (1e-10, 1e-10, 1e-6, 1e-5)):
            np.testing.assert_allclose(got, expected, rtol=tol, atol=1e-10, err_msg=f"rank {r}: {name}")
