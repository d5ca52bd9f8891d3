"""Engine tests of ``overparam.landscape``: paths, barriers against closed forms, BatchNorm
recomputation against ``torch.optim.swa_utils.update_bn``, curve fitting, DDP = one process."""

from __future__ import annotations

import copy
import gzip
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import nn

from overparam.errors import ConfigError
from overparam.functional import flatten, module_fn
from overparam.landscape import (
    barrier_heights,
    curve_path,
    evaluate_path,
    filter_normalize,
    fit_curve,
    grid,
    line,
    linear_path,
    random_direction,
    recompute_bn,
)
from overparam.losses import cross_entropy, errors, mse


# --- toys with closed forms ---------------------------------------------------------------------
def double_well(params, buffers, x):
    """Outputs (w1^2 - 1, w2) for every sample: with mse and zero targets, L = ((w1^2-1)^2 + w2^2) / 2."""
    w = params["w"]
    return torch.stack([w[0] ** 2 - 1, w[1]]).expand(x.shape[0], 2)


def ring(params, buffers, x):
    """L = (|w|^2 - 1)^2 / 2 with mse and zero targets: a circle of minima, a bump of 1/2 at 0."""
    w = params["w"]
    return (w.square().sum() - 1).reshape(1, 1).expand(x.shape[0], 1)


TOY_DATA = {"train": [(torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64))]}
RING_DATA = [(torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64))]


def w(*values):
    return {"w": torch.tensor(values, dtype=torch.float64)}


def test_double_well_barrier_equals_analytic_value():
    ev = evaluate_path(double_well, linear_path(w(-1, 0), w(1, 0)), TOY_DATA, mse, points=25)
    heights = barrier_heights(ev.t, ev.loss["train"])
    assert heights["barrier"] == pytest.approx(0.5, abs=1e-15), "the well's top (0, 0) is 1/2 above both minima"
    assert heights["barrier_linear"] == pytest.approx(0.5, abs=1e-15)
    assert heights["t_barrier"] == 0.5

    # Unequal endpoints: theta(t) = (2t - 1, t), L(t) = 8 t^2 (t - 1)^2 + t^2 / 2.
    ev = evaluate_path(double_well, linear_path(w(-1, 0), w(1, 1)), TOY_DATA, mse, points=1001)
    L = lambda t: 8 * t**2 * (t - 1) ** 2 + t**2 / 2
    best = minimize_scalar(lambda t: -L(t), bounds=(0, 1), method="bounded", options={"xatol": 1e-12})
    chord = minimize_scalar(lambda t: -(L(t) - t * L(1.0)), bounds=(0, 1), method="bounded", options={"xatol": 1e-12})
    heights = barrier_heights(ev.t, ev.loss["train"])
    assert heights["barrier"] == pytest.approx(-best.fun - max(L(0.0), L(1.0)), abs=1e-6)
    assert heights["barrier_linear"] == pytest.approx(-chord.fun, abs=1e-6)
    torch.testing.assert_close(ev.loss["train"], L(ev.t), rtol=1e-12, atol=1e-12)


def test_convex_problem_stays_below_the_chord():
    torch.manual_seed(0)
    X, Y = torch.randn(200, 5, dtype=torch.float64), torch.randn(200, 3, dtype=torch.float64)
    model = nn.Linear(5, 3).double()
    a = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    b = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    data = {"train": list(zip(X.split(64), Y.split(64)))}  # 4 batches, the last one smaller
    ev = evaluate_path(module_fn(model), linear_path(a, b), data, mse, points=21, t_min=-1.0, t_max=2.0)
    # The closed form: L(theta) = (1/2P) |X W^T + b - Y|^2 with theta(t) = (1-t) a + t b.
    for t, value in zip(ev.t, ev.loss["train"]):
        W = (1 - t) * a["weight"] + t * b["weight"]
        bias = (1 - t) * a["bias"] + t * b["bias"]
        expected = 0.5 * (X @ W.T + bias - Y).square().sum() / 200
        assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    inside = (ev.t >= 0) & (ev.t <= 1)
    L0, L1 = ev.loss["train"][ev.t == 0], ev.loss["train"][ev.t == 1]
    chord = (1 - ev.t) * L0 + ev.t * L1
    assert (ev.loss["train"][inside] <= chord[inside] + 1e-12).all(), "a convex loss lies below its chord"
    heights = barrier_heights(ev.t, ev.loss["train"])
    assert heights["barrier_linear"] <= 1e-12 and heights["barrier"] <= 1e-12
    assert ev.count["train"] == 200


