"""ConstraintCounter: counts by hand, SAT/jammed stopping, per-member counts, DDP = one process."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from overparam.callbacks.constraints import ConstraintCounter
from overparam.constraints import JAMMED, RUNNING, SAT, JammingVerdict, constraint_sums, delta_histograms, gap_tolerance, gaps
from overparam.errors import ConfigError
from overparam.losses import squared_hinge
from overparam.plugins.teacher_student import TeacherStudent, TeacherStudentData


def make(P=24, width=8, K=1, target="random", num_classes=2, batch_size="full", lr=0.05, seed=0):
    data = TeacherStudentData(input_dim=4, num_train=P, num_test=50, target=target, num_classes=num_classes,
                              batch_size=batch_size, seed=seed)
    task = TeacherStudent(width=width, depth=1, input_shape=(4,), num_outputs=data.num_outputs, num_train=P,
                          loss="squared_hinge", lr=lr, momentum=0.9, ensemble_size=K)
    return task, data


def fit(task, data, callbacks, max_epochs, tmp_path, **kwargs):
    trainer = pl.Trainer(max_epochs=max_epochs, precision="64-true", accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, default_root_dir=tmp_path, **kwargs)
    trainer.fit(task, data)
    return trainer


def hand_count(task, data):
    """N_Delta, errors and the mean loss per member, by loops over points."""
    x, y = data.split("train")
    out = task.member_outputs(x).detach()  # (K, P, C)
    rows = []
    for k in range(out.shape[0]):
        n_delta = n_err = 0
        loss = 0.0
        for mu in range(x.shape[0]):
            f = out[k, mu]
            if f.numel() == 1:
                m = float(y[mu]) * float(f[0])
            else:
                label = int(y[mu])
                m = float(f[label]) - max(float(f[j]) for j in range(f.numel()) if j != label)
            n_delta += (1 - m) > 0
            n_err += m <= 0
            loss += 0.5 * max(0.0, 1 - m) ** 2
        rows.append((n_delta, n_err, loss / x.shape[0]))
    return rows


def test_constraint_sums_binary_by_hand():
    outputs = torch.tensor([[[2.0], [0.5], [-0.3], [1.0], [-2.0]]], dtype=torch.float64)  # (1, 5, 1)
    y = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    # margins 2, 0.5, -0.3, -1, 2 -> Delta -1, 0.5, 1.3, 2, -1
    edges = torch.tensor([0.1, 1.0, 1.5, 10.0], dtype=torch.float64)
    sums = constraint_sums(outputs, y, squared_hinge(outputs, y, reduction="none"))
    hist = delta_histograms(gaps(outputs, y), edges)
    expected_loss = 0.5 * (0.5**2 + 1.3**2 + 2**2)
    torch.testing.assert_close(sums[0], torch.tensor([3.0, 2.0, expected_loss, 5.0], dtype=torch.float64))
    # |Delta| of unsatisfied: 0.5 -> bin 0, 1.3 -> bin 1, 2 -> bin 2; satisfied: 1, 1 -> bin 1 (edge 1.0 goes right)
    assert hist[0, 0].tolist() == [1.0, 1.0, 1.0]
    assert hist[0, 1].tolist() == [0.0, 2.0, 0.0]


def test_constraint_sums_multiclass_by_hand_per_member():
    outputs = torch.tensor(
        [
            [[3.0, 0.0, 1.0], [0.0, 0.5, 0.2], [1.0, 1.0, 0.0]],  # member 0: margins 2, 0.3, 0 -> Delta -1, 0.7, 1
            [[0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [5.0, 0.0, 0.0]],  # member 1: margins -2, -2, 5 -> Delta 3, 3, -4
        ],
        dtype=torch.float64,
    )
    y = torch.tensor([0, 1, 0])
    sums = constraint_sums(outputs, y, squared_hinge(outputs, y, reduction="none"))
    hist = delta_histograms(gaps(outputs, y), torch.logspace(-8, 2, 11, dtype=torch.float64))
    assert sums[:, 0].tolist() == [2.0, 2.0]  # N_Delta
    assert sums[:, 1].tolist() == [1.0, 2.0]  # errors: margin <= 0 (the tie counts)
    torch.testing.assert_close(sums[:, 2], torch.tensor([0.5 * (0.49 + 1), 0.5 * 18], dtype=torch.float64))
    assert hist.sum(-1).tolist() == [[2.0, 1.0], [2.0, 1.0]]  # every constraint in exactly one bin


def test_gaps_at_round_off_are_closed_at_the_default_tolerance():
    """A SAT run's last constraints stall at Delta ~ 1e-16 (its gradient vanished with them)."""
    y = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    outputs = torch.tensor([[[1.0 - 2e-16], [-(1.0 - 4e-16)], [3.0]]], dtype=torch.float64)
    losses = squared_hinge(outputs, y, reduction="none")
    assert constraint_sums(outputs, y, losses)[0, 0] == 2.0  # strict: two open gaps
    assert constraint_sums(outputs, y, losses, gap_tolerance(torch.float64))[0, 0] == 0.0
    assert gap_tolerance(torch.float64) == 1024 * 2.0**-52 and gap_tolerance(torch.float32) == 1024 * 2.0**-23


