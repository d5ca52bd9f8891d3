"""CIFAR-10 with a width-scaled conv-net: the talk's batch-size and ensemble experiments.

Data (``CifarData``): CIFAR-10 (Krizhevsky 2009) through torchvision, decoded once, cached as
uint8 tensors, normalised on the device per channel with the usual training-set statistics
(mean 0.4914, 0.4822, 0.4465; std 0.2470, 0.2435, 0.2616). Options as for MNIST where they
make sense (``n_train``, ``n_test``, ``val_size``, ``label_noise``, ``input_noise``), plus
``labels: binary`` (vehicles +1: airplane, automobile, ship, truck; animals -1), the md5
switch ``verify_integrity`` and ``augment`` (random crop with 4-pixel zero padding and
horizontal flip, drawn on the device for every training batch; evaluation and the analysis
batches see the plain images).

Task (``CifarCNN``): ``overparam.models.ConvNet`` with channels c, 2c, 4c, ... (``width`` = c).
BatchNorm is off by default; with it on, ``ensemble_size > 1`` is refused (the Task base
raises a ConfigError: BatchNorm in training mode is not vmap-safe).
"""

from __future__ import annotations


import torch
from torch import Tensor, nn
from torch.nn import functional as F

from overparam.data import Batch
from overparam.datasets import ImageData, load_cifar10
from overparam.errors import check_choice, check_positive
from overparam.models import ACTIVATIONS, ConvNet
from overparam.task import Task

LABELS = ("classes", "binary")
VEHICLES = (0, 1, 8, 9)  # airplane, automobile, ship, truck (batches.meta label_names order)


def random_crop_flip(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random crops of the zero-padded images and random horizontal flips, on x's device.

    Zero padding after normalisation pads with the mean image colour. Every image gets its
    own offset in ``[0, 2 * padding]`` along each axis and a flip with probability 1/2.
    ``x`` is ``(B, C, H, W)``; the result has the same shape.
    """
    B, C, H, W = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, B, 1), device=x.device, generator=generator)
    flip = torch.rand(B, 1, device=x.device, generator=generator) < 0.5
    cols = torch.arange(W, device=x.device)
    cols = torch.where(flip, W - 1 - cols, cols) + dx  # (B, W): flipping reverses the columns read
    rows = torch.arange(H, device=x.device) + dy  # (B, H)
    batch = torch.arange(B, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class CifarData(ImageData):
    """CIFAR-10 images, device-resident.

    Args:
        labels: ``classes`` (10 classes) or ``binary`` (vehicles +1 vs animals -1, one
            output; a class-balanced subsample then holds 40% vehicles).
        augment: random crop (4-pixel padding) and horizontal flip of every training batch.
        verify_integrity: check torchvision's md5 of the batch files (default). Turn it off
            only for a trusted copy known to differ from the official release, such as a
            re-encoded offline copy; a warning is given on every load.
        eval_batch_size: evaluation batch size (default 1024: conv activations of bigger
            batches take gigabytes at c = 64).
        **kwargs: ``ImageData`` arguments (data_dir, download, n_train, n_test, val_size,
            label_noise, input_noise) and ``OverparamDataModule`` ones (batch_size, seed, ...).

    Example (YAML)::

        data:
          class_path: CifarData
          init_args: {n_train: 10000, labels: binary, augment: true}
    """

    train_size, test_size, num_classes = 50_000, 10_000, 10
    image_shape = (3, 32, 32)
    # Per-channel statistics of the official 50,000 training images / 255.
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        verify_integrity: bool = True,
        labels: str = "classes",
        augment: bool = False,
        eval_batch_size: int = 1024,
        **kwargs,
    ) -> None:
        super().__init__(eval_batch_size=eval_batch_size, **kwargs)
        check_choice("data.labels", labels, LABELS)
        self.verify_integrity, self.labels, self.augment = verify_integrity, labels, augment

    def decoded(self) -> dict[str, Batch]:
        return load_cifar10(self.data_dir, self.download, self.verify_integrity)

    @property
    def binary(self) -> bool:
        return self.labels == "binary"

    def binary_labels(self, y: Tensor) -> Tensor:
        return torch.where(torch.isin(y, torch.tensor(VEHICLES)), 1.0, -1.0)

    @property
    def augments(self) -> bool:
        return self.augment

    def train_transform(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Random crop (4-pixel zero padding) and horizontal flip of a training batch."""
        return random_crop_flip(x, 4, generator)


class CifarCNN(Task):
    """A width-scaled conv-net on CIFAR-10 (``overparam.models.ConvNet``).

    N counts every conv and linear weight and bias (and BatchNorm's affine parameters when
    on) of one member. With depth 3, one conv per stage and C outputs it is
    N = 90 c^2 + (34 + 4 C) c + C; c = 64 with 10 outputs gives N = 373,386.

    Args:
        width: c, channels of the first stage; stage i has c * 2**i.
        depth: number of stages (2x2 max pooling between them).
        convs_per_stage: 3x3 convs per stage.
        activation: ``relu``, ``tanh``, ``gelu``, ``softplus`` or ``linear``.
        bias: biases on or off.
        batch_norm: BatchNorm after each conv (off: the ensemble and curvature code needs
            vmap-safe networks; with it on, ``ensemble_size > 1`` is a ConfigError).
        **kwargs: ``Task`` arguments (loss, lr, momentum, ensemble_size, ...).
    """

    def __init__(
        self,
        width: int = 16,
        depth: int = 3,
        convs_per_stage: int = 1,
        activation: str = "relu",
        bias: bool = True,
        batch_norm: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_positive("model.width", width)
        check_positive("model.depth", depth)
        check_positive("model.convs_per_stage", convs_per_stage)
        check_choice("model.activation", activation, list(ACTIVATIONS))
        self.width, self.depth, self.convs_per_stage = width, depth, convs_per_stage
        self.activation, self.bias, self.batch_norm = activation, bias, batch_norm
        self.setup_network()

    def make_network(self) -> nn.Module:
        channels = self.input_shape[0] if len(self.input_shape) == 3 else 1
        return ConvNet(
            channels, self.num_outputs, self.width, self.depth, self.convs_per_stage,
            self.activation, self.bias, self.batch_norm,
        )  # fmt: skip