def test_grid_always_holds_the_endpoints():
    t = grid(4, -1.0, 2.0)  # -1, 0, 1, 2 exactly
    assert t.tolist() == [-1.0, 0.0, 1.0, 2.0]
    t = grid(4, 0.0, 1.0)  # 0, 1/3, 2/3, 1
    assert t[0] == 0.0 and t[-1] == 1.0 and len(t) == 4
    t = grid(2, -0.5, 1.5)  # 0 and 1 inserted
    assert t.tolist() == [-0.5, 0.0, 1.0, 1.5]


def test_path_kinds_at_known_points():
    a, m, b = w(0, 0), w(1, 2), w(2, 0)
    assert torch.equal(linear_path(a, b).point(2.0)["w"], torch.tensor([4.0, 0.0], dtype=torch.float64))
    bez = curve_path(a, b, "bezier", middles=[m])
    assert torch.equal(bez.point(0.0)["w"], a["w"]) and torch.equal(bez.point(1.0)["w"], b["w"])
    torch.testing.assert_close(bez.point(0.5)["w"], 0.25 * a["w"] + 0.5 * m["w"] + 0.25 * b["w"])
    chain = curve_path(a, b, "polychain", middles=[m])
    torch.testing.assert_close(chain.point(0.5)["w"], m["w"])
    torch.testing.assert_close(chain.point(0.75)["w"], 0.5 * m["w"] + 0.5 * b["w"])
    # Garipov's initialisation: bends evenly on the segment make both curves the linear path.
    for kind in ("bezier", "polychain"):
        curve = curve_path(a, b, kind, num_bends=3)
        for t in (0.1, 0.37, 0.9):
            torch.testing.assert_close(curve.point(t)["w"], linear_path(a, b).point(t)["w"])
    stacked = bez.points([0.0, 0.5, 1.0])["w"]
    assert stacked.shape == (3, 2) and torch.equal(stacked[1], bez.point(0.5)["w"])


def test_filter_normalised_direction_and_line():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Conv1d(6, 3, 1))
    params = {n: p.detach() for n, p in net.named_parameters()}
    d = random_direction(params, seed=3)
    assert all(torch.equal(d[n], v) for n, v in random_direction(params, seed=3).items()), "same seed, same direction"
    for name, p in params.items():
        if p.dim() == 1:
            assert not d[name].any(), "biases are not perturbed (Li et al. 2018)"
        else:
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), p.flatten(1).norm(dim=1))
    assert all(torch.equal(v, params[n]) for n, v in filter_normalize(d, params, ignore_1d=False).items() if v.dim() == 1)
    path = line(params, d)
    torch.testing.assert_close(flatten(path.point(-0.5)), flatten(params) - 0.5 * flatten(d))
    gaussian = random_direction(params, seed=3, normalization="gaussian")
    assert gaussian["0.bias"].any()


