"""The README's snippets do what it says: the plugin guide trains, the documented errors are exact."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from overparam.cli import main
from overparam.registry import ENTRY_POINT_GROUP
from tests.conftest import REPO, run_cli

README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    """The text of ``## title`` up to the next ``## `` heading."""
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def in_repo(args: list[str]) -> list[str]:
    """README commands name configs relative to the checkout."""
    return [str(REPO / a) if a.startswith("configs/") else a for a in args]


def test_the_plugin_guide_trains_its_task_and_datamodule(tmp_path):
    guide = section("Writing a plugin")
    code = [b for b in blocks(guide, "python") if b.startswith("# my_package/__init__.py")]
    assert len(code) == 2, "the Task and the DataModule snippets"
    package = tmp_path / "my_package"
    package.mkdir()
    (package / "__init__.py").write_text("\n".join(code))
    assert f'[project.entry-points."{ENTRY_POINT_GROUP}"]' in blocks(guide, "toml")[0]
    (command,) = [b.strip() for b in blocks(guide, "bash") if b.startswith("OVERPARAM_PLUGINS=")]
    env_part, program, *args = shlex.split(command)
    assert program == "overparam"
    name, value = env_part.split("=")
    result = run_cli(*args, cwd=tmp_path, env={name: value, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    # MyData(dim=20, classes=4), MyTask(width=8) with FullyConnected's two hidden layers
    assert f"overparam summary: N = {8 * 21 + 8 * 9 + 4 * 9}  P = 1,000  K = 1" in result.stdout
    assert (tmp_path / "runs" / "my_task" / "version_0" / "metrics.csv").is_file()


EXAMPLES = re.findall(r"^\$ overparam (.*)\n(overparam: error: .*)$", section("The command"), flags=re.M)


@pytest.mark.parametrize("command,expected", EXAMPLES, ids=[e[0].split()[-2] for e in EXAMPLES])
def test_the_documented_errors_are_what_the_command_prints(command, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(in_repo(shlex.split(command)))
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert capsys.readouterr().err.strip() == expected


def test_the_callback_options_example_configures_both_callbacks(capsys):
    (command,) = [b for b in blocks(section("The command"), "bash") if "--trainer.callbacks.top_k" in b]
    args = in_repo(shlex.split(command.replace("\\\n", " ")))
    assert args[0] == "overparam"
    with pytest.raises(SystemExit) as printed:
        main([*args[1:], "--print_config"])
    assert printed.value.code == 0
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    hessian = next(c for c in callbacks if c["class_path"].endswith("HessianSpectrum"))
    assert hessian["init_args"]["top_k"] == 5 and hessian["init_args"]["density"] is False
    assert any(c["class_path"].endswith("GradientNoise") for c in callbacks)


def test_the_example_plugin_readme_names_its_classes():
    text = (REPO / "examples" / "random_features" / "README.md").read_text()
    module = (REPO / "examples" / "random_features" / "overparam_random_features" / "__init__.py").read_text()
    for name in re.findall(r"`(RandomFeatures|LinearTeacherData)`", text):
        assert f"class {name}(" in module
    assert Path(REPO / "examples" / "random_features").name in section("Writing a plugin")
