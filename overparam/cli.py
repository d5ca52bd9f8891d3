"""The ``overparam`` command's fit/validate/test/predict: a LightningCLI (``overparam.console``
answers --help and runs overparam's own subcommands without importing this module).

Tasks and DataModules are chosen in subclass mode (``--model TeacherStudent``,
``--data MnistData``); plugins are imported before parsing so short names work. The
DataModule's ``input_shape``, ``num_outputs`` and ``num_train`` (P) are linked to the Task.
Runs log to ``runs/<task>/version_N/`` (CSV by default) with the resolved ``config.yaml``
and checkpoints (``checkpoints/last.ckpt``). A bad value ends with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import logging
import re
import sys
import warnings
from typing import Any, NoReturn, Optional

from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from overparam.console import OWN_COMMANDS_HELP as EPILOG
from overparam.console import main  # noqa: F401 - the entry point stays importable as overparam.cli.main
from overparam.console import run_reporting_errors
from overparam.data import OverparamDataModule
from overparam.registry import load_plugins, suggest
from overparam.task import Task

DEFAULT_RUNS_DIR = "runs"
DEFAULT_RUN_NAME = "default"
LINKED = ("input_shape", "num_outputs", "num_train")


def condense_parser_error(message: str) -> str:
    """One line out of jsonargparse's nested error report, naming the option and what is allowed."""
    text = " ".join(line.strip(" -") for line in message.strip().splitlines() if line.strip(" -"))
    key_match = re.match(r'Parser key "([^"]+)":', text)
    key = key_match.group(1) if key_match else None
    option = f"--{key}" if key else "config"

    not_accepted = re.search(r"class_path '([\w.]+)': Option '([^']+)' is not accepted", text)
    if not_accepted:
        class_path, name = not_accepted.groups()
        return f"{option}.{name}: no such option of {class_path.rsplit('.', 1)[-1]}; {_allowed_options(class_path, name)}"
    bad_class = re.search(r"Expected a path but ([\w.]+) either not accessible", text) or re.search(
        r"Import path ([\w.]+) does not", text
    )
    if bad_class and key:
        kind = {"model": "tasks", "data": "datamodules"}.get(key.split(".")[0], "callbacks")
        name = bad_class.group(1)
        return f"{option}: unknown class {name!r}; {suggest(name.rsplit('.', 1)[-1], kind)}"
    unknown_key = re.search(r"does not accept option '([^']+)'", text)
    if unknown_key:
        return _unknown_key(unknown_key.group(1))
    given = re.search(r"Given value: (.*)$", text)
    expected = re.findall(r"Expected an? <class '([\w.]+)'>", text)
    if key and given and expected:
        allowed = " or ".join(dict.fromkeys("None" if e == "NoneType" else e for e in expected))
        return f"{option}: expected {allowed}, got {given.group(1)!r}"
    if key == "config" or "File does not exist" in text:
        return re.sub(r'^Parser key "[^"]+": ', f"{option}: ", text)
    return text[:400]


def _unknown_key(key: str) -> str:
    """A config key that does not exist: suggest the closest Trainer argument or section."""
    import lightning.pytorch as pl

    group, _, name = key.rpartition(".")
    if group == "trainer":
        names = [n for n in inspect.signature(pl.Trainer.__init__).parameters if n != "self"]
    elif not group:
        names = ["model", "data", "trainer", "optimizer", "lr_scheduler", "seed_everything", "ckpt_path", "summary"]
    else:
        return f"--{key}: no such option"
    close = difflib.get_close_matches(name, names, n=2)
    hint = f"did you mean {' or '.join(close)}?" if close else f"allowed: {', '.join(names)}"
    return f"--{key}: no such option; {hint}"


def _allowed_options(class_path: str, wrong: str) -> str:
    """``did you mean X?`` or the accepted init arguments of a class (with its bases)."""
    try:
        module, name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return "see --print_config"
    names = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names += [n for n in inspect.signature(klass.__init__).parameters if n not in ("self", "args", "kwargs")]
    names = list(dict.fromkeys(n for n in names if n not in LINKED))
    close = difflib.get_close_matches(wrong, names, n=2)
    return f"did you mean {' or '.join(close)}?" if close else f"allowed: {', '.join(names)}"


class OverparamArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with one-line errors instead of the usage wall."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"overparam: error: {condense_parser_error(message)}\n")
        sys.exit(2)


class RunConfigSaver(SaveConfigCallback):
    """Saves ``config.yaml`` into the run folder; with W&B it also goes to the run's config.

    The file goes to ``trainer.log_dir``, the first logger's folder: ``configs/wandb.yaml`` puts
    the CSV logger first, so ``config.yaml`` lands in the local run folder, not in W&B's own
    folder, and W&B receives the config as its run config (no file collision).
    """

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = self.parser.dump(self.config, skip_none=False, format="json")
                logger.experiment.config.update({"overparam_config": config}, allow_val_change=True)