def test_line_along_the_top_hessian_eigenvector():
    # At the minimum (-1, 0) of the double well H = diag(4, 1); along the top eigenvector
    # +-e1, L(t) = ((t -+ 1)^2 - 1)^2 / 2 exactly, whose second derivative at 0 is lambda = 4.
    origin = w(-1, 0)
    x, y = TOY_DATA["train"][0]
    loss = lambda v: mse(double_well({"w": v}, {}, x), y)
    H = torch.autograd.functional.hessian(loss, origin["w"])
    eigenvalues, eigenvectors = torch.linalg.eigh(H)
    v = eigenvectors[:, -1]  # a flat vector, as the curvature engine returns
    assert eigenvalues[-1].item() == pytest.approx(4.0)
    ev = evaluate_path(double_well, line(origin, v), TOY_DATA, mse, points=9, t_min=-0.2, t_max=0.2)
    s = ev.t * v[0].sign()
    torch.testing.assert_close(ev.loss["train"], 0.5 * ((s - 1) ** 2 - 1) ** 2, rtol=1e-12, atol=1e-15)
    h = 0.05
    curvature = (ev.loss["train"][3] - 2 * ev.loss["train"][4] + ev.loss["train"][5]) / h**2
    assert curvature.item() == pytest.approx(4.0, rel=2e-3)


def test_bad_inputs_give_one_line_errors():
    cases = [
        (lambda: linear_path(w(0, 0), w(0, 0, 0)), "different architectures: w is \\(2,\\) in a and \\(3,\\) in b"),
        (lambda: linear_path(w(0, 0), {"v": torch.zeros(2)}), "different parameters"),
        (lambda: grid(1), "points must be an integer >= 2"),
        (lambda: grid(5, 1.0, 0.0), "t_min must be smaller than t_max"),
        (lambda: curve_path(w(0), w(1), "spline"), "path must be one of linear, bezier, polychain"),
        (lambda: barrier_heights(torch.tensor([0.0, 0.5]), torch.zeros(2)), "t = 0 and t = 1"),
        (lambda: random_direction(w(0), normalization="uniform"), "direction must be one of"),
        (lambda: line(w(0, 0), torch.zeros(3)), "the direction has 3 entries"),
        (lambda: fit_curve(ring, w(0), w(1), RING_DATA, mse, kind="linear"), "curve must be bezier or polychain"),
    ]
    for make, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            make()
        assert "\n" not in str(info.value)


# --- BatchNorm ----------------------------------------------------------------------------------
def bn_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).double()


def train_a_little(net, X, Y, steps=20):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    for i in range(steps):
        x, y = X[(i % 4) * 50 : (i % 4 + 1) * 50], Y[(i % 4) * 50 : (i % 4 + 1) * 50]
        optimizer.zero_grad()
        cross_entropy(net(x), y).backward()
        optimizer.step()
    return net.eval()


