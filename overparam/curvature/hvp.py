"""Per-batch Hessian-vector products, three ways, and the choice among them.

For the summed batch loss ``L_B(theta) = sum_{i in B} l(f(theta; x_i), y_i)`` the product
``H_B v = d/dt grad L_B(theta + t v) |_{t=0}`` is computed by

* ``forward_over_reverse``: ``torch.func.jvp(grad(L_B), (theta,), (v,))`` -- a forward-mode
  derivative of the reverse-mode gradient (Pearlmutter 1994; the ``torch.func.hessian`` docs'
  recommended composition). About 2-4x a gradient.
* ``compiled``: the same function under ``torch.compile``. Dynamo fails on some models (it did
  on a CNN in issue 4's measurement); a Dynamo/Inductor error falls back to eager with a warning.
* ``double_backward``: ``autograd.grad(<grad L_B, v>, theta)`` with ``create_graph``, for ops
  that lack forward-mode AD (the fallback the ``torch.func.hessian`` docs name). The gradient's
  graph is kept per batch (within a memory budget), so each product after the first is one
  backward pass: 1.3-1.6x a gradient on CPU instead of 2.5-3.2x.

``mode="auto"`` (``HVPChooser``) chooses while it works: the operator's first products are each
computed by the next candidate and timed, and the fastest is kept from then on, so choosing
costs no extra product (the old probe spent two products per candidate before the first one),
only the difference between the candidates on the products they compute.

Only the failures a fallback exists for are caught: an op without forward-mode AD
(``missing_forward_ad``: PyTorch's ``NotImplementedError`` "Trying to use forward AD with ...",
a custom ``autograd.Function`` without ``jvp``) and a Dynamo/Inductor error
(``torch._dynamo.exc.TorchDynamoException``). Any other error -- a label out of range, a shape
mismatch -- passes through with its own message.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from overparam.functional import Params

HVP_MODES = ("auto", "forward_over_reverse", "compiled", "double_backward")
BatchLoss = Callable[[Params, Tensor, Tensor], Tensor]
BatchHVP = Callable[[Params, Params, Tensor, Tensor], Params]

#: What PyTorch says when forward-mode AD is missing: builtin ops ("Trying to use forward AD with
#: ..."), a custom Function's default ``jvp`` ("... to use it with forward mode AD."), and
#: torch.func for a Function without ``setup_context`` ("... with functorch transforms ...").
_FORWARD_AD_MESSAGES = ("forward AD", "forward mode AD", "functorch transforms")


def missing_forward_ad(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch saying an op has no forward-mode derivative."""
    return isinstance(exc, (NotImplementedError, RuntimeError)) and any(m in str(exc) for m in _FORWARD_AD_MESSAGES)


def forward_over_reverse(batch_loss: BatchLoss) -> BatchHVP:
    """``hvp(params, v, x, y)`` by ``jvp`` of ``grad`` (torch.func)."""
    grad_fn = torch.func.grad(batch_loss)

    def hvp(params: Params, v: Params, x: Tensor, y: Tensor) -> Params:
        return torch.func.jvp(lambda p: grad_fn(p, x, y), (params,), (v,))[1]

    return hvp


#: Bytes of saved tensors ``double_backward`` may keep for its gradient graphs (all batches).
#: Default 1 GiB: the benchmark's MLP (N = 545,810, 2,048 samples) keeps 16 MiB, its CNN 37 MiB.
DEFAULT_CACHE_BYTES = 1 << 30


