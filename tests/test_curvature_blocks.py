"""Per-block curvature: diagonal blocks of the Hessian against the exact one, block choice, merges."""

from __future__ import annotations

import pytest
import torch

from overparam.curvature import (
    BlockOperator,
    HessianOperator,
    block_diagonal_slq,
    block_indices,
    dense_hessian,
    eigsh,
    eigvalsh,
    merge_top_k,
    moments,
    parameter_blocks,
    slq,
)

try:
    from tests.test_curvature_cases import CASES, make_case
except ImportError:  # tests/ not a package
    from test_curvature_cases import CASES, make_case

CASE = {c["id"]: c for c in CASES}
MLP_NAMES = ["layers.1.weight", "layers.1.bias", "layers.3.weight", "layers.3.bias", "layers.5.weight", "layers.5.bias"]


def test_layers_spec_gives_one_block_per_module():
    assert parameter_blocks(MLP_NAMES, "layers") == {
        "layers.1": MLP_NAMES[:2], "layers.3": MLP_NAMES[2:4], "layers.5": MLP_NAMES[4:],
    }
    assert parameter_blocks(["w", "net.b"], "layers") == {"w": ["w"], "net": ["net.b"]}


def test_globs_choose_blocks_and_the_rest_forms_its_own():
    blocks = parameter_blocks(MLP_NAMES, {"first": "layers.1.*", "weights": ["layers.3.weight", "layers.5.w*"]})
    assert blocks == {"first": MLP_NAMES[:2], "weights": ["layers.3.weight", "layers.5.weight"],
                      "rest": ["layers.3.bias", "layers.5.bias"]}


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"head": "net.6.*"}, r"block 'head': \['net.6.\*'\] matches no parameter; parameters: layers.1.weight"),
        ({"a": "layers.1.*", "b": "*.bias"}, "parameter 'layers.1.bias' is in two blocks, 'a' and 'b'"),
        ({"rest": "layers.1.*"}, "block name 'rest' is taken"),
        ("per-layer", "blocks must be 'layers' or a mapping"),
        ({}, "at least one block"),
    ],
)
def test_bad_block_specs_are_rejected(spec, match):
    with pytest.raises(ValueError, match=match):
        parameter_blocks(MLP_NAMES, spec)


# Not MSE: its last layer's block is (1/P) sum phi phi^T (x) I_C, every eigenvalue C times, and
# Lanczos from one start vector finds each repeated value once (lanczos.eigsh's docstring).
@pytest.mark.parametrize("case_id", ["mlp-ce", "cnn-sqhinge", "mlp-binary-logistic"])
def test_block_top_k_equals_eigvalsh_of_the_diagonal_block(case_id):
    view, loss_fn, batches = make_case(CASE[case_id])
    H = HessianOperator.from_view(view, loss_fn, batches, hvp_mode="forward_over_reverse")
    dense = dense_hessian(view.fn, view.params, loss_fn, batches, view.buffers)
    blocks = parameter_blocks(list(view.params), "layers")
    assert len(blocks) >= 3
    results = []
    for names in blocks.values():
        idx = block_indices(view.params, names)
        block = BlockOperator(H, idx)
        exact = eigvalsh(dense[idx][:, idx])
        k = min(3, block.dim)
        got = eigsh(block.matvec, block.dim, k, tol=1e-10, dtype=torch.float64)
        torch.testing.assert_close(got.eigenvalues, exact[:k], rtol=1e-8, atol=1e-10 * float(exact.abs().max()))
        results.append(got)
    # Block-diagonal top-k: the merge of the blocks' own top-k is eigvalsh of diag(H_bb).
    idx_all = [block_indices(view.params, names) for names in blocks.values()]
    block_diag = torch.block_diag(*[dense[i][:, i] for i in idx_all])
    merged, owner = merge_top_k([r.eigenvalues for r in results], 3)
    torch.testing.assert_close(merged, eigvalsh(block_diag)[:3], rtol=1e-8, atol=1e-10)
    assert owner.shape == (3,)


def test_block_diagonal_slq_weights_blocks_by_their_size():
    generator = torch.Generator().manual_seed(0)
    mats = [torch.diag(torch.rand(n, generator=generator, dtype=torch.float64) * s) for n, s in ((30, 1.0), (10, 5.0))]
    runs = [slq(lambda v, A=A: A @ v, A.shape[0], num_probes=4, num_steps=8, seed=3, dtype=torch.float64) for A in mats]
    merged = block_diagonal_slq(runs)
    assert merged.dim == 40 and merged.nodes.shape == (4, 16)
    torch.testing.assert_close(merged.weights.sum(-1), torch.ones(4, dtype=torch.float64))
    # tr(A_D^j)/N = sum_b (N_b/N) tr(A_bb^j)/N_b, probe by probe, exactly.
    for j in (1, 2, 3):
        expected = sum(r.dim / 40 * moments(r.nodes, r.weights, j) for r in runs)
        torch.testing.assert_close(moments(merged.nodes, merged.weights, j), expected)
    with pytest.raises(ValueError, match="same number of probes"):
        block_diagonal_slq([runs[0], slq(lambda v: mats[1] @ v, 10, num_probes=2, num_steps=4, dtype=torch.float64)])


def test_block_operator_checks_its_input():
    view, loss_fn, batches = make_case(CASE["mlp-ce"])
    block = BlockOperator(HessianOperator.from_view(view, loss_fn, batches), torch.arange(5))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        block.matvec(torch.zeros(6, dtype=torch.float64))
