"""Teacher-student data: deterministic per seed, different across seeds, on the sphere."""

import pytest
import torch

from overparam.errors import ConfigError
from overparam.plugins.teacher_student import TeacherStudentData


def splits(**kwargs):
    return TeacherStudentData(**{"input_dim": 6, "num_train": 50, "num_test": 30, **kwargs}).load_splits()


def test_same_seed_same_data_and_different_seed_different_data():
    a, b, c = splits(seed=1), splits(seed=1), splits(seed=2)
    assert torch.equal(a["train"][0], b["train"][0]) and torch.equal(a["train"][1], b["train"][1])
    assert not torch.equal(a["train"][0], c["train"][0])


def test_inputs_on_sphere_of_radius_sqrt_d():
    x, _ = splits()["train"]
    assert torch.allclose(x.norm(dim=1), torch.full((50,), 6**0.5), atol=1e-5)


def test_test_set_does_not_depend_on_p_and_train_is_a_prefix():
    small, large = splits(num_train=20), splits(num_train=50)
    assert torch.equal(small["test"][0], large["test"][0])
    assert torch.equal(small["train"][0], large["train"][0][:20])


@pytest.mark.parametrize(
    "target,num_classes,dtype,outputs",
    [("binary", 2, torch.float32, 1), ("random", 2, torch.float32, 1), ("multiclass", 4, torch.int64, 4), ("random", 3, torch.int64, 3)],
)
def test_label_types(target, num_classes, dtype, outputs):
    dm = TeacherStudentData(input_dim=6, num_train=200, target=target, num_classes=num_classes)
    _, y = dm.load_splits()["train"]
    assert dm.num_outputs == outputs and y.dtype == dtype
    if dtype == torch.float32:
        assert set(y.unique().tolist()) == {-1.0, 1.0}
    else:
        assert set(y.unique().tolist()) <= set(range(num_classes)) and len(y.unique()) > 1


def test_binary_labels_are_the_teachers_signs():
    dm = TeacherStudentData(input_dim=6, num_train=100, target="binary")
    x, y = dm.load_splits()["train"]
    assert torch.equal(y, torch.where(dm.teacher()(x)[:, 0] > 0, 1.0, -1.0))


def test_regression_targets_are_the_teacher_outputs():
    dm = TeacherStudentData(input_dim=6, num_train=10, target="regression")
    x, y = dm.load_splits()["train"]
    assert torch.allclose(y, dm.teacher()(x))


def test_bad_values_name_the_option():
    with pytest.raises(ConfigError, match="data.num_train must be positive, got -3"):
        TeacherStudentData(num_train=-3)
    with pytest.raises(ConfigError, match="data.target must be one of"):
        TeacherStudentData(target="ordinal")
