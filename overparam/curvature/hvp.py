"""Per-batch Hessian-vector products, three ways, behind one function.

For the summed batch loss ``L_B(theta) = sum_{i in B} l(f(theta; x_i), y_i)`` the product
``H_B v = d/dt grad L_B(theta + t v) |_{t=0}`` is computed by

* ``forward_over_reverse``: ``torch.func.jvp(grad(L_B), (theta,), (v,))`` -- a forward-mode
  derivative of the reverse-mode gradient (Pearlmutter 1994; the ``torch.func.hessian`` docs'
  recommended composition). About 2-4x a gradient.
* ``compiled``: the same function under ``torch.compile``. Dynamo fails on some models (it did
  on a CNN in issue 4's measurement); any failure falls back to eager with a warning.
* ``double_backward``: ``autograd.grad(<grad L_B, v>, theta)`` with ``create_graph``, for ops
  that lack forward-mode AD (the fallback the ``torch.func.hessian`` docs name).

``mode="auto"`` times each candidate on one batch (``probe_hvp_modes``) and keeps the fastest;
the choice is made once per operator and can be fixed by passing the mode.
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


def forward_over_reverse(batch_loss: BatchLoss) -> BatchHVP:
    """``hvp(params, v, x, y)`` by ``jvp`` of ``grad`` (torch.func)."""
    grad_fn = torch.func.grad(batch_loss)

    def hvp(params: Params, v: Params, x: Tensor, y: Tensor) -> Params:
        return torch.func.jvp(lambda p: grad_fn(p, x, y), (params,), (v,))[1]

    return hvp


def double_backward(batch_loss: BatchLoss) -> BatchHVP:
    """``hvp(params, v, x, y)`` by reverse over reverse (``autograd.grad`` twice)."""

    def hvp(params: Params, v: Params, x: Tensor, y: Tensor) -> Params:
        names = list(params)
        leaves = [params[n].detach().requires_grad_(True) for n in names]
        with torch.enable_grad():
            loss = batch_loss(dict(zip(names, leaves)), x, y)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True, materialize_grads=True)
            # A gradient that does not depend on theta (a piecewise-linear loss, a linear layer's
            # bias) has no graph: its rows of H are zero.
            live = [i for i, g in enumerate(grads) if g.requires_grad]
            out = [torch.zeros_like(t) for t in leaves]
            if live:
                hv = torch.autograd.grad(
                    [grads[i] for i in live],
                    leaves,
                    grad_outputs=[v[names[i]] for i in live],
                    allow_unused=True,
                    materialize_grads=True,
                )
                out = list(hv)
        return {n: t.detach() for n, t in zip(names, out)}

    return hvp


class _CompiledWithFallback:
    """``torch.compile(forward_over_reverse)``; on the first failure, eager for good."""

    def __init__(self, batch_loss: BatchLoss) -> None:
        self.eager = forward_over_reverse(batch_loss)
        self.compiled = torch.compile(self.eager, dynamic=False)
        self.failed: Optional[str] = None

    def __call__(self, params: Params, v: Params, x: Tensor, y: Tensor) -> Params:
        if self.failed is None:
            try:
                return self.compiled(params, v, x, y)
            except Exception as exc:  # Dynamo/Inductor errors have no common base class
                self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                warnings.warn(f"torch.compile of the HVP failed ({self.failed}); using eager forward-over-reverse")
        return self.eager(params, v, x, y)


def make_batch_hvp(batch_loss: BatchLoss, mode: str) -> BatchHVP:
    """The per-batch HVP function of a fixed ``mode`` (not ``auto``)."""
    if mode == "forward_over_reverse":
        return forward_over_reverse(batch_loss)
    if mode == "double_backward":
        return double_backward(batch_loss)
    if mode == "compiled":
        return _CompiledWithFallback(batch_loss)
    raise ValueError(f"hvp mode must be one of {', '.join(HVP_MODES[1:])}; got {mode!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(call: Callable[[], object], device: torch.device, repeats: int = 2) -> float:
    """Seconds of the fastest of ``repeats`` calls (after one warm-up call)."""
    call()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def probe_hvp_modes(
    batch_loss: BatchLoss,
    params: Params,
    x: Tensor,
    y: Tensor,
    candidates: tuple[str, ...] = ("forward_over_reverse", "double_backward"),
    repeats: int = 1,
) -> tuple[str, dict[str, float]]:
    """Time each candidate HVP on one batch; return the fastest mode and all timings.

    A mode that raises (no forward-mode AD for some op) or whose compilation fell back is
    recorded as ``inf``. Warm-up calls absorb compilation time, which is paid once.
    """
    best, timings, _ = _probe(batch_loss, params, x, y, candidates, repeats)
    return best, timings


def _probe(batch_loss, params, x, y, candidates, repeats):
    """``probe_hvp_modes`` that also returns the built functions (a compiled one is reused)."""
    device = next(iter(params.values())).device
    v = {n: torch.randn_like(p) for n, p in params.items()}
    timings: dict[str, float] = {}
    built: dict[str, BatchHVP] = {}
    for mode in candidates:
        hvp = built[mode] = make_batch_hvp(batch_loss, mode)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                seconds = time_call(lambda: hvp(params, v, x, y), device, repeats)
            timings[mode] = float("inf") if getattr(hvp, "failed", None) else seconds
        except Exception:  # an op without forward-mode AD, a Dynamo error: not a candidate
            timings[mode] = float("inf")
    best = min(timings, key=timings.get)
    if timings[best] == float("inf"):
        raise RuntimeError(f"no HVP mode works on this model: tried {', '.join(candidates)}")
    return best, timings, built


def default_candidates(device: torch.device, compile: Optional[bool] = None) -> tuple[str, ...]:
    """Modes ``auto`` tries: compiled only on CUDA by default (CPU compile costs minutes, gains little)."""
    use_compile = device.type == "cuda" if compile is None else compile
    modes = ("forward_over_reverse", "double_backward")
    return (("compiled",) + modes) if use_compile else modes