class double_backward:
    """``hvp(params, v, x, y)`` by reverse over reverse, keeping each batch's gradient graph.

    The gradient ``g = grad L_B`` is built once per batch with ``create_graph`` and kept while the
    saved tensors of all kept graphs stay under ``cache_bytes``; each product is then one backward
    pass through it, ``autograd.grad(g, theta, v, retain_graph=True)``: the linearisation point
    is fixed, so its forward and first backward are paid once. Measured (benchmarks/hessian.py,
    CPU, one thread): 1.64x a gradient on the MLP and 1.31x on the CNN instead of 2.51x and 3.20x
    when they are recomputed. A batch beyond the budget is recomputed at every product.

    The graph belongs to the params it was built at (an in-place change of them makes autograd
    raise) and to the batch tensors (cached by identity): a ``CurvatureOperator`` holds both
    fixed.

    Args:
        batch_loss: ``(params, x, y) -> summed loss`` of one batch.
        cache_bytes: budget for the kept graphs (0: keep none, recompute every time).
    """

    def __init__(self, batch_loss: BatchLoss, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.batch_loss, self.cache_bytes = batch_loss, cache_bytes
        self.cached_bytes = 0
        self._graphs: dict[tuple[int, int, int], tuple] = {}

    def _build(self, params: Params, x: Tensor, y: Tensor) -> tuple[tuple, int]:
        """``(names, leaves, live, grads)`` of ``grad L_B`` with its graph, and its saved bytes."""
        names = list(params)
        leaves = [params[n].detach().requires_grad_(True) for n in names]
        storages: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.batch_loss(dict(zip(names, leaves)), x, y)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True, materialize_grads=True)
        # A gradient that does not depend on theta (a piecewise-linear loss, a linear layer's
        # bias) has no graph: its rows of H are zero.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        return (names, leaves, live, grads), sum(storages.values())

    def _graph(self, params: Params, x: Tensor, y: Tensor) -> tuple:
        key = (id(params), id(x), id(y))
        entry = self._graphs.get(key)
        if entry is not None and entry[0] is params and entry[1] is x and entry[2] is y:
            return entry[3]
        graph, nbytes = self._build(params, x, y)
        if self.cached_bytes + nbytes <= self.cache_bytes:
            self._graphs[key] = (params, x, y, graph)
            self.cached_bytes += nbytes
        return graph

    def __call__(self, params: Params, v: Params, x: Tensor, y: Tensor) -> Params:
        names, leaves, live, grads = self._graph(params, x, y)
        out = [torch.zeros_like(t) for t in leaves]
        if live:
            out = torch.autograd.grad(
                [grads[i] for i in live],
                leaves,
                grad_outputs=[v[names[i]] for i in live],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
        return {n: t.detach() for n, t in zip(names, out)}


class _CompiledWithFallback:
    """``torch.compile(forward_over_reverse)``; on a Dynamo/Inductor error, eager for good.

    Attributes:
        failed: the compile error that made it fall back (None while compiled works).
    """

    def __init__(self, batch_loss: BatchLoss) -> None:
        self.eager = forward_over_reverse(batch_loss)
        self.compiled = torch.compile(self.eager, dynamic=False)
        self.failed: Optional[BaseException] = None

    def __call__(self, params: Params, v: Params, x: Tensor, y: Tensor) -> Params:
        if self.failed is None:
            try:
                return self.compiled(params, v, x, y)
            except torch._dynamo.exc.TorchDynamoException as exc:
                self.failed = exc
                first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
                warnings.warn(f"torch.compile of the HVP failed ({type(exc).__name__}: {first_line}); using eager forward-over-reverse")
        return self.eager(params, v, x, y)


def make_batch_hvp(batch_loss: BatchLoss, mode: str, cache_bytes: int = DEFAULT_CACHE_BYTES) -> BatchHVP:
    """The per-batch HVP function of a fixed ``mode`` (not ``auto``); ``cache_bytes`` as ``double_backward``."""
    if mode == "forward_over_reverse":
        return forward_over_reverse(batch_loss)
    if mode == "double_backward":
        return double_backward(batch_loss, cache_bytes)
    if mode == "compiled":
        return _CompiledWithFallback(batch_loss)
    raise ValueError(f"hvp mode must be one of {', '.join(HVP_MODES[1:])}; got {mode!r}")


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (a timer must not stop before it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HVPChooser:
    """``mode="auto"``: the per-batch HVP that picks the fastest path while computing products.

    Product i of the operator is computed by ``schedule[i]``: each candidate once, timed, after
    an untimed first product for those whose first call costs more than the rest (``compiled``
    compiles, ``double_backward`` builds the graphs it keeps); the operator reports each
    product's wall time with ``record``. After the schedule the fastest mode is ``mode`` for
    good. A candidate that fails for lack of forward-mode AD is marked ``inf`` and the product
    goes on with the next candidate; the schedule's length never changes, so under DDP every
    rank reaches the choice (a broadcast of rank 0's) at the same product.

    Args:
        batch_loss: ``(params, x, y) -> summed loss`` of one batch.
        candidates: modes to try, in order.
        cache_bytes: ``double_backward``'s graph budget.

    Attributes:
        mode: the chosen mode (None while choosing).
        timings: seconds of one whole product per candidate (``inf``: failed).
        failures: the exception that ruled each failed candidate out.
    """

    def __init__(self, batch_loss: BatchLoss, candidates: tuple[str, ...], cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.built = {mode: make_batch_hvp(batch_loss, mode, cache_bytes) for mode in candidates}
        warm_up = [(m, False) for m in candidates if m in ("compiled", "double_backward")]
        self.schedule = warm_up + [(m, True) for m in candidates]
        self.timings: dict[str, float] = {}
        self.failures: dict[str, BaseException] = {}
        self.mode: Optional[str] = None
        self._product = 0
        self._used: set[str] = set()

    def _current(self) -> str:
        if self.mode is not None:
            return self.mode
        scheduled = self.schedule[self._product][0]
        if scheduled not in self.failures:
            return scheduled
        return next(m for m in self.built if m not in self.failures)

    def __call__(self, params: Params, v: Params, x: Tensor, y: Tensor) -> Params:
        mode = self._current()
        self._used.add(mode)
        try:
            return self.built[mode](params, v, x, y)
        except (NotImplementedError, RuntimeError) as exc:
            if self.mode is not None or not missing_forward_ad(exc):
                raise
            self.failures[mode], self.timings[mode] = exc, float("inf")
            if len(self.failures) == len(self.built):
                raise RuntimeError(f"no HVP mode works on this model: tried {', '.join(self.built)}") from exc
            return self(params, v, x, y)

    def record(self, seconds: float) -> None:
        """Wall time of the product just computed (all batches); chooses after the schedule."""
        if self.mode is not None:
            return
        mode, timed = self.schedule[self._product]
        compile_failed = getattr(self.built[mode], "failed", None) is not None
        if timed and self._used == {mode}:
            self.timings[mode] = float("inf") if compile_failed else seconds
        self._product += 1
        self._used = set()
        if self._product == len(self.schedule):
            self.mode = self._choose()

    def _choose(self) -> str:
        working = [m for m in self.built if m not in self.failures]
        best = min(working, key=lambda m: self.timings.get(m, float("inf")))
        # Under DDP the ranks' timings differ: rank 0's choice wins (an empty shard times nothing).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            choice = [best]
            torch.distributed.broadcast_object_list(choice, src=0)
            best = choice[0]
        return best


def default_candidates(device: torch.device, compile: Optional[bool] = None) -> tuple[str, ...]:
    """Modes ``auto`` tries: compiled only on CUDA by default (CPU compile costs minutes, gains little)."""
    use_compile = device.type == "cuda" if compile is None else compile
    modes = ("forward_over_reverse", "double_backward")
    return (("compiled",) + modes) if use_compile else modes


def timed_product(product: Callable[[], Tensor], device: torch.device) -> tuple[Tensor, float]:
    """``(product(), seconds)``, the device synchronised before the clock stops."""
    start = time.perf_counter()
    out = product()
    _sync(device)
    return out, time.perf_counter() - start
