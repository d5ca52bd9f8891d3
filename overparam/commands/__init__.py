"""overparam's own subcommands, beside LightningCLI's fit/validate/test/predict.

Each entry maps a subcommand to ``(module, one-line help)``; the module has
``main(argv: list[str]) -> int``. Modules are imported only when their command runs, so
``overparam fit`` pays nothing for them.
"""

COMMANDS: dict[str, tuple[str, str]] = {
    "ensemble": ("overparam.commands.ensemble", "Evaluate the average of separately trained runs: ensemble error, member errors, output fluctuation."),
    "report": ("overparam.commands.report", "Reports over a folder of runs: `report jamming RUNS_DIR` draws the phase diagram and locates N*."),
    "sweep": ("overparam.commands.sweep", "Run a W&B sweep YAML's grid locally, one resumable run folder per point."),
    "reproduce": ("overparam.commands.reproduce", "Reproduce one observation of the talk end to end (figures + numbers); `reproduce list`."),
    "plugins": ("overparam.commands.plugins", "List installed plugins with their Task, DataModule and Callback classes."),
    "interpolate": ("overparam.commands.interpolate", "Loss and error along a line or curve between two runs (or away from one); barrier heights."),
    "landscape": ("overparam.commands.landscape", "Loss and error on a plane around a run (filter, Hessian, trajectory PCA, three runs): contours, 3D surface."),
    "connect": ("overparam.commands.connect", "Fit a Bezier/polychain curve between two runs (Garipov et al. 2018) and report its barrier."),
}
