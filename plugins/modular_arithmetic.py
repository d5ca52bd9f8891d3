"""Modular arithmetic: the algorithmic data sets of grokking, as token sequences.

For a modulus p and an operation o, the data set is every equation ``a o b = c (mod p)`` with
0 <= a, b < p (for ``div``, b != 0): p^2 pairs, or p (p - 1) for division. Operations
(Power et al. 2022, "Grokking: generalization beyond overfitting on small algorithmic
datasets", Table 1):

* ``add``: c = a + b mod p;  ``sub``: c = a - b mod p;  ``mul``: c = a b mod p;
* ``div``: c = a b^(-1) mod p, with b^(-1) = b^(p-2) mod p (Fermat; p must be prime).

Each equation is the sequence of T = 4 tokens ``a, o, b, =`` (ids 0..p-1 for the residues,
p for the operation, p + 1 for ``=``: ``vocab_size = p + 2``), and its class is c, one of
C = p. A seeded random ``train_fraction`` of the equations is the training set (P of them);
the rest are held out. Power et al. call their accuracy "validation accuracy" and measure it
all along training: with ``validate`` (default) the held-out equations are the ``val`` split,
evaluated at every epoch's end, and always the ``test`` split.

The data are synthetic and tiny (9,409 equations at p = 97), so they are made in
``load_splits`` with no files, and live on the device like every other DataModule's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from overparam import seeds
from overparam.data import Batch, BatchSize, OverparamDataModule
from overparam.errors import ConfigError, check_choice

OPERATIONS = ("add", "sub", "mul", "div")
#: Tokens per equation: a, the operation, b, "=".
SEQUENCE_LENGTH = 4


def is_prime(n: int) -> bool:
    """Trial division (p is at most a few hundred here)."""
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def equations(p: int, operation: str) -> tuple[Tensor, Tensor]:
    """Every equation of ``operation`` modulo ``p``: tokens ``(n, 4)`` and answers ``(n,)`` (int64).

    Ordered by a, then b (a-major), the order the seeded split permutes.
    """
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).T  # (p^2,), (p^2,)
    if operation == "div":
        a, b = a[b != 0], b[b != 0]
    if operation == "add":
        c = (a + b) % p
    elif operation == "sub":
        c = (a - b) % p  # torch's % takes the sign of the divisor: 0 <= c < p
    elif operation == "mul":
        c = (a * b) % p
    else:
        inverse = torch.tensor([pow(int(v), p - 2, p) for v in range(p)])  # inverse[0] unused
        c = (a * inverse[b]) % p
    x = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], 1)  # (n, 4)
    return x, c


class ModularArithmetic(OverparamDataModule):
    """All equations ``a o b = c (mod p)``, a seeded fraction for training, the rest held out.

    Args:
        p: the modulus (default 97, Power et al.'s; Nanda et al. 2023 use 113). Prime for ``div``.
        operation: ``add`` (default), ``sub``, ``mul`` or ``div``.
        train_fraction: share of the equations in the training set, in (0, 1); P is
            ``round(train_fraction * n)`` (default 0.3, Nanda et al. 2023's).
        validate: the held-out equations are also the ``val`` split, evaluated at every
            epoch's end (Power et al.'s validation accuracy through training). Default true.
        batch_size: default 512, Power et al.'s (``full``: Nanda et al.'s full-batch training).
        eval_batch_size, seed, analysis_size, passes_per_epoch: see ``OverparamDataModule``;
            ``seed`` draws the split and the batch order.

    Example (YAML)::

        data:
          class_path: ModularArithmetic
          init_args: {p: 59, operation: add, train_fraction: 0.4, batch_size: full, passes_per_epoch: 50}
    """

    def __init__(
        self,
        p: int = 97,
        operation: str = "add",
        train_fraction: float = 0.3,
        validate: bool = True,
        batch_size: BatchSize = 512,
        eval_batch_size: int = 8192,
        seed: int = 0,
        analysis_size: Optional[int] = None,
        passes_per_epoch: int = 1,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed, analysis_size, passes_per_epoch)
        if isinstance(p, bool) or not isinstance(p, int) or p < 2:
            raise ConfigError(f"data.p must be an integer >= 2, got {p!r}")
        check_choice("data.operation", operation, OPERATIONS)
        if operation == "div" and not is_prime(p):
            raise ConfigError(f"data.p must be prime for operation div (b has an inverse mod p for every b != 0), got {p}")
        if isinstance(train_fraction, bool) or not 0.0 < train_fraction < 1.0:
            raise ConfigError(f"data.train_fraction must be in (0, 1), got {train_fraction!r}")
        self.p, self.operation, self.train_fraction, self.validate = p, operation, train_fraction, validate
        n = self.num_equations
        if not 0 < self.num_train < n:
            raise ConfigError(
                f"data.train_fraction {train_fraction} leaves {self.num_train} of the {n} equations for training; "
                "both the training and the held-out set need at least one"
            )

    @property
    def num_equations(self) -> int:
        """p^2 (p (p - 1) for ``div``)."""
        return self.p * (self.p - 1) if self.operation == "div" else self.p**2

    @property
    def vocab_size(self) -> int:
        """Token ids 0..p+1: the p residues, the operation, ``=``."""
        return self.p + 2

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (SEQUENCE_LENGTH,)

    @property
    def num_outputs(self) -> int:
        return self.p

    @property
    def num_train(self) -> int:
        return round(self.train_fraction * self.num_equations)

    def load_splits(self) -> dict[str, Batch]:
        x, y = equations(self.p, self.operation)
        order = torch.randperm(x.shape[0], generator=seeds.data_stream(self.seed, 97))
        train, held_out = order[: self.num_train], order[self.num_train :].sort().values
        splits = {"train": (x[train], y[train]), "test": (x[held_out], y[held_out])}
        if self.validate:
            splits["val"] = splits["test"]
        return splits
