"""Resident batches: seeded permutations, disjoint per-rank slices, global batch sizes."""

import pytest
import torch

from overparam.data import STEPS_PER_BLOCK, EvalBatches, TrainSteps, resolve_batch_size
from overparam.errors import ConfigError
from overparam.plugins.teacher_student import TeacherStudentData


def ids_of(loader):
    """The point ids of every step (training) or batch (evaluation), in order."""
    if isinstance(loader, EvalBatches):
        return [x[:, 0].tolist() for x, _ in loader]
    return [torch.cat([x for x, _ in step.chunks])[:, 0].tolist() for block in loader for step in block]


def make(batch_size, rank=0, world=1, epoch=0, n=10, shuffle=True, **kwargs):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    if not shuffle:
        return EvalBatches(x, x[:, 0].clone(), batch_size, rank, world)
    return TrainSteps(x, x[:, 0].clone(), lambda i: batch_size, 3, lambda: epoch, rank=rank, world_size=world, **kwargs)


def test_an_epoch_is_a_permutation_and_epochs_differ():
    first = [i for b in ids_of(make(4)) for i in b]
    assert sorted(first) == list(range(10)) and first != list(range(10))
    second = [i for b in ids_of(make(4, epoch=1)) for i in b]
    assert sorted(second) == list(range(10)) and second != first
    assert ids_of(make(4)) == ids_of(make(4)), "same seed and epoch, same order"


def test_ranks_take_disjoint_slices_of_each_global_batch():
    single = ids_of(make(4))
    rank0, rank1 = ids_of(make(4, rank=0, world=2)), ids_of(make(4, rank=1, world=2))
    assert len(rank0) == len(rank1) == len(single)
    for whole, a, b in zip(single, rank0, rank1):
        assert not set(a) & set(b) and sorted(a + b) == sorted(whole)


def test_global_batch_size_is_yielded_and_a_tiny_last_batch_is_dropped():
    sizes = [step.global_size for block in make(4, rank=0, world=3, n=9) for step in block]
    assert sizes == [4, 4]  # the last global batch (1 point) would leave two ranks empty
    assert [step.global_size for block in make(4, n=9) for step in block] == [4, 4, 1]


def test_full_batch_is_all_points():
    assert resolve_batch_size("full", 10) == 10
    assert [len(b) for b in ids_of(make(10))] == [10]
    steps = [step for block in make(10) for step in block]
    assert steps[0].whole_train_set and not [s for b in make(4) for s in b][0].whole_train_set
    with pytest.raises(ConfigError, match="data.batch_size must be a positive integer or 'full', got 0"):
        resolve_batch_size(0, 10)


def test_steps_come_in_blocks_and_passes_repeat_the_permutation_stream():
    loader = make(1, n=40)  # 40 steps of one point
    assert len(loader) == -(-40 // STEPS_PER_BLOCK) and [len(b) for b in loader][0] == STEPS_PER_BLOCK
    two = ids_of(make(10, n=10, passes=2))  # full batch, 2 passes: 2 GD steps per epoch
    assert len(two) == 2 and sorted(two[0]) == sorted(two[1]) == list(range(10))
    # Pass r of epoch e draws permutation e * passes + r: epoch 1 of 1 pass = pass 1 of epoch 0.
    assert ids_of(make(4, passes=2))[3:] == ids_of(make(4, epoch=1))


def test_chunks_split_a_global_batch_without_changing_it():
    whole = ids_of(make(8, n=8))
    chunked = [step for block in make(8, n=8, chunk_size=3) for step in block]
    assert [len(step.chunks) for step in chunked] == [3] and chunked[0].global_size == 8
    assert [i for x, _ in chunked[0].chunks for i in x[:, 0].tolist()] == whole[0]


def test_evaluation_order_is_natural_and_keeps_every_point():
    assert ids_of(make(4, shuffle=False)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    ranks = [ids_of(make(4, rank=r, world=3, shuffle=False)) for r in range(3)]
    assert sorted(i for r in ranks for b in r for i in b) == list(range(10))


def test_analysis_batches_are_fixed_and_sharded_without_overlap():
    dm = TeacherStudentData(input_dim=3, num_train=100, analysis_size=30, eval_batch_size=8)
    chunks = dm.analysis_batches()
    assert sum(len(x) for x, _ in chunks) == 30 and max(len(x) for x, _ in chunks) == 8
    again = dm.analysis_batches()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(chunks, again))
    dm._rank_and_world = lambda: (1, 2)
    half = torch.cat([x for x, _ in dm.analysis_batches()])
    dm._rank_and_world = lambda: (0, 2)
    other = torch.cat([x for x, _ in dm.analysis_batches()])
    everything = torch.cat([x for x, _ in chunks])
    assert len(half) + len(other) == 30
    assert torch.equal(torch.cat([other, half]), everything)


def test_float64_precision_stores_data_and_trains_in_float64(tmp_path):
    import lightning.pytorch as pl

    from overparam.plugins.teacher_student import TeacherStudent

    dm = TeacherStudentData(input_dim=3, num_train=64, num_test=32, batch_size=32)
    task = TeacherStudent(width=4, input_shape=dm.input_shape, num_outputs=dm.num_outputs, num_train=dm.num_train)
    trainer = pl.Trainer(max_epochs=1, precision="64-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=dm)
    assert dm.split("train")[0].dtype == torch.float64 and dm.split("train")[1].dtype == torch.float64
    assert next(task.parameters()).dtype == torch.float64


def test_logged_steps_count_optimizer_steps_not_blocks(tmp_path):
    import csv

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from overparam.plugins.teacher_student import TeacherStudent

    dm = TeacherStudentData(input_dim=3, num_train=64, num_test=32, batch_size=2)  # 32 steps = 2 blocks per epoch
    task = TeacherStudent(width=4, input_shape=dm.input_shape, num_outputs=dm.num_outputs, num_train=dm.num_train)
    trainer = pl.Trainer(max_epochs=2, logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(task, datamodule=dm)
    rows = list(csv.DictReader(open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == [31, 63] and trainer.global_step == 64  # the last step of each epoch, as Lightning logs
