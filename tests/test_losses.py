"""Each loss against a hand computation; margins, errors; squared hinge's zero gradient."""

import math

import pytest
import torch

from overparam.losses import cross_entropy, errors, get_loss, hinge, margins, mse, squared_hinge


def test_binary_margins_and_losses_by_hand():
    f = torch.tensor([[2.0], [0.5], [-1.0]])
    y = torch.tensor([1.0, 1.0, 1.0])
    assert margins(f, y).tolist() == [2.0, 0.5, -1.0]
    # 1/2 max(0, 1 - m)^2: 0, 1/2 * 0.25, 1/2 * 4
    assert squared_hinge(f, y, "none").tolist() == [0.0, 0.125, 2.0]
    assert hinge(f, y, "none").tolist() == [0.0, 0.5, 2.0]
    expected = [math.log1p(math.exp(-m)) for m in (2.0, 0.5, -1.0)]
    assert cross_entropy(f, y, "none").tolist() == pytest.approx(expected)
    assert errors(f, y).tolist() == [0.0, 0.0, 1.0]


def test_multiclass_margin_is_f_y_minus_best_other():
    f = torch.tensor([[3.0, 1.0, 2.5], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 2])
    assert margins(f, y).tolist() == pytest.approx([0.5, -1.0])
    assert squared_hinge(f, y).item() == pytest.approx((0.5 * 0.25 + 0.5 * 4.0) / 2)
    assert errors(f, y).tolist() == [0.0, 1.0]


def test_cross_entropy_multiclass_by_hand():
    f = torch.tensor([[1.0, 2.0, 3.0]])
    y = torch.tensor([1])
    expected = -2.0 + math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert cross_entropy(f, y).item() == pytest.approx(expected)


def test_mse_one_hot_and_regression():
    f = torch.tensor([[0.5, -0.5]])
    assert mse(f, torch.tensor([0])).item() == pytest.approx(0.5 * (0.25 + 0.25))
    assert mse(f, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(0.5 * (0.25 + 2.25))
    assert mse(torch.tensor([[0.5]]), torch.tensor([-1.0])).item() == pytest.approx(0.5 * 2.25)


def test_squared_hinge_gradient_vanishes_on_satisfied_constraints():
    f = torch.tensor([[1.5], [1.0], [0.3]], requires_grad=True)
    y = torch.tensor([1.0, 1.0, 1.0])
    squared_hinge(f, y, "sum").backward()
    assert f.grad[:2].abs().max().item() == 0.0
    assert f.grad[2].item() == pytest.approx(-(1 - 0.3))


def test_losses_accept_a_member_dimension():
    f = torch.randn(3, 5, 4)  # (K, B, C)
    y = torch.randint(4, (5,))
    per_member = squared_hinge(f, y, "none")
    assert per_member.shape == (3, 5)
    assert torch.allclose(per_member[1], squared_hinge(f[1], y, "none"))


def test_unknown_loss_names_allowed():
    with pytest.raises(ValueError, match="allowed: cross_entropy, squared_hinge, hinge, mse"):
        get_loss("l1")
