"""Transformer: N, causality, the exact Hessian with LayerNorm, and every callback on it.

HessianSpectrum's top-k against eigvalsh of the exact Hessian (N = 783, and 2,583 in the slow
run; LayerNorm on, both HVP paths), SharpnessTracker (with AdamW's preconditioner) and the
per-block spectra (embedding, attention, MLP) against eigvalsh of the Hessian's diagonal blocks,
a K = 4 vmapped AdamW ensemble against four single runs, ConstraintCounter's multi-class margins
by hand, InterpolationBarrier between two seeds, GradientNoise's per-sample gradients against a
loop, EnsembleEvaluation, and 2 DDP processes against one.
"""

from __future__ import annotations

import csv
import math
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from overparam.callbacks import (
    ConstraintCounter,
    EnsembleEvaluation,
    GradientNoise,
    HessianSpectrum,
    InterpolationBarrier,
    SharpnessTracker,
)
from overparam.runs import last_values
from overparam.curvature import HessianOperator, adam_preconditioner, block_indices, dense_hessian, eigvalsh, parameter_blocks
from overparam.errors import ConfigError
from overparam.functional import flatten, unflatten
from overparam.models import count_parameters
from overparam.noise import per_sample_moments
from overparam.plugins.modular_arithmetic import ModularArithmetic
from overparam.plugins.transformer import DecoderTransformer, Transformer


def make(p=7, K=1, init_seed=0, layer_norm=True, d_model=8, d_mlp=16, n_layers=1, batch_size="full", fraction=0.5,
         lr=3e-3, weight_decay=0.1, loss="cross_entropy", **data_kw):
    data = ModularArithmetic(p=p, train_fraction=fraction, batch_size=batch_size, **data_kw)
    task = Transformer(d_model=d_model, n_heads=2, d_mlp=d_mlp, n_layers=n_layers, layer_norm=layer_norm, loss=loss,
                       input_shape=data.input_shape, num_outputs=data.num_outputs, num_train=data.num_train,
                       ensemble_size=K, init_seed=init_seed)
    # AdamW with weight decay, as configs/grokking.yaml (the CLI's --optimizer does this there).
    task.configure_optimizers = lambda: torch.optim.AdamW(task.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    return task, data


def fit(task, data, tmp_path, callbacks=(), max_epochs=2, **trainer_kw):
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=max_epochs, precision="64-true", accelerator="cpu", logger=CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=list(callbacks), **trainer_kw)  # fmt: skip
    trainer.fit(task, datamodule=data)
    return trainer


@pytest.mark.parametrize("layer_norm, n_layers", [(False, 1), (True, 2)])
def test_parameter_count_is_the_docstring_formula(layer_norm, n_layers):
    V, T, C, d, d_mlp = 13, 4, 11, 16, 24
    net = DecoderTransformer(V, T, C, d, n_layers, 4, d_mlp, layer_norm, "relu", True)
    block = 4 * d * d + 2 * d * d_mlp + 4 * d + d_mlp + d + (4 * d if layer_norm else 0)
    assert count_parameters(net) == V * d + T * d + n_layers * block + (2 * d if layer_norm else 0) + d * C + C


def test_attention_is_causal_and_the_readout_reads_the_last_position():
    torch.manual_seed(0)
    net = DecoderTransformer(9, 4, 7, 8, 2, 2, 16, True, "gelu", True)
    x = torch.tensor([[1, 7, 3, 8]])
    changed = x.clone()
    changed[0, 2] = 5
    hidden = [net.blocks(net.embed(t) + net.pos) for t in (x, changed)]  # (1, T, d)
    torch.testing.assert_close(hidden[0][:, :2], hidden[1][:, :2], msg="positions before the change do not see it")
    assert not torch.allclose(hidden[0][:, 2:], hidden[1][:, 2:])
    torch.testing.assert_close(net(x), net.readout(net.ln_f(hidden[0][:, -1])))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 10, "n_heads": 4}, "model.n_heads must divide model.d_model = 10, got 4"),
        ({"n_layers": 0}, "model.n_layers must be positive"),
        ({"activation": "tanh"}, "model.activation must be one of relu, gelu"),
        ({"input_shape": (4, 2)}, r"input_shape must be \(T,\), got \(4, 2\)"),
    ],
)
def test_bad_arguments_name_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Transformer(**{"input_shape": (4,), "num_outputs": 7, **kwargs})


