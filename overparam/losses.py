"""Losses, margins and 0/1 errors shared by every task and engine.

Target conventions (one per output layout, so a loss never guesses):

* classification with C >= 2 outputs: ``y`` holds class indices (long, shape ``(B,)``);
* binary classification with C = 1 output: ``y`` holds labels in {-1, +1} (float, ``(B,)``);
* regression: ``y`` is a float tensor with the outputs' shape ``(B, C)``.

Every loss returns per-sample values (``reduction="none"``), their mean or their sum, so
engines can form sums over shards and divide by P last (exact under DDP).

The margin of a sample is ``y f`` for binary outputs and ``f_y - max_{j != y} f_j`` for
multi-class outputs; a constraint is satisfied when the margin is at least 1
(Spigler et al. 2018, "A jamming transition from under- to over-parametrization").
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["none", "mean", "sum"]
LOSS_NAMES = ("cross_entropy", "squared_hinge", "hinge", "mse")


def _reduce(values: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def is_binary(outputs: Tensor) -> bool:
    """One output unit means binary labels in {-1, +1}."""
    return outputs.shape[-1] == 1


def margins(outputs: Tensor, y: Tensor) -> Tensor:
    """Per-sample margin: ``y f`` (binary) or ``f_y - max_{j != y} f_j`` (multi-class).

    Args:
        outputs: ``(..., B, C)`` network outputs.
        y: ``(B,)`` labels (in {-1, +1} for C = 1, class indices otherwise).

    Returns:
        ``(..., B)`` margins.
    """
    if is_binary(outputs):
        return outputs[..., 0] * y.to(outputs.dtype)
    index = y.long().expand(outputs.shape[:-1]).unsqueeze(-1)
    f_y = outputs.gather(-1, index).squeeze(-1)
    others = outputs.scatter(-1, index, float("-inf"))
    return f_y - others.amax(-1)


def cross_entropy(outputs: Tensor, y: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Softmax cross-entropy; the logistic loss ``log(1 + exp(-y f))`` for one output."""
    if is_binary(outputs):
        return _reduce(F.softplus(-margins(outputs, y)), reduction)
    flat = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), y.long().expand(outputs.shape[:-1]).reshape(-1), reduction="none")
    return _reduce(flat.reshape(outputs.shape[:-1]), reduction)


def squared_hinge(outputs: Tensor, y: Tensor, reduction: Reduction = "mean") -> Tensor:
    """``1/2 max(0, 1 - margin)^2``: zero gradient on satisfied constraints (margin >= 1)."""
    return _reduce(0.5 * F.relu(1.0 - margins(outputs, y)).square(), reduction)


def hinge(outputs: Tensor, y: Tensor, reduction: Reduction = "mean") -> Tensor:
    """``max(0, 1 - margin)``."""
    return _reduce(F.relu(1.0 - margins(outputs, y)), reduction)


def mse(outputs: Tensor, y: Tensor, reduction: Reduction = "mean") -> Tensor:
    """``1/2 |f - y|^2`` summed over outputs; class labels are one-hot (+-1 for binary) targets."""
    if y.dtype.is_floating_point and y.shape[-1:] == outputs.shape[-1:] and y.dim() >= 2:
        target = y.to(outputs.dtype)
    elif is_binary(outputs):
        target = y.to(outputs.dtype).unsqueeze(-1)
    else:
        target = F.one_hot(y.long(), outputs.shape[-1]).to(outputs.dtype)
    return _reduce(0.5 * (outputs - target).square().sum(-1), reduction)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "cross_entropy": cross_entropy,
    "squared_hinge": squared_hinge,
    "hinge": hinge,
    "mse": mse,
}


def get_loss(name: str) -> Callable[..., Tensor]:
    """The loss function called ``name``.

    Raises:
        ValueError: for an unknown name, listing the allowed ones.
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(LOSS_NAMES)}") from None


def is_regression_target(y: Tensor) -> bool:
    """Regression targets are float tensors with an output dimension."""
    return y.dtype.is_floating_point and y.dim() >= 2


def errors(outputs: Tensor, y: Tensor) -> Tensor:
    """Per-sample 0/1 classification error as floats: ``margin <= 0``.

    Ties count as errors, as in the jamming papers (y f <= 0 is a mistake). For regression
    targets the sign of each output is compared instead, so the error of a teacher-student
    regression is the disagreement of signs.
    """
    if is_regression_target(y):
        return (torch.sign(outputs) != torch.sign(y.to(outputs.dtype))).to(outputs.dtype).mean(-1)
    return (margins(outputs, y) <= 0).to(outputs.dtype)
