"""Sweep YAMLs: commands built exactly as the W&B agent builds them, and they train."""

import json
from pathlib import Path
import subprocess
import sys

import pytest
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from overparam.errors import ConfigError
from overparam.sweeps import agent_args, check_agent_value, command_for, expand, load_sweep
from tests.conftest import CONFIGS, REPO, data_root_for_config

SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))
# Per sweep: overrides that make its first point a few-second run (appended after ${args}).
TINY = {
    "jamming_random": ["--trainer.max_epochs=2", "--data.init_args.num_train=50"],
    "jamming_mnist": ["--trainer.max_epochs=1", "--data.init_args.n_train=100"],
    "hessian_batch_size": ["--trainer.max_epochs=1", "--data.init_args.n_train=256", "--data.init_args.analysis_size=128",
                           "--model.init_args.width=[16, 16]"],
    "critical_batch_size": ["--trainer.max_epochs=1", "--data.init_args.n_train=512", "--model.init_args.width=[16, 16]"],
    "ensemble_seeds": ["--trainer.max_epochs=1", "--data.init_args.num_train=256"],
    "grokking_fraction": ["--trainer.max_steps=20", "--data.init_args.p=11", "--data.init_args.passes_per_epoch=10",
                          "--model.init_args.d_model=16", "--model.init_args.d_mlp=32"],
}


def test_every_sweep_has_tiny_test_settings():
    assert {p.stem for p in SWEEPS} <= set(TINY), "add the new sweep to TINY"


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_commands_match_the_wandb_agent(path):
    sweep = load_sweep(path)
    points = expand(sweep)
    assert points and sweep.metric.get("name") and sweep.method in ("grid", "random")
    point = points[-1]
    agent = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})["args"]
    assert agent_args(point) == agent
    command = command_for(sweep, point)
    assert command[:3] == ["/usr/bin/env", "overparam", "fit"]
    assert command.index("--config") < command.index(agent[0]), "flags after the config"
    assert (REPO / command[command.index("--config") + 1]).is_file()


# One sweep runs in the default suite; the others are marked slow (each is a real training run).
RUN_BY_DEFAULT = "jamming_random"


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=() if p.stem == RUN_BY_DEFAULT else pytest.mark.slow) for p in SWEEPS],
    ids=[p.stem for p in SWEEPS],
)
def test_first_point_of_each_sweep_trains(path, tmp_path, request):
    sweep = load_sweep(path)
    command = command_for(sweep, expand(sweep)[0])
    data_root = data_root_for_config(request, REPO / command[command.index("--config") + 1])
    command = [sys.executable, "-m", "overparam", *command[2:], *TINY[path.stem], "--summary=false",
               "--trainer.enable_checkpointing=false"]
    env = {"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
    if data_root is not None:
        env["OVERPARAM_DATA_DIR"] = str(data_root)
    # The agent runs where configs/ resolves; the run folders go to tmp_path, not into the repo.
    (tmp_path / "configs").symlink_to(REPO / "configs")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, **env, "PYTHONUNBUFFERED": "1"},
                            )
    assert result.returncode == 0, result.stderr[-2000:]


def test_values_the_cli_cannot_read_are_rejected():
    for ok in (3, 0.001, 1e-5, True, "full", [1, 2], {"0": 4096}):
        check_agent_value("k", ok)
    with pytest.raises(ConfigError, match="value None reaches the command line as '--model.width=None'"):
        check_agent_value("model.width", None)


def test_args_before_config_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('command: ["${env}", "${program}", fit, "${args}", --config, x.yaml]\nparameters: {}\n')
    with pytest.raises(ConfigError, match="must come after --config"):
        load_sweep(bad)


def test_local_runner_writes_a_folder_per_point_and_resumes(tmp_path):
    sweep = tmp_path / "mini.yaml"
    sweep.write_text(
        "method: grid\nmetric: {name: test/error, goal: minimize}\n"
        f'command: ["${{env}}", "${{program}}", fit, --config, {CONFIGS / "teacher_student.yaml"}, "${{args}}"]\n'
        "parameters:\n  model.width: {values: [4, 0]}\n"
    )
    runs = tmp_path / "runs"
    tiny = ["--", "--trainer.max_epochs=1", "--data.num_train=64", "--data.num_test=64"]
    run = lambda: subprocess.run([sys.executable, "-m", "overparam", "sweep", str(sweep), "--runs-dir", str(runs), *tiny],
                                 capture_output=True, text=True, cwd=tmp_path, timeout=600)
    first = run()
    assert first.returncode == 1, "width 0 fails"
    assert "model.width=0: FAILED (exit 2): overparam: error: model.width must be positive, got 0" in first.stdout
    done = json.loads((runs / "model.width=4" / "DONE").read_text())
    assert done["exit_code"] == 0 and done["point"] == {"model.width": 4}
    assert list((runs / "model.width=4").rglob("metrics.csv"))
    second = run()
    assert "skip model.width=4: finished earlier" in second.stdout and "1 of 2 points to run" in second.stdout


def test_a_sweeps_config_is_found_outside_the_checkout_or_is_one_error(tmp_path, monkeypatch):
    """Points run in their own folders: `configs/...` becomes the shipped config's absolute path when
    the sweep is started elsewhere, and a config that exists nowhere stops the sweep before it starts."""
    from overparam.commands.sweep import local_command

    monkeypatch.chdir(tmp_path)
    command = local_command(["/usr/bin/env", "overparam", "fit", "--config", "configs/experiments/jamming_random.yaml", "--x=1"])
    config = Path(command[command.index("--config") + 1])
    assert config.is_absolute() and config.is_file() and config.name == "jamming_random.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: no such file"):
        local_command(["/usr/bin/env", "overparam", "fit", "--config", "configs/experiments/nope.yaml"])