def test_histogram_folds_outliers_into_end_bins():
    delta = torch.tensor([[1e-12, 1e9, -1e9, 0.0]], dtype=torch.float64)
    hist = delta_histograms(delta, torch.logspace(-8, 2, 6, dtype=torch.float64))
    assert hist[0, 0].tolist() == [1.0, 0, 0, 0, 1.0]
    assert hist[0, 1].tolist() == [1.0, 0, 0, 0, 1.0]  # 0 is satisfied (Delta <= 0), |0| in the first bin


@pytest.mark.parametrize("target,num_classes,K", [("random", 2, 1), ("multiclass", 3, 1), ("random", 2, 3)])
def test_counter_matches_hand_count_on_full_training_set(tmp_path, target, num_classes, K):
    task, data = make(P=30, width=3, K=K, target=target, num_classes=num_classes, batch_size=8)
    data.analysis_size = 5  # the counter must ignore this: it counts on the whole training set
    counter = ConstraintCounter(every_n_epochs=1)
    fit(task, data, [counter], max_epochs=2, tmp_path=tmp_path)
    last = counter.history[-1]
    assert last["tag"] == "end" and last["P"] == 30
    for k, (n_delta, n_err, loss) in enumerate(hand_count(task, data)):
        assert last["N_delta"][k] == n_delta, f"member {k}"
        assert last["errors"][k] == n_err, f"member {k}"
        assert last["loss"][k] == pytest.approx(loss, rel=1e-12)
    assert [h["tag"] for h in counter.history] == ["epoch=0", "epoch=1", "end"]
    npz = np.load(tmp_path / "constraints" / "end.npz")
    assert npz["hist_unsat"].shape == (K, 60) and npz["hist_unsat"].sum(-1).tolist() == last["N_delta"]
    assert (npz["hist_unsat"].sum(-1) + npz["hist_sat"].sum(-1)).tolist() == [30.0] * K


def test_sat_stop_triggers_exactly_when_n_delta_hits_zero(tmp_path):
    # A free run: the first epoch whose end count is 0.
    task, data = make(P=16, width=32, lr=0.1)
    free = ConstraintCounter(at_fit_end=False)
    fit(task, data, [free], max_epochs=60, tmp_path=tmp_path)
    counts = [h["N_delta"][0] for h in free.history]
    assert counts[0] > 0 and 0 in counts, f"the wide net must reach SAT within 60 epochs: {counts}"
    first_sat = counts.index(0)
    # The same run (same seeds, float64, full batch) with stopping.
    task, data = make(P=16, width=32, lr=0.1)
    stopper = ConstraintCounter(stop_when_sat=True, at_fit_end=False)
    trainer = fit(task, data, [stopper], max_epochs=60, tmp_path=tmp_path)
    stopped = [h["N_delta"][0] for h in stopper.history]
    assert stopped == counts[: first_sat + 1], "stops at the first N_Delta = 0, not before, not after"
    assert trainer.current_epoch == first_sat + 1 and trainer.global_step == first_sat + 1
    assert stopper.status == ["sat"]


