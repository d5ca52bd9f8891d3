"""ModularArithmetic: every equation by hand, the seeded split, the splits and batch sizes, errors."""

from __future__ import annotations

import pytest
import torch

from overparam.data import resolve_batch_size
from overparam.errors import ConfigError
from overparam.plugins.modular_arithmetic import ModularArithmetic, equations, is_prime


@pytest.mark.parametrize(
    "operation, answer",
    [
        ("add", lambda a, b, p: (a + b) % p),
        ("sub", lambda a, b, p: (a - b) % p),  # Python's % is non-negative for p > 0
        ("mul", lambda a, b, p: (a * b) % p),
        ("div", lambda a, b, p: next(c for c in range(p) if (c * b) % p == a)),  # c b = a (mod p)
    ],
)
def test_every_equation_by_hand(operation, answer):
    p = 7
    x, y = equations(p, operation)
    pairs = [(a, b) for a in range(p) for b in range(p) if operation != "div" or b != 0]
    assert x.shape == (len(pairs), 4) and y.shape == (len(pairs),) and x.dtype == y.dtype == torch.int64
    for row, label, (a, b) in zip(x.tolist(), y.tolist(), pairs):
        assert row == [a, p, b, p + 1], "tokens: a, the operation (p), b, = (p + 1)"
        assert label == answer(a, b, p), (operation, a, b)


def test_split_is_seeded_disjoint_and_complete():
    data = ModularArithmetic(p=11, train_fraction=0.3, seed=4)
    splits = data.load_splits()
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    assert x_train.shape[0] == data.num_train == round(0.3 * 121) == 36 and x_test.shape[0] == 121 - 36
    assert splits["val"][0] is x_test, "the held-out equations are the val split too"
    seen = {tuple(r) for r in x_train.tolist()} | {tuple(r) for r in x_test.tolist()}
    assert len(seen) == 121, "train and held-out are disjoint and cover every equation"
    again = ModularArithmetic(p=11, train_fraction=0.3, seed=4).load_splits()
    assert torch.equal(again["train"][0], x_train) and torch.equal(again["train"][1], y_train)
    other = ModularArithmetic(p=11, train_fraction=0.3, seed=5).load_splits()
    assert not torch.equal(other["train"][0], x_train), "another seed draws another split"
    assert "val" not in ModularArithmetic(p=11, validate=False).load_splits()


def test_shapes_known_from_init_arguments():
    data = ModularArithmetic(p=97, operation="div", train_fraction=0.5)
    assert data.input_shape == (4,) and data.num_outputs == 97 and data.vocab_size == 99
    assert data.num_equations == 97 * 96 and data.num_train == 4656
    assert data.in_dim == 4


def test_device_resident_batches_and_full_batch():
    data = ModularArithmetic(p=5, train_fraction=0.6, batch_size="full")
    data.setup()
    x, y = data.split("train")
    assert data.current_batch_size() == resolve_batch_size("full", 15) == 15
    (block,) = list(data.train_dataloader())
    assert len(block) == 1 and block[0].whole_train_set and block[0].global_size == 15
    assert x.dtype == torch.int64, "tokens stay integers (only floating inputs take the training dtype)"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p": 1}, "data.p must be an integer >= 2, got 1"),
        ({"p": 9, "operation": "div"}, "data.p must be prime for operation div"),
        ({"operation": "pow"}, "data.operation must be one of add, sub, mul, div"),
        ({"train_fraction": 1.0}, r"data.train_fraction must be in \(0, 1\)"),
        ({"train_fraction": 0.0}, r"data.train_fraction must be in \(0, 1\)"),
        ({"p": 2, "train_fraction": 0.1}, "leaves 0 of the 4 equations for training"),
    ],
)
def test_bad_arguments_name_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModularArithmetic(**kwargs)


def test_is_prime():
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
