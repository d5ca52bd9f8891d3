"""The command's entry point answers what needs no training without building the LightningCLI.

Each case runs the entry point in a fresh interpreter and reads which heavy modules it imported
(``sys.modules``), rather than timing it: ``benchmarks/startup.py`` prints the times.
"""

import subprocess
import sys

import pytest

from tests.conftest import run_cli

HEAVY = ("torch", "lightning", "lightning.pytorch.cli", "jsonargparse", "overparam.cli")

# The console script's own code (``from overparam.console import main; sys.exit(main())``),
# then one line naming the heavy modules the command imported.
PROBE = f"""
import sys
from overparam.console import main
code = main(sys.argv[1:])
print("imported:", ",".join(m for m in {HEAVY!r} if m in sys.modules))
sys.exit(code)
"""


def run_probe(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``overparam ARGS`` through the entry point; the process and the heavy modules it imported."""
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)
    last = done.stdout.splitlines()[-1]
    assert last.startswith("imported:"), done.stderr
    return done, set(filter(None, last.removeprefix("imported: ").split(",")))


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_subcommand_and_imports_nothing_heavy(flag):
    done, imported = run_probe(flag)
    assert done.returncode == 0 and not imported, imported
    for sub in ("fit", "validate", "test", "predict", "plugins", "reproduce", "interpolate", "landscape", "connect", "sweep"):
        assert f"\n  {sub} " in done.stdout, sub


@pytest.mark.parametrize(
    "args, message",
    [([], "a subcommand is required; one of fit, validate, test, predict, ensemble"),
     (["fitt"], "unknown subcommand 'fitt'; did you mean fit?"),
     (["zzz", "-c", "x.yaml"], "unknown subcommand 'zzz'; one of fit,")],
)
def test_missing_or_unknown_subcommand_is_one_line_and_imports_nothing_heavy(args, message):
    done, imported = run_probe(*args)
    assert done.returncode == 2 and not imported, imported
    assert done.stderr.startswith("overparam: error: ") and done.stderr.count("\n") == 1 and message in done.stderr


def test_plugins_imports_the_plugins_but_not_the_lightning_cli():
    """Naming a plugin's classes imports it, and its Task/DataModule/Callback subclasses import
    Lightning; the LightningCLI (jsonargparse, ``overparam.cli``) is not built."""
    done, imported = run_probe("plugins")
    assert "TeacherStudent" in done.stdout
    assert not imported & {"lightning.pytorch.cli", "jsonargparse", "overparam.cli"}, imported


def test_lightning_subcommands_are_the_ones_lightning_cli_has():
    from lightning.pytorch.cli import LightningCLI

    from overparam.console import LIGHTNING_COMMANDS

    assert list(LIGHTNING_COMMANDS) == list(LightningCLI.subcommands())


def test_a_lightning_subcommand_keeps_its_own_help(tmp_path):
    helped = run_cli("fit", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "--trainer.max_epochs" in helped.stdout and "--model" in helped.stdout
