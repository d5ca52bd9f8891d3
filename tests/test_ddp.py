"""Two CPU processes under DDP through the real CLI: each rank sees a disjoint half."""

import json
import os

import torch

from overparam.plugins.teacher_student import TeacherStudentData
from tests.conftest import CONFIGS, REPO


def test_two_process_ddp_trains_and_ranks_see_disjoint_halves(cli, tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = cli(
        "fit", "-c", str(CONFIGS / "teacher_student.yaml"),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "2", "--data.num_train", "256", "--data.batch_size", "64",
        "--trainer.callbacks+=tests.ddp_helpers.RecordBatches",
        env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "teacher_student" / "version_0"
    ranks = [json.loads((run / f"seen_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    train_x, _ = TeacherStudentData(input_dim=10, num_train=256).load_splits()["train"]
    everything = sorted(train_x[:, 0].tolist())
    for epoch in ("0", "1"):
        a, b = ranks[0]["seen"][epoch], ranks[1]["seen"][epoch]
        assert len(a) == len(b) == 128
        assert not set(a) & set(b)
        assert torch.allclose(torch.tensor(sorted(a + b)), torch.tensor(everything))
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"], "a new permutation each epoch"
    assert "overparam summary" in result.stdout
