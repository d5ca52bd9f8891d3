"""Teacher-student task: a fixed random teacher network labels Gaussian inputs.

Inputs ``x ~ N(0, I_d)`` are rescaled to the sphere ``|x| = sqrt(d)``. The teacher is a
fully connected network with its own width, depth and seed. Targets:

* ``regression``: the teacher's output (``mse``);
* ``binary``: the sign of the teacher's output, labels in {-1, +1}, one output unit;
* ``multiclass``: the argmax of a teacher with ``num_classes`` outputs;
* ``random``: labels drawn uniformly at random, independent of x (the jamming papers'
  "random data"; {-1, +1} with one output when ``num_classes`` is 2).

The P training points and the test points come from separate generators seeded by ``seed``,
so the test set does not change with P and the first P points are shared across P.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from overparam import seeds
from overparam.data import BatchSize, OverparamDataModule
from overparam.errors import ConfigError, check_choice, check_positive
from overparam.models import ACTIVATIONS, FullyConnected, Width
from overparam.task import Task

TARGETS = ("regression", "binary", "multiclass", "random")
BLOCK = 1024


class TeacherStudentData(OverparamDataModule):
    """Gaussian inputs on the sphere labelled by a random teacher network.

    Args:
        input_dim: d, the input dimension; ``width`` (on the command line and in configs) ties it
            to the model's width, d = h, as in the jamming papers' random data (Geiger et al.
            2019), so a width sweep changes both.
        num_train: P, training points.
        num_test: test points.
        num_val: validation points (0: no validation loop).
        target: one of ``regression``, ``binary``, ``multiclass``, ``random``.
        num_classes: classes for ``multiclass`` and ``random`` (2 gives binary +-1 labels).
        teacher_width, teacher_depth, teacher_activation: the teacher network.
        teacher_seed: seed of the teacher's weights (independent of the data seed).
        batch_size, eval_batch_size, seed, analysis_size, passes_per_epoch: see ``OverparamDataModule``.
    """

    def __init__(
        self,
        input_dim: Union[int, Literal["width"]] = 10,
        num_train: int = 1000,
        num_test: int = 2000,
        num_val: int = 0,
        target: str = "binary",
        num_classes: int = 2,
        teacher_width: Width = 32,
        teacher_depth: int = 1,
        teacher_activation: str = "relu",
        teacher_seed: int = 1234,
        batch_size: BatchSize = 128,
        eval_batch_size: int = 8192,
        seed: int = 0,
        analysis_size: Optional[int] = None,
        passes_per_epoch: int = 1,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed, analysis_size, passes_per_epoch)
        if input_dim == "width":
            raise ConfigError("data.input_dim: width is resolved by the overparam command from model.width; give a number here")
        check_positive("data.input_dim", input_dim)
        check_positive("data.num_train", num_train)
        check_positive("data.num_test", num_test)
        check_positive("data.num_val", num_val, allow_zero=True)
        check_choice("data.target", target, TARGETS)
        check_positive("data.teacher_width", teacher_width)
        check_positive("data.teacher_depth", teacher_depth)
        check_choice("data.teacher_activation", teacher_activation, list(ACTIVATIONS))
        if target in ("multiclass", "random"):
            check_positive("data.num_classes", num_classes - 1)
        self.input_dim, self.target, self.num_classes = input_dim, target, num_classes
        self.P, self.num_test, self.num_val = num_train, num_test, num_val
        self.teacher_width, self.teacher_depth = teacher_width, teacher_depth
        self.teacher_activation, self.teacher_seed = teacher_activation, teacher_seed

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.input_dim,)

    @property
    def num_outputs(self) -> int:
        if self.target in ("multiclass", "random") and self.num_classes > 2:
            return self.num_classes
        return 1

    @property
    def num_train(self) -> int:
        return self.P

    def teacher(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.teacher_seed)
            net = FullyConnected(self.input_dim, self.num_outputs, self.teacher_width, self.teacher_depth, self.teacher_activation)
        return net.requires_grad_(False)

    def _inputs(self, n: int, generator: torch.Generator) -> Tensor:
        # Fixed-size blocks keep the first P points the same whatever P is.
        blocks = -(-n // BLOCK)
        x = torch.cat([torch.randn(BLOCK, self.input_dim, generator=generator) for _ in range(blocks)])[:n]
        return x * (self.input_dim**0.5 / x.norm(dim=1, keepdim=True))

    def _labels(self, x: Tensor, generator: torch.Generator, teacher: nn.Module) -> Tensor:
        if self.target == "random":
            blocks = -(-x.shape[0] // BLOCK)
            labels = torch.cat([torch.randint(self.num_classes, (BLOCK,), generator=generator) for _ in range(blocks)])
            labels = labels[: x.shape[0]]
            return (2.0 * labels - 1.0) if self.num_outputs == 1 else labels
        with torch.no_grad():
            f = teacher(x)  # (n, C)
        if self.target == "regression":
            return f
        if self.target == "binary":
            return torch.where(f[:, 0] > 0, 1.0, -1.0)
        return f.argmax(1)

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        teacher = self.teacher()
        splits = {}
        for offset, (name, n) in enumerate((("train", self.P), ("test", self.num_test), ("val", self.num_val))):
            if n == 0:
                continue
            x = self._inputs(n, seeds.data_stream(self.seed, 2 * offset))
            splits[name] = (x, self._labels(x, seeds.data_stream(self.seed, 2 * offset + 1), teacher))
        return splits


class TeacherStudent(Task):
    """A fully connected student trained on teacher-student data.

    Args:
        width: hidden width, one number or a list (one per layer).
        depth: hidden layers when ``width`` is one number.
        activation: ``relu``, ``tanh``, ``gelu``, ``softplus`` or ``linear``.
        bias: biases on or off.
        **kwargs: ``Task`` arguments (loss, lr, momentum, ensemble_size, ...).
    """

    def __init__(self, width: Width = 64, depth: int = 2, activation: str = "relu", bias: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive("model.width", width)
        check_positive("model.depth", depth)
        check_choice("model.activation", activation, list(ACTIVATIONS))
        self.width, self.depth, self.activation, self.bias = width, depth, activation, bias
        self.setup_network()

    def make_network(self) -> nn.Module:
        return FullyConnected(self.in_dim, self.num_outputs, self.width, self.depth, self.activation, self.bias)