def test_sat_stop_every_n_steps_stops_mid_epoch(tmp_path):
    task, data = make(P=16, width=32, lr=0.05, batch_size=4)
    counter = ConstraintCounter(every_n_epochs=None, every_n_steps=1, stop_when_sat=True, at_fit_end=False)
    trainer = fit(task, data, [counter], max_epochs=40, tmp_path=tmp_path, log_every_n_steps=1)
    counts = [h["N_delta"][0] for h in counter.history]
    assert counts[-1] == 0 and all(c > 0 for c in counts[:-1])
    # theta_t for t = 0 .. T: the SAT network theta_T is the final one (no update after the stop).
    assert [h["step"] for h in counter.history] == list(range(0, trainer.global_step + 1))
    assert trainer.global_step % 4 != 0 or trainer.current_epoch * 4 != trainer.global_step, "stops mid-epoch"


def test_full_batch_counts_read_the_steps_forward_pass_and_equal_a_pass_of_their_own(tmp_path):
    class Compare(ConstraintCounter):
        def analyse_step(self, trainer, pl_module, step, record):
            if record is None:  # theta_T at fit end: no forward pass to read
                return
            assert record.evaluates_train_set
            pairs = zip(record.outputs, (y for _, y in record.data.chunks), record.losses)
            free, own = self.count(trainer, pl_module, pairs), self.count(trainer, pl_module, None)
            torch.testing.assert_close(free["sums"], own["sums"], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(free["hist"], own["hist"])
            self.compared = getattr(self, "compared", 0) + 1

    task, data = make(P=30, width=3, K=2)
    counter = Compare(every_n_epochs=None, every_n_steps=1, at_fit_end=False)
    fit(task, data, [counter], max_epochs=5, tmp_path=tmp_path)
    assert counter.compared == 5


def test_a_run_still_descending_is_never_jammed_and_a_plateau_is():
    """Synthetic curves: a slow power law keeps running; a converged positive loss is jammed."""
    slow = JammingVerdict(1, min_rel_decrease=1e-3, min_plateau_steps=100)
    for t in range(1, 100_001, 7):
        status = slow.update(t, [50.0], [0.3 * t**-0.01])  # loses ~0.7% per doubling of t
    assert status == [RUNNING]
    creeping = JammingVerdict(1, min_plateau_steps=100)
    for t in range(1, 50_001, 5):
        status = creeping.update(t, [200.0 - t // 2_000], [0.1])  # N_Delta still falls now and then
    assert status == [RUNNING]
    jam = JammingVerdict(1, min_rel_decrease=1e-3, min_plateau_steps=100)
    seen = []
    for t in range(0, 20_000):
        seen.append(jam.update(t, [40.0], [0.1 + 0.5 * np.exp(-t / 300)])[0])  # converged by t ~ 3,000
    first = seen.index(JAMMED)
    assert 2 * 2_000 < first < 2 * 5_000, first  # about twice the steps the loss needed to settle
    sat = JammingVerdict(2)
    assert sat.update(5, [0.0, 3.0], [0.0, 0.2]) == [SAT, RUNNING] and not sat.done()
    assert sat.update(6, [1.0, 3.0], [1e-9, 0.2]) == [SAT, RUNNING] and sat.last[0]["step"] == 5, "SAT is for good"
    endgame = JammingVerdict(1, min_plateau_steps=10)
    assert [endgame.update(t, [4.0], [0.1], annealing=True)[0] for t in range(100)][-1] == RUNNING
    assert endgame.update(100, [4.0], [0.1]) == [JAMMED]  # the lr reached its floor: the same plateau jams


def test_no_jammed_verdict_while_reduce_lr_on_plateau_is_above_its_floor(tmp_path):
    task, data = make(P=40, width=1, lr=0.05)  # N = 7 < P: cannot fit 40 random labels
    optimizer = torch.optim.SGD(task.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2, min_lr=0.05 * 0.5**3)
    scheduler.monitor = "constraints/loss"
    task.configure_optimizers = lambda: {"optimizer": optimizer, "lr_scheduler": scheduler}
    data.passes_per_epoch = 100
    counter = ConstraintCounter(every_n_epochs=None, every_n_steps=1, stop_when_jammed=True, min_plateau_steps=50)
    trainer = fit(task, data, [counter], max_epochs=200, tmp_path=tmp_path, log_every_n_steps=100)
    assert counter.status == ["jammed"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**3), "jammed only at the lr floor"
    assert trainer.current_epoch < 200


def test_jammed_stop_on_a_plateau_with_unsatisfied_constraints(tmp_path):
    task, data = make(P=40, width=1, lr=0.05)  # N = 7 < P: cannot fit 40 random labels
    counter = ConstraintCounter(stop_when_jammed=True, min_plateau_steps=50, at_fit_end=True)
    # N_Delta still finds new lows (36 -> 34) while the loss has settled to 1e-4: jammed at ~2,900.
    trainer = fit(task, data, [counter], max_epochs=5000, tmp_path=tmp_path)
    assert counter.status == ["jammed"] and trainer.current_epoch < 5000
    assert counter.history[-1]["N_delta"][0] > 0
    verdict = json.load(open(tmp_path / "constraints" / "verdict.json"))
    assert verdict["reason"] == "stopped by ConstraintCounter: every member SAT or jammed"
    assert verdict["members"][0]["status"] == "jammed" and verdict["members"][0]["N_delta"] > 0
    assert verdict["members"][0]["step"] == trainer.global_step


def test_ensemble_stops_only_when_every_member_is_done(tmp_path):
    task, data = make(P=16, width=32, lr=0.1, K=3)
    counter = ConstraintCounter(stop_when_sat=True, at_fit_end=False)
    fit(task, data, [counter], max_epochs=80, tmp_path=tmp_path)
    last, before = counter.history[-1]["N_delta"], counter.history[-2]["N_delta"]
    assert last == [0.0, 0.0, 0.0] and any(n > 0 for n in before)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"min_plateau_steps": 0}, "ConstraintCounter.min_plateau_steps must be positive"),
        ({"every_n_steps": -1}, "ConstraintCounter.every_n_steps"),
        ({"min_rel_decrease": 2.0}, "min_rel_decrease must be in"),
        ({"gap_tol": -1.0}, "ConstraintCounter.gap_tol"),
        ({"delta_range": (1.0, 0.1)}, "delta_range must be two numbers"),
    ],
)
def test_bad_arguments_name_the_option(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ConstraintCounter(**kwargs)


def test_state_dict_round_trip_keeps_the_verdict():
    a = ConstraintCounter(min_plateau_steps=10)
    for t in range(30):
        a._verdict(2).update(t, [3.0, 0.0], [0.5, 0.0])
    b = ConstraintCounter(min_plateau_steps=10)
    b.load_state_dict(a.state_dict())
    assert b._verdict(2).status == a.status == ["jammed", "sat"]
    assert b.verdict.milestones == a.verdict.milestones and b.verdict.best_loss == [0.5, 0.0]


class _PerRank(ConstraintCounter):
    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as fh:
            json.dump(self.history, fh)


def test_ddp_counts_equal_single_process(tmp_path):
    """Two ranks (ddp_fork, gloo) each count their shard; the all-reduced counts equal one process."""
    single = _PerRank(save_deltas=True)
    single.out = str(tmp_path)
    task, data = make(P=25, width=3, K=2, batch_size="full")  # 25 points: unequal shards 13 + 12
    fit(task, data, [single], max_epochs=1, tmp_path=tmp_path / "one")
    os.rename(tmp_path / "rank0.json", tmp_path / "single.json")
    deltas_single = np.load(tmp_path / "one" / "constraints" / "end.npz")["deltas"]

    ddp = _PerRank(save_deltas=True)
    ddp.out = str(tmp_path)
    task, data = make(P=25, width=3, K=2, batch_size="full")
    fit(task, data, [ddp], max_epochs=1, tmp_path=tmp_path / "two", strategy="ddp_fork", devices=2)
    expected = json.load(open(tmp_path / "single.json"))
    for rank in range(2):
        got = json.load(open(tmp_path / f"rank{rank}.json"))
        for g, e in zip(got, expected):
            assert g["N_delta"] == e["N_delta"] and g["errors"] == e["errors"] and g["P"] == 25.0, f"rank {rank}"
            assert g["loss"] == pytest.approx(e["loss"], rel=1e-12, abs=1e-15)
    deltas_ddp = np.load(tmp_path / "two" / "constraints" / "end.npz")["deltas"]
    np.testing.assert_allclose(deltas_ddp, deltas_single, rtol=1e-12)


def test_mnist_parity_config_counts_constraints(mnist_root, tmp_path, monkeypatch):
    """configs/experiments/jamming_mnist.yaml runs (shrunk) and logs the counts on P = 100 parity digits."""
    from overparam.cli import main
    from overparam.runs import last_values

    monkeypatch.chdir(tmp_path)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "experiments", "jamming_mnist.yaml")
    assert main(["fit", "-c", config, f"--data.init_args.data_dir={mnist_root}", "--data.init_args.n_train=100",
                 "--data.init_args.n_test=200", "--trainer.max_epochs=2", "--model.init_args.width=4",
                 "--trainer.enable_model_summary=false", "--trainer.logger.init_args.version=v"]) == 0
    metrics = last_values(str(tmp_path / "runs" / "mnist_fc" / "v" / "metrics.csv"))
    assert metrics["constraints/N_delta_over_P"] == metrics["constraints/N_delta"] / 100
    assert 0 < metrics["constraints/N_delta"] <= 100 and "test/error" in metrics


