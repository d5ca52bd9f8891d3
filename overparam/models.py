"""Width-scaled network builders and the parameter count N.

Every builder returns a plain ``nn.Module`` without in-place state other than BatchNorm
buffers, so ``torch.func.functional_call`` and ``vmap`` apply (ensembles, curvature).
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from overparam.errors import ConfigError

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "linear": nn.Identity,
}

Width = Union[int, Sequence[int]]


def get_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}") from None


def layer_widths(width: Width, depth: int) -> list[int]:
    """Hidden widths: ``depth`` copies of one number, or the list given (its length wins)."""
    if isinstance(width, int):
        return [width] * depth
    return list(width)


class FullyConnected(nn.Module):
    """``in_dim -> width_1 -> ... -> width_L -> out_dim`` with an activation between layers.

    Args:
        in_dim: input features (inputs are flattened first).
        out_dim: outputs C (1 for binary labels in {-1, +1}).
        width: hidden width, one number for every layer or a list (one per layer).
        depth: number of hidden layers when ``width`` is one number.
        activation: one of ``ACTIVATIONS``.
        bias: whether linear layers carry a bias.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        width: Width = 64,
        depth: int = 2,
        activation: str = "relu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        sizes = [in_dim, *layer_widths(width, depth)]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out, bias=bias), get_activation(activation)]
        layers.append(nn.Linear(sizes[-1], out_dim, bias=bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def count_parameters(module: nn.Module) -> int:
    """N: the number of trainable scalars of one network (buffers and frozen weights excluded)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


#: Bytes per trainable parameter that training needs at the least: the weight, its gradient
#: and one optimizer state (SGD's momentum), in float32. A floor: activations, Adam's second
#: state and float64 come on top.
TRAINING_BYTES_PER_PARAMETER = 3 * 4


def available_memory() -> Optional[int]:
    """Bytes the system can hand out now (``MemAvailable`` of ``/proc/meminfo``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(make_network: Callable[[], nn.Module], members: int, task: str) -> None:
    """Refuse a network too large to train here before any of it is allocated.

    The network is built on the ``meta`` device (shapes only), so N costs nothing to learn even
    for a billion parameters; ``members`` copies need ``TRAINING_BYTES_PER_PARAMETER`` each.

    Raises:
        ConfigError: that floor exceeds the memory available now.
    """
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            N = count_parameters(make_network())
    except (NotImplementedError, RuntimeError):
        return  # an op without a meta kernel: the real build below reports any real problem
    need, available = N * members * TRAINING_BYTES_PER_PARAMETER, available_memory()
    if available is not None and need > available:
        raise ConfigError(
            f"model: {task} would have N = {N:,} parameters per member (K = {members}); training needs at least "
            f"{_gigabytes(need)} (weights, gradients, momentum in float32), more than the {_gigabytes(available)} "
            "of memory available; choose a smaller network (e.g. model.width)"
        )


def _gigabytes(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB"


class ConvNet(nn.Module):
    """Width-scaled conv-net: stage i has ``width * 2**i`` channels, then global pooling and a linear head.

    Stage i is ``convs_per_stage`` times [3x3 conv (padding 1) -> BatchNorm (optional) ->
    activation], then 2x2 max pooling (except after the last stage). The feature map is
    averaged over space and fed to a linear layer with ``out_dim`` outputs. One knob, the
    width c, scales every layer, so N grows like c^2 (the width-scaling plots of the talk).
    Without BatchNorm the network has no buffers and is ``vmap``-safe (ensembles, curvature).

    Args:
        in_channels: input channels (3 for CIFAR-10).
        out_dim: outputs C (1 for binary labels in {-1, +1}).
        width: c, the channels of the first stage (then 2c, 4c, ...).
        depth: number of stages.
        convs_per_stage: conv layers in each stage.
        activation: one of ``ACTIVATIONS``.
        bias: whether conv and linear layers carry a bias.
        batch_norm: BatchNorm2d after each conv (off by default: not vmap-safe in train mode).
    """

    def __init__(
        self,
        in_channels: int,
        out_dim: int,
        width: int = 16,
        depth: int = 3,
        convs_per_stage: int = 1,
        activation: str = "relu",
        bias: bool = True,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(depth):
            for _ in range(convs_per_stage):
                out_channels = width * 2**stage
                layers.append(nn.Conv2d(channels, out_channels, 3, padding=1, bias=bias))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out_channels))
                layers.append(get_activation(activation))
                channels = out_channels
            if stage < depth - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out_dim, bias=bias)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