def test_exact_hessian_with_layer_norm_matches_finite_differences_and_double_backward():
    """The oracle itself: torch.func.hessian is wrong through LayerNorm (overparam.curvature.exact)."""
    task, data = make()
    x, y = data.load_splits()["train"]
    view = task.double().functional_view().detached()
    H = dense_hessian(view.fn, view.params, task.loss_fn, [(x, y)], view.buffers)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
    v = torch.randn(task.N, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op = HessianOperator(view.fn, view.params, task.loss_fn, [(x, y)], view.buffers, hvp_mode="double_backward")
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)

    def grad(flat):  # gradient of the mean loss at flat parameters
        return torch.func.grad(lambda f: task.loss_fn(view.fn(unflatten(f, view.params), {}, x)[None], y, reduction="mean"))(flat)

    theta, eps = flatten(view.params), 1e-5
    central = (grad(theta + eps * v) - grad(theta - eps * v)) / (2 * eps)
    torch.testing.assert_close(H @ v, central, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "d_model, N",
    [(8, 783), pytest.param(16, 2583, marks=pytest.mark.slow)],  # the dense Hessian of N = 2,583 takes ~15 s
)
def test_hessian_spectrum_top_k_matches_eigvalsh_through_softmax_and_layer_norm(tmp_path, d_model, N):
    # 2 heads, d_mlp = 2 d, LayerNorm on, p = 7 (24 training equations).
    task, data = make(d_model=d_model, d_mlp=2 * d_model)
    assert task.N == N
    callbacks = [HessianSpectrum(top_k=4, density=False, trace_probes=0, at_fit_start=False, hvp_mode=mode, name=f"hessian_{mode}")
                 for mode in ("forward_over_reverse", "double_backward")]  # fmt: skip
    fit(task, data, tmp_path, callbacks, max_epochs=3)
    view = task.functional_view()
    exact = eigvalsh(dense_hessian(view.fn, view.params, task.loss_fn, data.analysis_batches(), view.buffers))
    for callback in callbacks:
        end = callback.history[-1]
        assert end["tag"] == "end" and end["unconverged"] == 0
        np.testing.assert_allclose(end["eigenvalues"], exact[:4].numpy(), rtol=1e-6, err_msg=callback.name)


#: One block per embedding, attention and MLP module (the LayerNorms and the readout form ``rest``).
BLOCKS = {"embedding": ["embed.weight", "pos"], "attention": "blocks.*.attn.*", "mlp": "blocks.*.mlp.*"}


