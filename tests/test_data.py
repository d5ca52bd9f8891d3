"""Resident batches: seeded permutations, disjoint per-rank slices, global batch sizes."""

import pytest
import torch

from overparam.data import ResidentBatches, resolve_batch_size
from overparam.errors import ConfigError
from overparam.plugins.teacher_student import TeacherStudentData


def ids_of(loader):
    return [batch[0][:, 0].tolist() for batch in loader]


def make(batch_size, rank=0, world=1, epoch=0, n=10, shuffle=True):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return ResidentBatches(x, x[:, 0].clone(), lambda: batch_size, shuffle, 3, lambda: epoch, rank, world)


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
    sizes = [n for *_, n in make(4, rank=0, world=3, n=9)]
    assert sizes == [4, 4]  # the last global batch (1 point) would leave two ranks empty
    assert len(make(4, world=3, n=9)) == 2
    assert [n for *_, n in make(4, n=9)] == [4, 4, 1]


def test_full_batch_is_all_points():
    assert resolve_batch_size("full", 10) == 10
    assert [len(b) for b in ids_of(make(10))] == [10]
    with pytest.raises(ConfigError, match="data.batch_size must be a positive integer or 'full', got 0"):
        resolve_batch_size(0, 10)


def test_evaluation_order_is_natural():
    assert ids_of(make(4, shuffle=False)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


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
