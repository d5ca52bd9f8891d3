r"""Random-features regression: y = a . relu(W x / sqrt(d)) with W fixed, only a trained.

The model of Mei & Montanari (2019) and Belkin et al. (2019) in which the test error of the
min-norm fit peaks at N = P (double descent). The random first layer is a buffer, so
N = num_features * num_outputs (+ biases) counts only the trained readout. ``LinearTeacherData``
is their data: Gaussian inputs and a noisy linear teacher. A complete plugin: a Task and a
DataModule, found by short name once the package is installed (its entry point)::

    overparam fit --model RandomFeatures --model.num_features 200 --model.loss mse --model.lr 0.02 \
        --data LinearTeacherData --data.num_train 200 --trainer.max_epochs 50
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from overparam.data import OverparamDataModule
from overparam.errors import check_positive
from overparam.task import Task


class RandomFeaturesNet(nn.Module):
    def __init__(self, in_dim: int, num_features: int, num_outputs: int) -> None:
        super().__init__()
        self.register_buffer("features", torch.randn(num_features, in_dim) / in_dim**0.5)
        self.readout = nn.Linear(num_features, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(torch.relu(x.flatten(1) @ self.features.T))


class RandomFeatures(Task):
    """Random ReLU features of fixed random weights and a trained linear readout.

    Args:
        num_features: the number of random features (N / num_outputs, the knob of double descent).
        **kwargs: ``Task`` arguments (loss, lr, ensemble_size, ...).
    """

    def __init__(self, num_features: int = 100, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive("model.num_features", num_features)
        self.num_features = num_features
        self.setup_network()

    def make_network(self) -> nn.Module:
        return RandomFeaturesNet(self.in_dim, self.num_features, self.num_outputs)


class LinearTeacherData(OverparamDataModule):
    """Gaussian inputs and a noisy linear teacher: ``y = <w, x> / sqrt(d) + noise * eps``.

    ``w`` and ``x`` are standard Gaussians drawn from ``seed``; the targets are ``(n, 1)``
    floats (regression, one output: train with ``--model.loss mse``).

    Args:
        num_train: P, the training points.
        num_test: test points.
        input_dim: d.
        noise: standard deviation of the label noise on the training and test targets.
        **kwargs: ``OverparamDataModule`` arguments (``batch_size``, ``eval_batch_size``,
            ``seed``, ``analysis_size``, ``passes_per_epoch``).
    """

    def __init__(self, num_train: int = 200, num_test: int = 1000, input_dim: int = 20, noise: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive("data.num_train", num_train)
        check_positive("data.num_test", num_test)
        check_positive("data.input_dim", input_dim)
        check_positive("data.noise", noise, allow_zero=True)
        self.P, self.num_test, self.input_dim, self.noise = num_train, num_test, input_dim, noise

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.input_dim,)

    @property
    def num_outputs(self) -> int:
        return 1

    @property
    def num_train(self) -> int:
        return self.P

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        w = torch.randn(self.input_dim, generator=generator)
        x = torch.randn(self.P + self.num_test, self.input_dim, generator=generator)
        y = x @ w / self.input_dim**0.5 + self.noise * torch.randn(x.shape[0], generator=generator)
        y = y.unsqueeze(1)  # (n, 1): regression targets
        return {"train": (x[: self.P], y[: self.P]), "test": (x[self.P :], y[self.P :])}
