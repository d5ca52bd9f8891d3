"""MNIST with a fully connected network: the talk's GD-vs-SGD and jamming experiments.

Data (``MnistData``): the real MNIST digits (LeCun et al. 1998) through torchvision, decoded
once, cached as uint8 tensors and normalised on the device with the training-set statistics
mean 0.1307, std 0.3081. Options, each seeded and documented in ``docs/data.md``:

* ``n_train`` (P), ``n_test``, ``val_size``, ``label_noise``, ``input_noise``: see ``ImageData``;
* ``labels``: ``digits`` (10 classes, cross-entropy) or ``parity`` (+1 for an even digit,
  -1 for an odd one, one output: the binary hinge / jamming setup of Spigler et al. 2019,
  "A jamming transition from under- to over-parametrization", and Geiger et al. 2019);
* ``pca_dim`` (+ ``whiten``): project the inputs on the top ``pca_dim`` principal components
  of the *training subset* (and rescale each to unit variance), as in the jamming papers,
  which feed the first principal components of MNIST to the network;
* ``sum_mod_10``: each example is two digits side by side (a 28 x 56 image) labelled
  ``(a + b) mod 10``; the second digit of pair i is digit ``perm(i)`` of the same split.

Task (``MnistFC``): ``FullyConnected`` with one width or a list of widths, ReLU by default.
The config ``configs/mnist_fc.yaml`` uses 784-500-100-10: N = 443,610 (~450K, as in the talk).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from overparam.data import Batch
from overparam.datasets import ImageData, load_mnist
from overparam.errors import ConfigError, check_choice, check_positive
from overparam.models import ACTIVATIONS, Width
from overparam.plugins.teacher_student import TeacherStudent

LABELS = ("digits", "parity")


def pca_projection(x: Tensor, dim: int, whiten: bool) -> tuple[Tensor, Tensor]:
    """Mean and projection matrix of the top ``dim`` principal components of ``x`` (n, d).

    ``(x - mean) @ W`` gives the components, ordered by decreasing variance; with ``whiten``
    each is divided by its standard deviation, so the projected data have identity
    covariance (1/n normalisation). Computed in float64; each component's sign is fixed by
    making its largest-magnitude loading positive, so the result does not depend on the
    eigensolver or the device.
    """
    x = x.double()
    mean = x.mean(0)
    centred = x - mean
    eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred / x.shape[0])  # ascending
    eigvals, eigvecs = eigvals.flip(0)[:dim], eigvecs.flip(1)[:, :dim]  # (d,), (d, dim)
    signs = eigvecs.gather(0, eigvecs.abs().argmax(0, keepdim=True)).sign()
    W = eigvecs * signs
    if whiten:
        W = W / eigvals.clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    return mean, W


class MnistData(ImageData):
    """MNIST digits, device-resident, with the talk's data options.

    Args:
        labels: ``digits`` (10 classes) or ``parity`` (+-1, one output).
        pca_dim: keep the top ``pca_dim`` principal components of the training inputs
            (fitted on the training subset after normalisation); None for raw pixels.
        whiten: divide each component by its standard deviation (needs ``pca_dim``).
        sum_mod_10: pairs of digits side by side, label ``(a + b) mod 10``.
        **kwargs: ``ImageData`` arguments (data_dir, download, n_train, n_test, val_size,
            label_noise, input_noise) and ``OverparamDataModule`` ones (batch_size, seed, ...).

    Example (YAML)::

        data:
          class_path: MnistData
          init_args: {n_train: 10000, labels: parity, pca_dim: 10, whiten: true}
    """

    train_size, test_size, num_classes = 60_000, 10_000, 10
    image_shape = (1, 28, 28)
    # Pixel statistics of the 60,000 training images / 255 (torchvision's MNIST examples).
    mean, std = (0.1307,), (0.3081,)

    def __init__(
        self,
        labels: str = "digits",
        pca_dim: Optional[int] = None,
        whiten: bool = False,
        sum_mod_10: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("data.labels", labels, LABELS)
        self.labels, self.sum_mod_10 = labels, sum_mod_10
        pixels = 28 * 28 * (2 if sum_mod_10 else 1)
        if pca_dim is not None:
            check_positive("data.pca_dim", pca_dim)
            limit = min(pixels, self.num_train - 1) if whiten else pixels
            if pca_dim > limit:
                raise ConfigError(
                    f"data.pca_dim must be at most {limit} (input pixels{', and n_train - 1 with whiten' if whiten else ''}), got {pca_dim}"
                )
        elif whiten:
            raise ConfigError("data.whiten needs data.pca_dim (whitening is done in the PCA basis)")
        self.pca_dim, self.whiten = pca_dim, whiten

    def decoded(self) -> dict[str, Batch]:
        return load_mnist(self.data_dir, self.download)

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.pca_dim is not None:
            return (self.pca_dim,)
        return (1, 28, 56) if self.sum_mod_10 else self.image_shape

    @property
    def binary(self) -> bool:
        return self.labels == "parity"

    def binary_labels(self, y: Tensor) -> Tensor:
        return torch.where(y % 2 == 0, 1.0, -1.0)

    def make_examples(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Batch:
        if not self.sum_mod_10:
            return x, y
        partner = torch.randperm(y.numel(), generator=generator)
        return torch.cat([x, x[partner]], dim=-1), (y + y[partner]) % 10  # (n, 1, 28, 56), (n,)

    def transform_inputs(self, splits: dict[str, Batch]) -> dict[str, Batch]:
        if self.pca_dim is None:
            return splits
        mean, W = pca_projection(splits["train"][0].flatten(1), self.pca_dim, self.whiten)
        mean, W = mean.to(self.dtype), W.to(self.dtype)
        return {name: ((x.flatten(1) - mean) @ W, y) for name, (x, y) in splits.items()}  # (n, pca_dim)


class MnistFC(TeacherStudent):
    """A fully connected network on MNIST: ``in_dim -> widths -> C``.

    The same network as ``TeacherStudent``'s student (``overparam.models.FullyConnected``),
    with MNIST-sized defaults. N counts every weight and bias of one member.

    Args:
        width: hidden width, one number for every layer or a list (one per layer).
            Default [500, 100]: 784-500-100-10, N = 443,610 (~450K as in the talk).
        depth: hidden layers when ``width`` is one number.
        activation: ``relu``, ``tanh``, ``gelu``, ``softplus`` or ``linear``.
        bias: biases on or off.
        **kwargs: ``Task`` arguments (loss, lr, momentum, ensemble_size, ...).
    """

    def __init__(
        self, width: Width = (500, 100), depth: int = 2, activation: str = "relu", bias: bool = True, **kwargs
    ) -> None:
        check_choice("model.activation", activation, list(ACTIVATIONS))
        super().__init__(width=list(width) if not isinstance(width, int) else width, depth=depth,
                         activation=activation, bias=bias, **kwargs)  # fmt: skip