class OverparamCLI(LightningCLI):
    """LightningCLI with overparam's Task/DataModule bases, links, defaults and summary."""

    def __init__(self, args: Optional[list[str]] = None, **kwargs: Any) -> None:
        super().__init__(
            Task,
            OverparamDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfigSaver,
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": DEFAULT_RUNS_DIR, "name": DEFAULT_RUN_NAME},
                },
                # Loaders are cheap views of resident tensors; rebuilding them every epoch lets
                # the batch size change between epochs (batch-size switching, GD).
                "reload_dataloaders_every_n_epochs": 1,
                "log_every_n_steps": 10,
            },
            seed_everything_default=0,
            parser_class=OverparamArgumentParser,
            parser_kwargs={"prog": "overparam", "epilog": EPILOG, "formatter_class": _EpilogFormatter},
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in LINKED:
            # A list keeps the checkpoint's hparams and hparams.yaml plain YAML (no tuple tag).
            compute = list if name == "input_shape" else None
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", compute_fn=compute, apply_on="instantiate")
        parser.add_argument(
            "--summary",
            type=bool,
            default=True,
            help="After fit: test the final model and print N, P and the final train/test loss and error.",
        )

    def before_instantiate_classes(self) -> None:
        """Name the default CSV run folder after the task: ``runs/<task>/version_N``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers = config.trainer.logger
        task = _snake(str(config.model.class_path).rsplit(".", 1)[-1]) if config.get("model") else "run"
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = logger.get("init_args") if hasattr(logger, "get") else None
            if init_args is not None and init_args.get("name") == DEFAULT_RUN_NAME:
                init_args["name"] = task
        self._tie_input_dim(config)
        self._add_last_checkpoint(config.trainer)

    @staticmethod
    def _tie_input_dim(config: Namespace) -> None:
        """``data.input_dim: width`` takes the model's width (d = h, the jamming papers' random data)."""
        data = (config.get("data") or Namespace()).get("init_args") or Namespace()
        if data.get("input_dim") != "width":
            return
        width = ((config.get("model") or Namespace()).get("init_args") or Namespace()).get("width")
        if isinstance(width, bool) or not isinstance(width, int):
            raise ConfigError(f"data.input_dim: width needs one integer model.width, got {width!r}")
        data["input_dim"] = width

    @staticmethod
    def _add_last_checkpoint(trainer: Namespace) -> None:
        """Keep ``checkpoints/last.ckpt`` (resume) unless checkpointing is off or configured.

        ``LastCheckpoint``: at epoch ends, at most every 30 s, and at the end of training.
        """
        if trainer.get("enable_checkpointing") is False:
            return
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if any("Checkpoint" in str(c.get("class_path", "")) for c in callbacks if hasattr(c, "get")):
            return
        checkpoint = Namespace(class_path="overparam.checkpoint.LastCheckpoint", init_args=Namespace(every_n_seconds=30.0))
        trainer["callbacks"] = [*callbacks, checkpoint]

    def after_fit(self) -> None:
        """Evaluate the final network exactly on the whole training set, test it, print the summary."""
        if not self._get(self.config, "summary") or self.trainer.interrupted or self.trainer.fast_dev_run:
            return
        train = {}
        if self.datamodule is not None and "train" in self.datamodule.splits:
            num_train = self.datamodule.split("train")[0].shape[0]
            self.model.eval()
            final = self.model.evaluate(self.datamodule.analysis_batches("train", size=num_train))
            train = {"train/loss": float(final["loss"].mean()), "train/error": float(final["error"].mean())}
            if self.trainer.is_global_zero:
                for logger in self.trainer.loggers:
                    logger.log_metrics({f"final/{k.replace('/', '_')}": v for k, v in train.items()}, step=self.trainer.global_step)
        test = {}
        if self.datamodule is not None and "test" in self.datamodule.splits:
            results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            test = results[0] if results else {}
        self._print_summary(train, test, self.trainer.log_dir)  # log_dir is a collective: all ranks

    @rank_zero_only
    def _print_summary(self, train: dict[str, float], test: dict[str, float], log_dir: Optional[str]) -> None:
        model = self.model
        rows = [f"N = {model.N:,}  P = {model.num_train:,}  K = {model.ensemble_size}"]
        for split, values in (("train", train), ("test", test)):
            loss, error = values.get(f"{split}/loss"), values.get(f"{split}/error")
            if loss is not None:
                rows.append(f"{split:5s} loss {loss:.6g}  error {error:.4%}")
        if log_dir:
            rows.append(f"run folder: {log_dir}")
        print("overparam summary: " + "\n                   ".join(rows))


class _EpilogFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks (jsonargparse's default formatter refills them)."""


def _snake(name: str) -> str:
    """``TeacherStudent`` -> ``teacher_student``, ``MnistFC`` -> ``mnist_fc`` (run folder names)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _quiet_known_warnings() -> None:
    # Resident tensors make these DataLoader-centred warnings irrelevant.
    for pattern in (
        ".*does not have many workers.*",
        ".*The number of training batches.*is smaller than the logging interval.*",
        ".*Total length of .* across ranks is zero.*",
        ".*isinstance\\(treespec, LeafSpec\\).*",
        # Task metrics are torchmetrics states already reduced across ranks before logging.
        r".*It is recommended to use `self.log\('(train|val|test)/.*sync_dist=True.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def run(argv: Optional[list[str]] = None) -> int:
    """fit/validate/test/predict (``overparam.console.main`` sends them here), errors as one line.

    Args:
        argv: the arguments after ``overparam``; None lets LightningCLI read ``sys.argv``.
    """
    load_plugins()
    _quiet_known_warnings()
    # "Seed set to 0" would precede every one-line error; the seed is in config.yaml anyway.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    return run_reporting_errors(lambda: OverparamCLI(args=argv) and 0)


if __name__ == "__main__":
    sys.exit(main())