def test_sharpness_and_block_spectra_match_eigvalsh_of_the_blocks(tmp_path):
    """SharpnessTracker (lambda_1..2, AdamW's preconditioned ones, per block) and HessianSpectrum's blocks at fit end."""
    task, data = make()
    sharpness = SharpnessTracker(top_k=2, every_n_steps=None, at_fit_end=True, tol=1e-8, blocks=BLOCKS)
    spectrum = HessianSpectrum(top_k=2, density=False, trace_probes=0, at_fit_start=False, blocks=BLOCKS)
    trainer = fit(task, data, tmp_path, [sharpness, spectrum], max_epochs=3)
    view = task.functional_view()
    H = dense_hessian(view.fn, view.params, task.loss_fn, data.analysis_batches(), view.buffers)
    end = sharpness.history[-1]
    assert end["step"] == 3
    np.testing.assert_allclose(end["eigenvalues"], eigvalsh(H)[:2].numpy(), rtol=1e-6)
    optimizer = trainer.optimizers[0]
    P = torch.cat([adam_preconditioner(optimizer.state[p]["exp_avg_sq"].double(), float(optimizer.state[p]["step"]), 0.9, 0.98, 1e-8).reshape(-1)
                   for p in view.params.values()])  # fmt: skip
    np.testing.assert_allclose(end["preconditioned_eigenvalues"], eigvalsh(H / P.sqrt()[:, None] / P.sqrt()[None])[:2].numpy(), rtol=1e-6)
    blocks = parameter_blocks(list(view.params), BLOCKS)
    assert set(blocks) == {"embedding", "attention", "mlp", "rest"}
    for name, names in blocks.items():
        exact = eigvalsh(H[block_indices(view.params, names)][:, block_indices(view.params, names)])[:2].numpy()
        np.testing.assert_allclose(end["blocks"][name]["eigenvalues"], exact, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(spectrum.history[-1]["blocks"][name], exact, rtol=1e-6, err_msg=name)


def test_vmapped_ensemble_of_four_equals_four_single_runs(tmp_path):
    """Member k of a K = 4 ensemble (AdamW with weight decay, minibatches) = a run with init_seed + k."""
    K = 4
    ensemble, data = make(K=K, init_seed=3, batch_size=8)
    fit(ensemble, data, tmp_path / "ensemble", [EnsembleEvaluation()])
    x, _ = data.split("test")
    stacked = ensemble.member_outputs(x).detach()  # (K, B, C)
    view = ensemble.functional_view()
    for k in range(K):
        single, data_k = make(init_seed=3 + k, batch_size=8)
        fit(single, data_k, tmp_path / f"single{k}")
        for name, p in single.net.named_parameters():
            torch.testing.assert_close(view.params[name][k], p, rtol=1e-10, atol=1e-12, msg=f"member {k}: {name}")
        torch.testing.assert_close(stacked[k], single(x).detach(), rtol=1e-10, atol=1e-12)
    assert {"val/ensemble_fluctuation", "val/ensemble_error"} <= set(ensemble.trainer.callback_metrics)


def test_weight_norm_is_logged_per_member(tmp_path):
    task, data = make(K=2)
    trainer = fit(task, data, tmp_path)
    norms = [torch.cat([p[k].detach().reshape(-1) for p in task.functional_view().params.values()]).norm() for k in range(2)]
    metrics = trainer.callback_metrics
    for k in range(2):
        assert float(metrics[f"weights/norm/member_{k}"]) == pytest.approx(float(norms[k]), rel=1e-6)
    assert float(metrics["weights/norm"]) == pytest.approx(float(sum(norms) / 2), rel=1e-6)


def test_constraint_counter_counts_multiclass_margins_by_hand(tmp_path):
    task, data = make(K=2, loss="squared_hinge")
    counter = ConstraintCounter(every_n_epochs=1)
    fit(task, data, tmp_path, [counter])
    x, y = data.split("train")
    out = task.member_outputs(x).detach()  # (K, P, C)
    for k in range(2):
        margins = [float(out[k, i, y[i]]) - max(float(out[k, i, c]) for c in range(out.shape[-1]) if c != y[i]) for i in range(len(y))]
        assert counter.history[-1]["N_delta"][k] == sum(1 - m > counter._gap_tol(task) for m in margins)
        assert counter.history[-1]["errors"][k] == sum(m <= 0 for m in margins)
        assert counter.history[-1]["loss"][k] == pytest.approx(sum(0.5 * max(0.0, 1 - m) ** 2 for m in margins) / len(y), rel=1e-9)


def test_interpolation_barrier_between_two_seeds(tmp_path):
    task, data = make(K=2, init_seed=10)  # members from seeds 10 and 11
    barrier = InterpolationBarrier(reference="member", points=5, splits=("train",))
    trainer = fit(task, data, tmp_path, [barrier], max_epochs=4)
    curve = np.load(f"{trainer.log_dir}/barriers/curve_end.npz")
    ends = task.evaluate(data.analysis_batches())["loss"]  # (K,) mean training loss of each member
    assert curve["t"][0] == 0.0 and curve["t"][-1] == 1.0
    np.testing.assert_allclose(curve["train_loss"][[0, -1]], ends.numpy(), rtol=1e-10)
    height = barrier.history[-1]["train/loss/barrier"]
    assert height == pytest.approx(curve["train_loss"].max() - ends.max().item(), rel=1e-9) and height > 0


def test_gradient_noise_per_sample_gradients_match_a_loop(tmp_path):
    task, data = make(layer_norm=True, n_layers=2)
    data.setup()
    x, y = data.split("train")
    view = task.double().functional_view().detached()
    leaves = {n: p.requires_grad_() for n, p in view.params.items()}
    grads = []
    for i in range(x.shape[0]):
        loss = task.loss_fn(view.fn(leaves, {}, x[i : i + 1])[None], y[i : i + 1], reduction="sum")
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(leaves.values()))]))
    g = torch.stack(grads)  # (P, N)
    _, S, *_ = per_sample_moments(view.fn, view.params, {}, task.loss_fn, x, y).estimates()
    torch.testing.assert_close(S, g.var(0, unbiased=True).sum(), rtol=1e-9, atol=0)
    noise = GradientNoise(every_n_steps=1, num_minibatches=4)
    task, data = make(batch_size=8, analysis_size=24)
    trainer = fit(task, data, tmp_path, [noise], max_epochs=1)
    assert math.isfinite(float(trainer.callback_metrics["noise/B_simple"])) and float(trainer.callback_metrics["noise/alpha"]) > 0