def test_bn_recomputation_matches_update_bn_and_the_trained_net():
    torch.manual_seed(0)
    X, Y = torch.randn(200, 6, dtype=torch.float64), torch.randint(3, (200,))
    batches = list(zip(X.split(50), Y.split(50)))
    net_a, net_b = train_a_little(bn_net(1), X, Y), train_a_little(bn_net(2), X, Y)
    ema = [copy.deepcopy(net) for net in (net_a, net_b)]  # as trained: running (EMA) statistics
    # The trained nets with precise statistics: torch's SWA update_bn over one batch of all points.
    for net in (net_a, net_b):
        torch.optim.swa_utils.update_bn([X], net)
        net.eval()
    template = copy.deepcopy(net_a)
    a, b = dict(net_a.named_parameters()), dict(net_b.named_parameters())
    # Four batches give the statistics of all points (they do not depend on the batching).
    new = recompute_bn(template, {n: p.detach() for n, p in b.items()}, dict(template.named_buffers()), batches)
    for name, value in net_b.named_buffers():
        if "running" in name:
            torch.testing.assert_close(new[name], value, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        inputs = net_b[0](X)  # (200, 16): what the BN layer sees
    torch.testing.assert_close(new["1.running_mean"], inputs.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new["1.running_var"], inputs.var(0), rtol=1e-12, atol=1e-12)
    assert template[1].training is False and template[1].momentum == 0.1, "modes and momenta restored"

    fn = module_fn(template)
    ev = evaluate_path(fn, linear_path(a, b), {"train": batches}, cross_entropy, points=5, buffers=dict(template.named_buffers()), bn_module=template)
    with torch.no_grad():
        trained = [cross_entropy(net(X), Y).item() for net in (net_a, net_b)]
    assert ev.loss["train"][0].item() == pytest.approx(trained[0], rel=1e-12), "t = 0 is the trained net a"
    assert ev.loss["train"][-1].item() == pytest.approx(trained[1], rel=1e-12), "t = 1 is the trained net b"
    # Stored statistics at the ends: the ends are the nets exactly as trained (EMA statistics),
    # the middle is recomputed.
    stored = evaluate_path(fn, linear_path(a, b), {"train": batches}, cross_entropy, points=3, buffers=dict(template.named_buffers()),
                           bn_module=template, endpoint_buffers=tuple(dict(net.named_buffers()) for net in ema))
    with torch.no_grad():
        as_trained = [cross_entropy(net(X), Y).item() for net in ema]
    assert stored.loss["train"][0].item() == pytest.approx(as_trained[0], rel=1e-12)
    assert stored.loss["train"][2].item() == pytest.approx(as_trained[1], rel=1e-12)
    assert abs(as_trained[1] - trained[1]) > 1e-6, "EMA and recomputed statistics differ"
    torch.testing.assert_close(stored.loss["train"][1], ev.loss["train"][2], rtol=1e-12, atol=0)
    # Without recomputation, a's statistics at b's weights give another loss.
    stale = evaluate_path(fn, linear_path(a, b), {"train": batches}, cross_entropy, t=[1.0], buffers=dict(net_a.named_buffers()))
    assert abs(stale.loss["train"][0].item() - trained[1]) > 1e-3


# --- curve fitting ------------------------------------------------------------------------------
def test_curve_fitting_goes_around_the_ring_bump():
    a, b = w(-1, 0), w(1, 0)
    linear = evaluate_path(ring, linear_path(a, b), {"train": RING_DATA}, mse, points=41)
    assert barrier_heights(linear.t, linear.loss["train"])["barrier"] == pytest.approx(0.5)
    start = curve_path(a, b, "bezier", middles=[w(0, 0.1)])  # on the symmetry axis the y-gradient is 0
    curve, history = fit_curve(ring, a, b, RING_DATA, mse, steps=300, lr=0.1, seed=0, init=start)
    found = evaluate_path(ring, curve, {"train": RING_DATA}, mse, points=41)
    assert barrier_heights(found.t, found.loss["train"])["barrier"] < 0.05
    assert torch.equal(curve.controls[0], flatten(a)) and torch.equal(curve.controls[-1], flatten(b)), "ends fixed"


def _read_idx(path: Path, count: int, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        f.read(offset)
        return np.frombuffer(f.read(count), dtype=np.uint8)


@pytest.fixture(scope="module")
def mnist_subset(mnist_root):
    """The first 2,000 MNIST training images (1,000 to train, 1,000 held out), as floats in [0, 1]."""
    raw = mnist_root / "MNIST" / "raw"
    x = torch.tensor(_read_idx(raw / "train-images-idx3-ubyte.gz", 2000 * 784, 16).copy()).float().view(2000, 784) / 255
    y = torch.tensor(_read_idx(raw / "train-labels-idx1-ubyte.gz", 2000, 8).copy()).long()
    return (x[:1000], y[:1000]), (x[1000:], y[1000:])


def _train_mlp(seed, X, Y, steps=300):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(X), (100,), generator=generator)
        optimizer.zero_grad()
        cross_entropy(net(X[idx]), Y[idx]).backward()
        optimizer.step()
    return net


def test_curve_fitting_lowers_the_barrier_between_two_mnist_mlps(mnist_subset):
    (X, Y), (Xt, Yt) = mnist_subset
    nets = [_train_mlp(seed, X, Y) for seed in (1, 2)]
    a, b = (dict(net.named_parameters()) for net in nets)
    fn = module_fn(nets[0])
    data = {"train": list(zip(X.split(500), Y.split(500))), "test": [(Xt, Yt)]}
    linear = evaluate_path(fn, linear_path(a, b), data, cross_entropy, points=11)
    curve, _ = fit_curve(fn, a, b, list(zip(X.split(100), Y.split(100))), cross_entropy, steps=400, lr=0.05, seed=0)
    bent = evaluate_path(fn, curve, data, cross_entropy, points=11)
    lin, cur = linear.barriers(), bent.barriers()
    assert lin["train/loss/barrier"] > 0.3, f"independent MLPs have a linear barrier: {lin}"
    assert cur["train/loss/barrier"] < 0.5 * lin["train/loss/barrier"], f"fitted {cur} vs linear {lin}"
    assert cur["test/error/barrier"] < lin["test/error/barrier"]
    # Endpoints are the two nets exactly.
    with torch.no_grad():
        assert bent.loss["train"][0].item() == pytest.approx(cross_entropy(nets[0](X), Y).item(), rel=1e-6)
        assert bent.error["test"][-1].item() == pytest.approx(errors(nets[1](Xt), Yt).mean().item(), abs=1e-7)


# --- DDP: two ranks give the single-process answer ----------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_case():
    torch.manual_seed(0)
    X, Y = torch.randn(90, 6, dtype=torch.float64), torch.randint(3, (90,))
    net_a, net_b = bn_net(1), bn_net(2)
    return X, Y, net_a, net_b


def _ddp_run(rank, world, port, queue, compute):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # numpy, not tensors: tensors would travel as shared memory that dies with the process.
        queue.put((rank, [t.numpy() for t in compute(shard=(rank, world))]))
    finally:
        dist.destroy_process_group()


def two_ranks_and_one_process(compute):
    """``compute(shard=(rank, 2))`` on 2 forked gloo ranks, and ``compute()`` in this process:
    ``({rank: [arrays]}, [arrays])``."""
    ctx = torch.multiprocessing.get_context("fork")
    queue, port = ctx.SimpleQueue(), _free_port()
    procs = [ctx.Process(target=_ddp_run, args=(r, 2, port, queue, compute)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join(30)
    return results, [t.numpy() for t in compute()]


def _compute(shard=None):
    """On a rank: its shard, in batches of 20. In one process (shard None): batch j is the
    union of the ranks' batches j, so every fitting step sees the same points."""
    X, Y, net_a, net_b = _ddp_case()
    shards = [idx.split(20) for idx in torch.arange(90).tensor_split(2)]  # 45 points each: 20, 20, 5
    chunks = shards[shard[0]] if shard else [torch.cat(pair) for pair in zip(*shards)]
    batches = [(X[i], Y[i]) for i in chunks]
    a, b = dict(net_a.named_parameters()), dict(net_b.named_parameters())
    fn, buffers = module_fn(net_a), dict(net_a.named_buffers())
    ev = evaluate_path(fn, linear_path(a, b), {"train": batches}, cross_entropy, points=5, buffers=buffers, bn_module=net_a)
    bn = recompute_bn(net_a, {n: p.detach() for n, p in b.items()}, buffers, batches)
    # Curve fitting on nets without BatchNorm (train-mode BN would use per-rank batch statistics).
    mlp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    ends = [{n: torch.randn_like(p) for n, p in mlp.named_parameters()} for _ in range(2)]
    curve, history = fit_curve(module_fn(mlp), *ends, batches, cross_entropy, steps=5, lr=0.1)
    return ev.loss["train"], ev.error["train"], bn["1.running_mean"], bn["1.running_var"], curve.controls[1], torch.tensor(history)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_ranks_equal_one_process():
    results, single = two_ranks_and_one_process(_compute)
    for r in range(2):
        for name, got, expected in zip(("loss", "error", "BN mean", "BN var", "fitted middle", "fit history"), results[r], single):
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12, err_msg=f"rank {r}: {name}")
