"""Parameter blocks: a curvature operator restricted to a subset of the parameters.

Partition the N parameters into blocks b with index sets I_b (N_b = |I_b|) and let E_b be the
N x N_b matrix of the unit vectors of I_b. The diagonal block of a symmetric operator A is

    A_bb = E_b^T A E_b   (N_b x N_b),

the curvature of the loss in block b's parameters with every other parameter held fixed; one
product with it is one product with A, ``A_bb v = (A E_b v)[I_b]``, so every algorithm of this
package (Lanczos, SLQ, Hutchinson) runs on a block unchanged. The block-diagonal approximation
A_D = diag(A_11, ..., A_BB) has as its spectrum the union of the blocks' spectra, so

* its top-k is the merge of the blocks' top-k (``merge_top_k``),
* its spectral density is phi_D = sum_b (N_b / N) phi_b, the SLQ rules of the blocks with each
  weight scaled by N_b / N (``block_diagonal_slq``), and
* tr A_D = sum_b tr A_bb = tr A (the diagonal of A lies in the diagonal blocks).

Comparing A_D's spectrum with A's shows how much the coupling between blocks (the off-diagonal
blocks) shapes the spectrum: per-layer Hessians are PyHessian's most-requested feature (its
issue #10), and the heterogeneity of the blocks' spectra is the argument of Zhang et al. (2024,
"Why transformers need Adam: a Hessian perspective").

Blocks are chosen by shell-style globs on the parameter names of the functional view (``fnmatch``:
``{"hidden": "layers.1.*", "head": ["layers.3.*"]}``), or one block per module (``"layers"``:
the parameters that share a module path, e.g. ``layers.1.weight`` and ``layers.1.bias``).
"""

from __future__ import annotations

import fnmatch
from typing import Mapping, Sequence, Union

import torch
from torch import Tensor

from overparam.curvature.slq import SLQResult
from overparam.functional import Params

#: ``blocks`` value for one block per module (parameters grouped by their module path).
LAYERS = "layers"
#: The block that collects the parameters no glob matched.
REST = "rest"
BlockSpec = Union[str, Mapping[str, Union[str, Sequence[str]]]]


def parameter_blocks(names: Sequence[str], spec: BlockSpec) -> dict[str, list[str]]:
    """Partition parameter ``names`` into named blocks (each name in exactly one block).

    Args:
        names: parameter names in the functional view's order (``view.params``).
        spec: ``"layers"`` (one block per module path, named by it; a parameter without a module
            is its own block), or ``{block: glob or [globs]}`` matched with ``fnmatch.fnmatchcase``.
            Parameters no glob matches form one more block, ``"rest"``, so the blocks always
            cover all N parameters (the block-diagonal spectrum needs that).

    Returns:
        ``{block: [parameter names]}``, blocks in the order given (``rest`` last), names in
        ``names``' order.

    Raises:
        ValueError: a glob that matches nothing, a parameter matched by two blocks, a block named
            ``rest`` while some parameters are unmatched, or an unknown string spec; each message
            lists the parameter names.
    """
    if isinstance(spec, str):
        if spec != LAYERS:
            raise ValueError(f"blocks must be {LAYERS!r} or a mapping of block names to globs; got {spec!r}")
        blocks: dict[str, list[str]] = {}
        for name in names:
            blocks.setdefault(name.rpartition(".")[0] or name, []).append(name)
        return blocks
    if not spec:
        raise ValueError("blocks must name at least one block")
    owner: dict[str, str] = {}
    blocks = {}
    for block, globs in spec.items():
        patterns = [globs] if isinstance(globs, str) else list(globs)
        matched = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not matched:
            raise ValueError(f"block {block!r}: {patterns} matches no parameter; parameters: {_listing(names)}")
        for n in matched:
            if n in owner:
                raise ValueError(f"parameter {n!r} is in two blocks, {owner[n]!r} and {block!r}; blocks must not overlap")
            owner[n] = block
        blocks[block] = matched
    rest = [n for n in names if n not in owner]
    if rest:
        if REST in blocks:
            raise ValueError(f"block name {REST!r} is taken by the unmatched parameters ({_listing(rest)}); rename the block")
        blocks[REST] = rest
    return blocks


def _listing(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def block_indices(params: Params, names: Sequence[str]) -> Tensor:
    """Positions of the parameters ``names`` in the flat vector ``flatten(params)`` (dict order)."""
    wanted, pieces, start = set(names), [], 0
    for name, p in params.items():
        if name in wanted:
            pieces.append(torch.arange(start, start + p.numel()))
        start += p.numel()
    return torch.cat(pieces)


class BlockOperator:
    """``A_bb v = (A E_b v)[I_b]``: the diagonal block of a symmetric operator (module docstring).

    Args:
        operator: anything with ``matvec``, ``dim``, ``dtype`` and ``device`` (a
            ``CurvatureOperator``, a ``PreconditionedOperator``, another block).
        indices: I_b, positions in the operator's flat vectors.

    Attributes:
        dim: N_b.
    """

    SELF_ADJOINT = True

    def __init__(self, operator, indices: Tensor) -> None:
        self.operator = operator
        self.indices = indices.to(operator.device)
        self.dim = int(indices.numel())
        self.dtype, self.device = operator.dtype, operator.device

    def matvec(self, v: Tensor) -> Tensor:
        """``A_bb v`` for a flat (N_b,) vector: one product of the full operator."""
        if v.shape != (self.dim,):
            raise ValueError(f"Input tensor must have shape ({self.dim},). Got {tuple(v.shape)}.")
        full = torch.zeros(self.operator.dim, dtype=self.dtype, device=self.device)
        full[self.indices] = v.to(self.dtype)
        return self.operator.matvec(full)[self.indices]


def merge_top_k(eigenvalues: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Top-k of the block-diagonal operator: the k largest of all blocks' top eigenvalues.

    Args:
        eigenvalues: each block's top eigenvalues (``EigenResult.eigenvalues``), in block order.
        k: how many to keep.

    Returns ``(eigenvalues, block)``: descending float64 values and the index of the block each
    came from. Exact when every block's own top-k were computed (an eigenvalue of A_D is one of
    some block, and a block contributes at most k to the top-k).
    """
    values = torch.cat(list(eigenvalues))
    owner = torch.cat([torch.full((e.numel(),), b) for b, e in enumerate(eigenvalues)])
    order = values.argsort(descending=True)[:k]
    return values[order], owner[order]


def block_diagonal_slq(results: Sequence[SLQResult]) -> SLQResult:
    """The SLQ rule of A_D = diag(A_bb) from the blocks' rules (no new products).

    Probe i of A_D is the union of the blocks' probe-i nodes, block b's weights scaled by N_b / N,
    so each row still sums to 1 and ``density``/``moments`` of the result estimate
    phi_D = sum_b (N_b / N) phi_b and tr(A_D^j) / N = sum_b tr(A_bb^j) / N. The blocks must have the
    same number of probes.
    """
    probes = {r.nodes.shape[0] for r in results}
    if len(probes) != 1:
        raise ValueError(f"block SLQ results must have the same number of probes; got {sorted(probes)}")
    dim = sum(r.dim for r in results)
    nodes = torch.cat([r.nodes for r in results], dim=1)
    weights = torch.cat([r.weights * (r.dim / dim) for r in results], dim=1)
    return SLQResult(nodes, weights, dim)
