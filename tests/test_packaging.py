"""A wheel of overparam maps plugins/, callbacks/ and configs/ into the package, with entry points."""

import shutil
import subprocess
import sys

from tests.conftest import REPO


def test_wheel_install_provides_subpackages_and_entry_points(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("overparam", "plugins", "callbacks", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)], check=True)
    wheel = next((tmp_path / "dist").glob("overparam-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    probe = (
        "import importlib.metadata as m, overparam, overparam.plugins.teacher_student as ts, overparam.callbacks;"
        "print(overparam.__file__); print(ts.__file__);"
        "print(sorted(e.name for e in m.entry_points(group='overparam.plugins')));"
        "from overparam.reproduce._runs import config_path;"
        "print(config_path('experiments/jamming_random.yaml')); print(config_path('sweeps/grokking_fraction.yaml'))"
    )
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {probe}"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(site)) and lines[1] == str(site / "overparam" / "plugins" / "teacher_student.py")
    assert "teacher_student" in lines[2] and "callbacks" in lines[2]
    # `overparam reproduce` reads the shipped configs from the installed package, not a checkout
    assert lines[3] == str(site / "overparam" / "configs" / "experiments" / "jamming_random.yaml")
    assert lines[4] == str(site / "overparam" / "configs" / "sweeps" / "grokking_fraction.yaml")
