"""The ``overparam`` command's fit/validate/test/predict: a LightningCLI (``overparam.console``
answers --help and runs overparam's own subcommands without importing this module).

Tasks and DataModules are chosen in subclass mode (``--model TeacherStudent``,
``--data MnistData``); plugins are imported before parsing so short names work. The
DataModule's ``input_shape``, ``num_outputs`` and ``num_train`` (P) are linked to the Task.
Runs log to ``<default_root_dir>/<task>/version_N/`` (``trainer.default_root_dir`` defaults to
``runs``; CSV by default) with the resolved ``config.yaml`` and checkpoints
(``checkpoints/last.ckpt``); ``fit --ckpt_path <run>/checkpoints/last.ckpt`` continues in that
run's folder. Progress goes to stderr (``--progress``). A bad value ends with one line and exit
code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, NoReturn, Optional

import yaml
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from overparam.callbacks.progress import MetricsProgressBar, ProgressLines
from overparam.console import OWN_COMMANDS_HELP as EPILOG
from overparam.console import main  # noqa: F401 - the entry point stays importable as overparam.cli.main
from overparam.console import run_reporting_errors
from overparam.data import OverparamDataModule
from overparam.errors import ConfigError
from overparam.loggers import RunCSVLogger
from overparam.parser_errors import LINKED, condense
from overparam.registry import load_plugins
from overparam.runs import CHECKPOINT_FOLDER, CONFIG_FILE, read_checkpoint, run_folder
from overparam.task import Task

DEFAULT_RUNS_DIR = "runs"
DEFAULT_RUN_NAME = "default"
PROGRESS = ("auto", "bar", "lines", "none")
RUN_CSV_LOGGER = f"{RunCSVLogger.__module__}.{RunCSVLogger.__name__}"
# Lightning's CSVLogger as configs name it; RunCSVLogger stands in (same arguments and files).
LIGHTNING_CSV_LOGGERS = ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger", "CSVLogger")
# ckpt_path values the Trainer resolves itself (no file to check).
CKPT_ALIASES = ("last", "best", "hpc", "registry")


class OverparamArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with one-line errors instead of the usage wall."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"overparam: error: {condense(message)}\n")
        sys.exit(2)


class RunConfigSaver(SaveConfigCallback):
    """Saves ``config.yaml`` into the run folder; with W&B it also goes to the run's config.

    The file goes to ``trainer.log_dir``, the first logger's folder: ``configs/wandb.yaml`` puts
    the CSV logger first, so ``config.yaml`` lands in the local run folder, not in W&B's own
    folder, and W&B receives the config as its run config (no file collision).

    It is the first thing a run writes, so it also guards the folder: a folder that already
    holds a run (two runs forced into one ``version``) is refused unless this fit resumes from
    that run's own checkpoint (then the config is rewritten), and a folder that cannot be
    written is reported as one line naming it.
    """

    #: The folder of the run this fit resumes (set by the CLI): its config.yaml may be rewritten.
    resumed_run: Optional[Path] = None

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if self.already_saved or not self.save_to_log_dir:
            super().setup(trainer, pl_module, stage)
            STARTUP_LINES.release()
            return
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank is here
        taken = trainer.strategy.broadcast(bool(log_dir) and os.path.isfile(os.path.join(log_dir, CONFIG_FILE)))
        if taken:
            if self.resumed_run is None or self.resumed_run != Path(log_dir).resolve():
                raise ConfigError(
                    f"run folder {log_dir} already holds a run ({CONFIG_FILE}); leave trainer.logger.init_args.version "
                    f"unset for a new version_N, or resume that run with --ckpt_path {os.path.join(log_dir, 'checkpoints', 'last.ckpt')}"
                )
            self.overwrite = True  # a resumed run records the config it goes on with
        try:
            super().setup(trainer, pl_module, stage)
        except OSError as exc:
            raise ConfigError(
                f"cannot write the run folder {log_dir}: {exc.strerror or exc}; choose a writable folder with "
                "--trainer.default_root_dir DIR"
            ) from None
        STARTUP_LINES.release()

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = self.parser.dump(self.config, skip_none=False, format="json")
                logger.experiment.config.update({"overparam_config": config}, allow_val_change=True)


class OverparamCLI(LightningCLI):
    """LightningCLI with overparam's Task/DataModule bases, links, defaults and summary."""

    def __init__(self, args: Optional[list[str]] = None, **kwargs: Any) -> None:
        self._checkpoint: Optional[dict[str, Any]] = None  # the --ckpt_path checkpoint, once read
        super().__init__(
            Task,
            OverparamDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfigSaver,
            trainer_defaults={
                "logger": {
                    "class_path": RUN_CSV_LOGGER,
                    "init_args": {"save_dir": DEFAULT_RUNS_DIR, "name": DEFAULT_RUN_NAME},
                },
                # Run folders go to <default_root_dir>/<task>/version_N (the loggers follow it).
                "default_root_dir": DEFAULT_RUNS_DIR,
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
        parser.add_argument(
            "--progress",
            type=Literal[PROGRESS],
            default="auto",
            help="Training progress on stderr: bar (Lightning's), lines (one per epoch, and every 10 s within long "
            "epochs), none; auto: the bar on a terminal unless trainer.enable_progress_bar is false, else lines.",
        )

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path``, then let its hyperparameters replace the config's model, saying so.

        LightningCLI rebuilds the model from the checkpoint's hyperparameters, so the model
        that trains or is tested is the checkpoint's, whatever the config or the flags say;
        every value that differs is named in one warning line. A missing, truncated or
        garbage file is one ConfigError line here, before any folder exists.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in CKPT_ALIASES:
            return
        self._checkpoint = read_checkpoint(ckpt_path)
        hparams = dict(self._checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        before = _model_values(self.config[subcommand])
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        after = _model_values(self.config[subcommand])
        replaced = [f"{k} = {after[k]!r} (config: {before[k]!r})" for k in after if k in before and before[k] != after[k]]
        if replaced:
            doing = "resuming" if subcommand == "fit" else f"{subcommand} runs"
            _warn(f"--ckpt_path: {doing} the checkpoint's model, whose values replace the config's: {'; '.join(replaced)}")

    def before_instantiate_classes(self) -> None:
        """Place the run folder, tie linked values, add the last checkpoint.

        The default CSV run folder is ``<default_root_dir>/<task>/version_N``; a fit resumed
        from ``<run>/checkpoints/*.ckpt`` goes on in ``<run>``. Lightning's ``CSVLogger`` is
        replaced by ``RunCSVLogger``, which writes nothing before the run's first result and
        continues a resumed run's ``metrics.csv`` (Lightning's would delete it).
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        loggers = config.trainer.logger
        loggers = loggers if isinstance(loggers, list) else [loggers]
        task = _snake(str(config.model.class_path).rsplit(".", 1)[-1]) if config.get("model") else "run"
        root = config.trainer.get("default_root_dir") or DEFAULT_RUNS_DIR
        for logger in loggers:
            init_args = logger.get("init_args") if hasattr(logger, "get") else None
            if init_args is None:
                continue
            if logger.get("class_path") in LIGHTNING_CSV_LOGGERS:
                logger["class_path"] = RUN_CSV_LOGGER
            if init_args.get("name") == DEFAULT_RUN_NAME:
                init_args["name"] = task
            if init_args.get("save_dir") == DEFAULT_RUNS_DIR:
                init_args["save_dir"] = str(root)
        if self.subcommand == "fit" and self._checkpoint is not None:
            self._continue_in_run_folder(loggers[0], config.ckpt_path)
        self._tie_input_dim(config)
        self._add_last_checkpoint(config.trainer)

    def _continue_in_run_folder(self, logger: Any, ckpt_path: str) -> None:
        """Point the first logger at ``<run>`` when it is the CSV logger left to number its versions.

        The folder is spelt as the run spelt it (its checkpoint callback's ``dirpath``, relative
        or absolute): Lightning then recognises the folder, restores the checkpoint callback's
        state and overwrites ``last.ckpt`` instead of adding ``last-v1.ckpt``.
        """
        folder = run_folder(ckpt_path)
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if folder is None or init_args is None or init_args.get("version") is not None or logger.get("class_path") != RUN_CSV_LOGGER:
            return
        for state in (self._checkpoint.get("callbacks") or {}).values():
            dirpath = state.get("dirpath") if isinstance(state, dict) else None
            if dirpath and Path(dirpath).resolve() == folder / CHECKPOINT_FOLDER:
                folder = Path(dirpath).parent
                break
        init_args["save_dir"], init_args["name"], init_args["version"] = str(folder.parent.parent), folder.parent.name, folder.name

    def after_instantiate_classes(self) -> None:
        """A resumed fit's logger learns the checkpoint's epoch and step (later rows are redone), and its
        config saver the run folder it may write into again."""
        super().after_instantiate_classes()
        if self.subcommand != "fit" or self._checkpoint is None:
            return
        for logger in self.trainer.loggers:
            if isinstance(logger, RunCSVLogger):
                logger.resumed_at = (int(self._checkpoint.get("epoch", 0)), int(self._checkpoint.get("global_step", 0)))
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunConfigSaver):
                callback.resumed_run = run_folder(self._get(self.config, "ckpt_path"))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer with the progress display ``--progress`` asks for."""
        config = self._get(self.config, "trainer", default=Namespace())
        callbacks = list(self._get(self.config_init, "trainer", default={}).get("callbacks") or [])
        if not any(isinstance(c, (ProgressBar, ProgressLines)) for c in callbacks):
            mode = self._get(self.config, "progress", default="auto")
            if mode == "auto":
                mode = "bar" if config.get("enable_progress_bar") is not False and sys.stderr.isatty() else "lines"
            kwargs["enable_progress_bar"] = mode == "bar"
            extra = {"bar": [MetricsProgressBar()], "lines": [ProgressLines()]}.get(mode, [])
            kwargs["callbacks"] = [*callbacks, *extra]
        return super().instantiate_trainer(**kwargs)

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


def _model_values(config: Namespace) -> dict[str, Any]:
    """``model.class_path`` and ``model.<arg>`` of a parsed config (linked values left out)."""
    model = config.get("model") or Namespace()
    init_args = model.get("init_args") or Namespace()
    values = {"model.class_path": model.get("class_path")}
    values.update({f"model.{k}": v for k, v in vars(init_args).items() if k not in LINKED})
    return values


@rank_zero_only
def _warn(message: str) -> None:
    sys.stderr.write(f"overparam: warning: {message}\n")


class _EpilogFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks (jsonargparse's default formatter refills them)."""


def _snake(name: str) -> str:
    """``TeacherStudent`` -> ``teacher_student``, ``MnistFC`` -> ``mnist_fc`` (run folder names)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class _StartupLines(logging.Filter):
    """Holds Lightning's start-up lines until the run writes its folder, and drops its ad.

    "GPU available: ..." and "TPU available: ..." are logged when the Trainer is built, before
    the data, the callbacks and the run folder are set up; a run refused there (bad labels, an
    unwritable or taken folder, a missing data set) would print them before its one error
    line. Held here, they are printed once ``RunConfigSaver`` has written ``config.yaml``. The
    "💡 Tip" advertising another logging service is dropped.
    """

    HELD = ("GPU available:", "TPU available:", "HPU available:")
    DROPPED = ("\N{ELECTRIC LIGHT BULB} Tip:",)

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.holding = True

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.DROPPED):
            return False
        if self.holding and message.startswith(self.HELD):
            self.held.append(record)
            return False
        return True

    def hold(self) -> None:
        """Hold the start-up lines of a new run (one process may run the CLI several times)."""
        self.held, self.holding = [], True

    def release(self) -> None:
        """Print the held lines now (the run is under way)."""
        held, self.held, self.holding = self.held, [], False
        for record in held:
            logging.getLogger(record.name).handle(record)


STARTUP_LINES = _StartupLines()
# Where Lightning's rank_zero_info lines come from.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(STARTUP_LINES)


def _quiet_known_warnings() -> None:
    # Resident tensors make these DataLoader-centred warnings irrelevant.
    for pattern in (
        ".*does not have many workers.*",
        ".*The number of training batches.*is smaller than the logging interval.*",
        ".*Total length of .* across ranks is zero.*",
        ".*isinstance\\(treespec, LeafSpec\\).*",
        # Task metrics are torchmetrics states already reduced across ranks before logging.
        r".*It is recommended to use `self.log\('(train|val|test)/.*sync_dist=True.*",
        # The Task steps its schedulers itself and reads ReduceLROnPlateau's monitor from it.
        r".*The lr scheduler dict contains the key\(s\) \['monitor'\], but the keys will be ignored.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def run(argv: Optional[list[str]] = None) -> int:
    """fit/validate/test/predict (``overparam.console.main`` sends them here), errors as one line.

    Args:
        argv: the arguments after ``overparam``; None lets LightningCLI read ``sys.argv``.
    """
    load_plugins()
    _quiet_known_warnings()
    STARTUP_LINES.hold()
    # "Seed set to 0" would precede every one-line error; the seed is in config.yaml anyway.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)

    def cli() -> int:
        check_config_files(sys.argv[1:] if argv is None else argv)
        try:
            OverparamCLI(args=argv)
        except MisconfigurationException as exc:  # Lightning's word for a wrong setting
            raise ConfigError(str(exc).strip().splitlines()[0]) from exc
        return 0

    return run_reporting_errors(cli)


def check_config_files(args: list[str]) -> None:
    """Each ``-c``/``--config`` file that exists must be YAML: a syntax error names the file.

    (jsonargparse reads the text and reports ``"<unicode string>", line 3`` instead.)
    """
    paths = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-c", "--config")]
    paths += [arg.partition("=")[2] for arg in args if arg.startswith("--config=")]
    for path in paths:
        if not os.path.isfile(path):
            continue  # jsonargparse says so, naming the option
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"--config {path}: not valid YAML{where}: {exc.problem or exc.context}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML: {str(exc).splitlines()[0]}") from None


if __name__ == "__main__":
    sys.exit(main())
