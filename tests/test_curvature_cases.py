"""Shared case table and helpers of the curvature tests (curvlinops' test/cases.py + utils.py).

A case is data: (seed, model, loss, data). ``make_case`` seeds first, then builds a K = 1
functional view, the loss function and a list of batches (uneven chunks on purpose).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from overparam.functional import FunctionalView, module_fn
from overparam.losses import get_loss
from overparam.models import FullyConnected


class TinyCNN(nn.Module):
    """conv(1->3, 3x3) -> tanh -> conv(3->4, 3x3, stride 2) -> relu -> linear: a small CNN."""

    def __init__(self, num_outputs: int, channels: tuple[int, int] = (3, 4)) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2)
        self.head = nn.Linear(c2 * 3 * 3, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.flatten(1))


def _mlp(C: int, width: int = 12) -> nn.Module:
    return FullyConnected(6, C, width=width, depth=2, activation="tanh")


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "mlp": _mlp,
    "cnn": TinyCNN,
    "mlp_relu": lambda C: FullyConnected(6, C, width=10, depth=1, activation="relu"),
    "linear": lambda C: nn.Sequential(nn.Flatten(), nn.Linear(6, C)),
    # ~2-3k parameters: the size issue 4 names for the eigvalsh comparison (slow tests).
    "mlp_big": lambda C: _mlp(C, width=40),
    "cnn_big": lambda C: TinyCNN(C, channels=(10, 20)),
}
INPUTS = {"mlp": (6,), "cnn": (1, 7, 7), "mlp_relu": (6,), "linear": (6,), "mlp_big": (6,), "cnn_big": (1, 7, 7)}

CASES = [
    {"id": "mlp-ce", "model": "mlp", "loss": "cross_entropy", "C": 3},
    {"id": "mlp-sqhinge", "model": "mlp", "loss": "squared_hinge", "C": 3},
    {"id": "cnn-ce", "model": "cnn", "loss": "cross_entropy", "C": 3},
    {"id": "cnn-sqhinge", "model": "cnn", "loss": "squared_hinge", "C": 3},
    {"id": "mlp-binary-logistic", "model": "mlp", "loss": "cross_entropy", "C": 1},
    {"id": "mlp-mse", "model": "mlp", "loss": "mse", "C": 2},
    {"id": "relu-hinge", "model": "mlp_relu", "loss": "hinge", "C": 3},
]
IDS = [c["id"] for c in CASES]


def make_labels(C: int, P: int, generator: torch.Generator, loss: str) -> Tensor:
    if loss == "mse":
        return torch.randn(P, C, generator=generator, dtype=torch.float64)
    if C == 1:
        return torch.randint(0, 2, (P,), generator=generator).to(torch.float64) * 2 - 1
    return torch.randint(0, C, (P,), generator=generator)


def make_case(
    case: dict, dtype: torch.dtype = torch.float64, P: int = 40, seed: int = 0, chunks: tuple[int, ...] = (17, 23)
) -> tuple[FunctionalView, Callable, list[tuple[Tensor, Tensor]]]:
    """(view, loss_fn, batches) of a case; the batches cut P points into ``chunks``."""
    torch.manual_seed(seed)
    net = MODELS[case["model"]](case["C"]).to(dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(P, *INPUTS[case["model"]], generator=generator, dtype=torch.float64).to(dtype)
    y = make_labels(case["C"], P, generator, case["loss"])
    if y.is_floating_point():
        y = y.to(dtype)
    sizes = list(chunks) if sum(chunks) == P else [P]
    batches = list(zip(x.split(sizes), y.split(sizes)))
    view = FunctionalView(module_fn(net), {n: p.detach() for n, p in net.named_parameters()}, dict(net.named_buffers()))
    return view, get_loss(case["loss"]), batches


def make_trained_case(steps: int = 100, seed: int = 0) -> tuple[FunctionalView, Callable, list[tuple[Tensor, Tensor]]]:
    """A tanh MLP 6-16-12-3 (N = 355) trained by full-batch Adam on 48 random-label points.

    Near a minimum its Hessian has a clustered bulk edge: the bottom-10 eigenvalues lie within
    ~1e-3 |lambda_1| of each other, 2e-5..3e-4 |lambda_1| apart -- the case where a short Lanczos run
    was silently wrong (issue 13).
    """
    torch.manual_seed(seed)
    net = FullyConnected(6, 3, width=[16, 12], activation="tanh").double()
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(48, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=generator)
    loss_fn = get_loss("cross_entropy")
    optimizer = torch.optim.Adam(net.parameters(), lr=0.03)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(net(x), y).backward()
        optimizer.step()
    view = FunctionalView(module_fn(net), {n: p.detach() for n, p in net.named_parameters()}, {})
    return view, loss_fn, list(zip(x.split([21, 27]), y.split([21, 27])))


def compare_matmat(op_matmat: Callable[[Tensor], Tensor], dense: Tensor, num_vectors: int = 3, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """The operator times random vectors equals the dense matrix times them."""
    generator = torch.Generator().manual_seed(3)
    V = torch.randn(dense.shape[1], num_vectors, generator=generator, dtype=torch.float64).to(dense.dtype)
    got, want = op_matmat(V), dense @ V
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(1.0, float(want.abs().max())))


def compare_consecutive_matmats(op_matmat: Callable[[Tensor], Tensor], dim: int, dtype: torch.dtype) -> None:
    """Two products with the same input are bit-identical (fixed data order, no randomness)."""
    V = torch.randn(dim, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    assert torch.equal(op_matmat(V), op_matmat(V)), "consecutive products differ"


def check_estimator_convergence(
    sample: Callable[[int], Tensor], target: Tensor, target_rel_error: float, max_samples: int, min_samples: int = 4
) -> int:
    """Average ``sample(i)`` until its mean is within ``target_rel_error`` of ``target``.

    Returns the number of samples used; fails if ``max_samples`` run out first.
    """
    total: Optional[Tensor] = None
    for i in range(max_samples):
        s = sample(i)
        total = s if total is None else total + s
        mean = total / (i + 1)
        error = float(((mean - target).abs() / target.abs().clamp_min(1e-300)).max())
        if i + 1 >= min_samples and error <= target_rel_error:
            return i + 1
    raise AssertionError(f"estimator did not reach relative error {target_rel_error} in {max_samples} samples (last {error:.3g})")