def _all_callbacks():
    return [
        HessianSpectrum(top_k=2, density=False, trace_probes=0, at_fit_start=False, hvp_mode="double_backward"),
        ConstraintCounter(every_n_epochs=1),
        InterpolationBarrier(reference="member", points=3),
        EnsembleEvaluation(),
    ]


@pytest.mark.slow  # ~7 s on an idle 2-core CPU (two fits, process start-up)
def test_two_ddp_processes_equal_one(tmp_path):
    """Every callback's logged values with 2 CPU processes (ddp_fork) equal one process's."""
    fit(*make(K=2, p=5, fraction=0.6), tmp_path / "one", _all_callbacks())
    fit(*make(K=2, p=5, fraction=0.6), tmp_path / "two", _all_callbacks(), strategy="ddp_fork", devices=2)
    a, b = (last_values(str(tmp_path / run / "lightning_logs" / "version_0" / "metrics.csv")) for run in ("one", "two"))
    assert set(a) == set(b) and {"hessian/top1/member_0", "constraints/N_delta", "barriers/train/loss/barrier",
                                 "val/ensemble_fluctuation", "weights/norm"} <= set(a)  # fmt: skip
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key


def test_grokking_config_trains_and_logs_what_the_reproduction_reads(tmp_path, monkeypatch):
    """configs/grokking.yaml (shrunk: p = 11, d = 16, 20 steps) through the CLI: held-out accuracy and weight norm per epoch."""
    from overparam.cli import main

    monkeypatch.chdir(tmp_path)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "grokking.yaml")
    assert main(["fit", "-c", config, "--data.init_args.p=11", "--data.init_args.passes_per_epoch=10", "--model.init_args.d_model=16",
                 "--model.init_args.d_mlp=32", "--trainer.max_steps=20", "--trainer.logger.init_args.version=v"]) == 0  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "runs" / "transformer" / "v" / "metrics.csv")))
    assert [r["epoch"] for r in rows if r.get("val/error")] == ["0", "1"] and [r for r in rows if r.get("weights/norm")]
    optimizer = yaml.safe_load(open(tmp_path / "runs" / "transformer" / "v" / "config.yaml"))["optimizer"]
    assert optimizer["class_path"] == "torch.optim.AdamW" and optimizer["init_args"]["weight_decay"] == 1.0
