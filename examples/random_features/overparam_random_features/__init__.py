"""Random-features regression: y = a . relu(W x / sqrt(d)) with W fixed, only a trained.

The model of Mei & Montanari (2019) and Belkin et al. (2019) in which the test error of the
min-norm fit peaks at N = P (double descent). The random first layer is a buffer, so
N = num_features * num_outputs (+ biases) counts only the trained readout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
