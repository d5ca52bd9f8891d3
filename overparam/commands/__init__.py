"""overparam's own subcommands, beside LightningCLI's fit/validate/test/predict.

Each entry maps a subcommand to ``(module, one-line help)``; the module has
``main(argv: list[str]) -> int``. Modules are imported only when their command runs, so
``overparam fit`` pays nothing for them.
"""

COMMANDS: dict[str, tuple[str, str]] = {
    "plugins": ("overparam.commands.plugins", "List installed plugins with their Task, DataModule and Callback classes."),
}
