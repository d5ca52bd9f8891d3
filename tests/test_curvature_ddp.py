"""Two CPU processes (gloo) give the single-process answer: products, top-k, SLQ, trace, subspace."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from overparam.curvature import GGNOperator, HessianOperator, hutchinson, operator_eigsh, slq, subspace_fraction

try:
    from tests.test_curvature_cases import CASES, make_case
except ImportError:  # tests/ not a package
    from test_curvature_cases import CASES, make_case

CASE = {c["id"]: c for c in CASES}["cnn-sqhinge"]


def _analyse(batches, mode: str = "double_backward") -> dict:
    view, loss_fn, _ = make_case(CASE)
    H = HessianOperator.from_view(view, loss_fn, batches, hvp_mode=mode)
    top = operator_eigsh(H, k=3, tol=0.0, max_steps=12, warn=False)  # equality needs no convergence
    density = slq(H.matvec, H.dim, num_probes=1, num_steps=6, seed=4, dtype=H.dtype)
    _, g = H.loss_and_gradient()
    G = GGNOperator.from_view(view, loss_fn, batches)
    return {
        "top": top.eigenvalues,
        "vectors": top.eigenvectors,
        "nodes": density.nodes,
        "trace": torch.tensor(hutchinson(H.matvec, H.dim, num_probes=3, dtype=H.dtype).trace),
        "fraction": torch.tensor(subspace_fraction(g, top.eigenvectors)),
        "ggn_top": operator_eigsh(G, k=2, tol=0.0, max_steps=8, warn=False).eigenvalues,
        "mode": H.hvp_mode,
    }


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _, _, batches = make_case(CASE)  # two chunks (17 and 23 points): one per rank, unequal
        torch.save(_analyse([batches[rank]], mode="auto"), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    _, _, batches = make_case(CASE)
    single = _analyse(batches)  # first: forked workers inherit torch.func's one-time warm-up
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["mode"] in ("forward_over_reverse", "double_backward")
        for key in ("top", "nodes", "trace", "fraction", "ggn_top"):
            torch.testing.assert_close(got[key], single[key], rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {key}")
        # Eigenvectors are defined up to sign.
        torch.testing.assert_close((got["vectors"].T @ single["vectors"]).abs(), torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["top"], r1["top"]) and r0["mode"] == r1["mode"], "ranks must agree bit for bit"
