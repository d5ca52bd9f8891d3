"""The functional view of a task's network: what every engine works on.

A view is ``fn(params, buffers, x) -> outputs`` plus the current ``params`` and ``buffers``
(dicts of tensors). For an ensemble of K members every parameter and buffer carries a leading
member dimension and ``fn`` returns ``(K, B, C)``; ``view.member(k)`` gives the K = 1 view of
one member, whose ``fn`` returns ``(B, C)``. Engines take K = 1 views and never see a
LightningModule, so they work on any task, including third-party ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

Params = dict[str, Tensor]
NetFn = Callable[[Params, Params, Tensor], Tensor]


def module_fn(module: nn.Module) -> NetFn:
    """``fn(params, buffers, x)`` for one network, by ``torch.func.functional_call``."""

    def fn(params: Params, buffers: Params, x: Tensor) -> Tensor:
        return functional_call(module, (params, buffers), (x,))

    return fn


def ensemble_fn(single: NetFn) -> NetFn:
    """Vectorise a one-member ``fn`` over stacked params: returns ``(K, B, C)``, x shared."""
    return torch.func.vmap(single, in_dims=(0, 0, None))


@dataclass
class FunctionalView:
    """A network as a function of its parameters.

    Attributes:
        fn: ``fn(params, buffers, x) -> outputs``; ``(K, B, C)`` when ``ensemble_size > 1``.
        params: trainable tensors by name (leading dim K for ensembles).
        buffers: non-trainable state by name (BatchNorm statistics), same layout.
        ensemble_size: K.
        single_fn: the one-member function (``fn`` itself when K = 1).
    """

    fn: NetFn
    params: Params
    buffers: Params = field(default_factory=dict)
    ensemble_size: int = 1
    single_fn: NetFn | None = None

    def __post_init__(self) -> None:
        if self.single_fn is None:
            self.single_fn = self.fn

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(self.params, self.buffers, x)

    def member(self, k: int) -> "FunctionalView":
        """The K = 1 view of member ``k`` (its tensors are views into the stacked ones)."""
        if self.ensemble_size == 1:
            if k != 0:
                raise IndexError(f"member {k} of a single network")
            return self
        if not 0 <= k < self.ensemble_size:
            raise IndexError(f"member {k} outside 0..{self.ensemble_size - 1}")
        return FunctionalView(
            fn=self.single_fn,
            params={n: p[k] for n, p in self.params.items()},
            buffers={n: b[k] for n, b in self.buffers.items()},
        )

    def members(self) -> Iterator["FunctionalView"]:
        for k in range(self.ensemble_size):
            yield self.member(k)

    def detached(self) -> "FunctionalView":
        """Same view with params detached from the autograd graph (engines differentiate anew)."""
        return FunctionalView(
            fn=self.fn,
            params={n: p.detach() for n, p in self.params.items()},
            buffers=dict(self.buffers),
            ensemble_size=self.ensemble_size,
            single_fn=self.single_fn,
        )

    @property
    def num_parameters(self) -> int:
        """N per member."""
        total = sum(p.numel() for p in self.params.values())
        return total // self.ensemble_size


def stack_members(nets: list[nn.Module]) -> tuple[Params, Params, nn.Module]:
    """Stack K networks' params and buffers; returns them with a stateless template module."""
    params, buffers = stack_module_state(nets)
    template = copy.deepcopy(nets[0]).to("meta")
    return params, buffers, template


def flatten(tensors: Params) -> Tensor:
    """Concatenate a params dict into one flat vector (dict order)."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(vector: Tensor, like: Params) -> Params:
    """Split a flat vector into tensors shaped like ``like`` (dict order)."""
    out, start = {}, 0
    for name, t in like.items():
        out[name] = vector[start : start + t.numel()].view_as(t)
        start += t.numel()
    if start != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, params have {start}")
    return out
