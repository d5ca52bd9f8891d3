"""The dynamics experiment configs parse and build their task, data and callbacks (no training)."""

from __future__ import annotations

import pytest

from overparam.callbacks.batch_size import BatchSizeSwitch
from overparam.callbacks.gradient_noise import GradientNoise
from overparam.cli import OverparamCLI
from overparam.registry import load_plugins

from .conftest import CONFIGS


@pytest.mark.parametrize(
    "name, callback",
    [("gd_vs_sgd", None), ("lb_vs_sb", None), ("lb_to_sb", BatchSizeSwitch), ("gradient_noise", GradientNoise)],
)
def test_experiment_config_builds(name, callback, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_plugins()
    cli = OverparamCLI(args=["-c", str(CONFIGS / "experiments" / f"{name}.yaml"), "--trainer.logger=false"], run=False)
    assert type(cli.model).__name__ == "MnistFC" and cli.model.N == 443_610
    assert type(cli.datamodule).__name__ == "MnistData"
    if callback is not None:
        found = [c for c in cli.trainer.callbacks if isinstance(c, callback)]
        assert len(found) == 1
    if name == "lb_to_sb":
        assert found[0].schedule == {0: 4096, 30: 64}


def test_gd_arm_is_the_same_config_with_a_full_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_plugins()
    args = ["-c", str(CONFIGS / "experiments" / "gd_vs_sgd.yaml"), "--trainer.logger=false", "--data.init_args.batch_size", "full"]
    cli = OverparamCLI(args=args, run=False)
    assert cli.datamodule.batch_size == "full"
