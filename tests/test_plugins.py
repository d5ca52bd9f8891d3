"""Plugins: a third-party distribution found by its entry point; broken plugins reported."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO, run_cli

TS = str(CONFIGS / "teacher_student.yaml")
ONE_EPOCH = ["--trainer.max_epochs", "1", "--data.num_train", "100", "--data.num_test", "100", "--summary", "false"]


def install_wheel(project: Path, target: Path) -> None:
    """Build ``project`` into a wheel and install it into ``target`` (a real distribution)."""
    build = target.parent / f"build-{project.name}"
    shutil.copytree(project, build)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(build / "dist"), str(build)], check=True)
    wheel = next((build / "dist").glob("*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder on PYTHONPATH holding the example plugin and a broken one, both as wheels."""
    root = tmp_path_factory.mktemp("plugins")
    site = root / "site"
    install_wheel(REPO / "examples" / "random_features", site)
    broken = root / "broken_plugin"
    (broken / "broken_plugin").mkdir(parents=True)
    (broken / "broken_plugin" / "__init__.py").write_text("raise ImportError('needs libfoo')\n")
    (broken / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=68"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "broken-plugin"
            version = "0.0.1"
            [project.entry-points."overparam.plugins"]
            broken = "broken_plugin"
            [tool.setuptools]
            packages = ["broken_plugin"]
            """
        )
    )
    install_wheel(broken, site)
    return site


def with_site(site: Path, **extra: str) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), **extra}


def test_plugins_lists_first_and_third_party_and_reports_the_broken_one(site, tmp_path):
    out = run_cli("plugins", cwd=tmp_path, env=with_site(site))
    assert "random_features  (overparam_random_features, from overparam-random-features)" in out.stdout
    assert "tasks:       RandomFeatures" in out.stdout and "datamodules: LinearTeacherData" in out.stdout
    assert "tasks:       TeacherStudent" in out.stdout and "datamodules: TeacherStudentData" in out.stdout
    assert "FAILED TO IMPORT: ImportError: needs libfoo" in out.stdout
    assert "plugin 'broken' (broken_plugin, distribution broken-plugin) failed to import" in out.stderr
    assert out.returncode == 1


def test_third_party_task_trains_by_short_name_with_callbacks_despite_a_broken_plugin(site, tmp_path):
    out = run_cli("fit", "-c", TS, "--model", "RandomFeatures", "--model.num_features", "50", *ONE_EPOCH,
                  "--trainer.callbacks+=HessianSpectrum", "--trainer.callbacks.density=false",
                  "--trainer.callbacks+=ConstraintCounter", cwd=tmp_path, env=with_site(site))
    assert out.returncode == 0, out.stderr
    run = tmp_path / "runs" / "random_features" / "version_0"
    assert "N: 51" in (run / "hparams.yaml").read_text()  # 50 readout weights + 1 bias; features are buffers
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"hessian/top1", "hessian/outliers", "constraints/N_delta", "constraints/N_delta_over_N"} <= set(header)
    assert (run / "hessian" / "end.npz").is_file() and (run / "constraints" / "end.npz").is_file()


def test_the_example_datamodule_trains_the_example_task(site, tmp_path):
    out = run_cli("fit", "--model", "RandomFeatures", "--model.num_features", "20", "--model.loss", "mse", "--model.lr", "0.02",
                  "--data", "LinearTeacherData", "--data.num_train", "50", "--trainer.max_epochs", "2", cwd=tmp_path, env=with_site(site))
    assert out.returncode == 0, out.stderr
    assert "overparam summary: N = 21  P = 50  K = 1" in out.stdout


def test_autoload_off_hides_third_party_and_env_adds_local_modules(site, tmp_path):
    (tmp_path / "local_plugin.py").write_text(
        "from overparam.plugins.teacher_student import TeacherStudent\n\nclass LocalTask(TeacherStudent):\n    pass\n"
    )
    env = with_site(site, OVERPARAM_DISABLE_PLUGIN_AUTOLOAD="1", OVERPARAM_PLUGINS="local_plugin")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    out = run_cli("plugins", cwd=tmp_path, env=env)
    assert "RandomFeatures" not in out.stdout and "broken" not in out.stdout
    assert "local_plugin  (local_plugin, from $OVERPARAM_PLUGINS)" in out.stdout and "LocalTask" in out.stdout
    fit = run_cli("fit", "-c", TS, "--model", "LocalTask", *ONE_EPOCH, cwd=tmp_path, env=env)
    assert fit.returncode == 0, fit.stderr
