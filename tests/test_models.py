"""N is counted right; ensembles stack independent members whose functional view matches."""

import pytest
import torch

from overparam.models import FullyConnected, count_parameters
from overparam.plugins.teacher_student import TeacherStudent


@pytest.mark.parametrize("width,depth", [(1, 1), (8, 2), (32, 3), ([5, 7], 0)])
def test_fully_connected_parameter_count(width, depth):
    d, c = 10, 3
    sizes = [d, *([width] * depth if isinstance(width, int) else width), c]
    expected = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    assert count_parameters(FullyConnected(d, c, width, depth)) == expected


def test_task_n_is_per_member_and_excludes_buffers():
    task = TeacherStudent(width=16, depth=2, input_shape=(4,), num_outputs=1, ensemble_size=3)
    assert task.N == (4 + 1) * 16 + (16 + 1) * 16 + 17
    assert sum(p.numel() for p in task.parameters()) == 3 * task.N


def test_ensemble_member_k_equals_single_run_with_seed_plus_k():
    ensemble = TeacherStudent(width=8, input_shape=(5,), num_outputs=2, ensemble_size=3, init_seed=10)
    single = TeacherStudent(width=8, input_shape=(5,), num_outputs=2, init_seed=12)
    x = torch.randn(7, 5)
    out = ensemble(x)
    assert out.shape == (3, 7, 2)
    assert torch.allclose(out[2], single(x))
    assert not torch.allclose(out[0], out[1])
    view = ensemble.functional_view().member(2)
    assert torch.allclose(view(x), single(x))