@pytest.mark.parametrize("name", ["jamming_random", "jamming_mnist"])
def test_sweep_files_point_at_their_config_and_its_keys(name):
    import yaml

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    sweep = yaml.safe_load(open(os.path.join(root, "sweeps", f"{name}.yaml")))
    experiment = f"configs/experiments/{name}.yaml"
    assert sweep["method"] == "grid" and sweep["program"] == "overparam"
    assert sweep["command"] == ["${env}", "${program}", "fit", "--config", experiment, "${args}"]
    config = yaml.safe_load(open(os.path.join(root, "..", experiment)))
    for key in sweep["parameters"]:
        node = config
        for part in key.split("."):
            assert part in node, f"{key} is not a key of {experiment}"
            node = node[part]


def test_constant_unsatisfied_finds_a_dead_region():
    """Unsatisfied points with bitwise equal outputs (a dead region) are counted; satisfied ties and distinct outputs are not."""
    from overparam.constraints import constant_unsatisfied

    y = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])
    outputs = torch.tensor([
        [[-0.3], [-0.3], [-0.3], [2.0], [2.0]],   # three unsatisfied points at one output; the tie at 2.0 is satisfied
        [[0.1], [0.2], [-0.5], [0.4], [3.0]],     # four unsatisfied points, all different
    ], dtype=torch.float64)  # fmt: skip
    assert constant_unsatisfied(outputs, gaps(outputs, y)).tolist() == [3, 0]


def test_verdict_json_reports_points_stuck_in_a_dead_region(tmp_path):
    """Every ReLU off on every input: the network is its output bias, jammed, and the verdict says why."""
    data = TeacherStudentData(input_dim=3, num_train=20, num_test=10, target="random", batch_size="full")
    task = TeacherStudent(width=4, loss="squared_hinge", input_shape=data.input_shape, num_outputs=1, num_train=20)
    with torch.no_grad():
        params = dict(task.named_parameters())
        params["net.layers.1.weight"].zero_()
        params["net.layers.1.bias"].fill_(-1.0)
    counter = ConstraintCounter(every_n_epochs=None, every_n_steps=1, stop_when_jammed=True, min_plateau_steps=50)
    trainer = pl.Trainer(max_steps=400, max_epochs=-1, precision="64-true", accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[counter], default_root_dir=tmp_path)  # fmt: skip
    with pytest.warns(UserWarning, match="dead region"):
        trainer.fit(task, datamodule=data)
    verdict = json.loads(next(tmp_path.rglob("verdict.json")).read_text())
    member = verdict["members"][0]
    assert member["status"] == "jammed" and member["N_delta_constant"] == member["N_delta"] == 20
