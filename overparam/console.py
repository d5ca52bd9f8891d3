"""The ``overparam`` command's entry point, light enough to answer without importing Lightning.

``overparam --help``, a missing or misspelt subcommand and overparam's own subcommands
(``overparam.commands``, each importing only what it uses) are answered here. Only
fit/validate/test/predict import ``overparam.cli``, which builds the LightningCLI and so imports
Lightning and torch: most of a second for torch alone and ~5 s for Lightning on a 2-core CPU
(``python -X importtime``; ``benchmarks/startup.py`` times the commands).
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Callable, Optional

from overparam.commands import COMMANDS
from overparam.errors import ConfigError, DivergenceError

# LightningCLI's subcommands, as ``LightningCLI.subcommands()`` names them (a test keeps the two
# in step), with overparam's own one-line help: Lightning's are its Trainer docstrings.
LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "Train a task, then test the final network and print the summary (--summary false skips both).",
    "validate": "One evaluation pass over the validation split (e.g. of a checkpoint: --ckpt_path).",
    "test": "One evaluation pass over the test split (e.g. of a checkpoint: --ckpt_path).",
    "predict": "The network's outputs on the predict split (Lightning's Trainer.predict).",
}


def _rows(helps: dict[str, str]) -> str:
    return "\n".join(f"  {name:13s}{help_}" for name, help_ in helps.items())


OWN_COMMANDS_HELP = "overparam's own subcommands:\n" + _rows({name: help_ for name, (_, help_) in COMMANDS.items()})

HELP = f"""usage: overparam [-h] SUBCOMMAND ...

Experiments on over-parametrised networks: LightningCLI's subcommands, with YAML configs
(-c FILE) and dotted flags, plus overparam's own. `overparam SUBCOMMAND --help` lists the
options of one subcommand; `overparam fit -c CONFIG --print_config` shows a whole config.

LightningCLI subcommands:
{_rows(LIGHTNING_COMMANDS)}

{OWN_COMMANDS_HELP}"""


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``overparam`` console script, ``python -m overparam`` and in-process calls.

    Args:
        argv: the arguments after ``overparam``; None reads ``sys.argv`` (LightningCLI then
            parses it itself).

    Returns:
        The exit code: 0 on success, 2 for a bad input, 3 for a diverged run.
    """
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(HELP)
        return 0
    if args and args[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[args[0]][0])
        return run_reporting_errors(lambda: module.main(args[1:]))
    # Before the subcommand LightningCLI only takes options (-c, --print_config), so anything
    # else first is a wrong subcommand: say so without paying for Lightning's import.
    if not args or (args[0] not in LIGHTNING_COMMANDS and not args[0].startswith("-")):
        return _bad_subcommand(args[0] if args else None)
    from overparam.cli import run

    return run(None if argv is None else args)


def _bad_subcommand(given: Optional[str]) -> int:
    """One line for a missing or unknown subcommand (exit code 2), naming what is allowed."""
    known = [*LIGHTNING_COMMANDS, *COMMANDS]
    close = difflib.get_close_matches(given, known, n=2) if given else []
    problem = "a subcommand is required" if given is None else f"unknown subcommand {given!r}"
    allowed = f"did you mean {' or '.join(close)}?" if close else f"one of {', '.join(known)} (overparam --help)"
    sys.stderr.write(f"overparam: error: {problem}; {allowed}\n")
    return 2


def run_reporting_errors(run: Callable[[], Optional[int]]) -> int:
    """Run a command; a ConfigError or DivergenceError anywhere in the chain becomes one line.

    Returns:
        The command's exit code, 2 after a ConfigError, 3 after a DivergenceError.

    Raises:
        Exception: any other error, unchanged (a bug, shown with its traceback).
    """
    try:
        return int(run() or 0)
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is one of ours
        cause = _our_error(exc)
        if cause is None:
            raise
        sys.stderr.write(f"overparam: error: {cause}\n")
        return 3 if isinstance(cause, DivergenceError) else 2


def _our_error(exc: Optional[BaseException]) -> Optional[Exception]:
    """The ConfigError/DivergenceError that caused ``exc`` (jsonargparse and Lightning wrap them)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (ConfigError, DivergenceError)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
