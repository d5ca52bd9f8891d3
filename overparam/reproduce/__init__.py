"""One module per observation of the talk; ``overparam reproduce NAME`` runs one end to end.

Each module defines ``TITLE`` and ``run(scale, out, runs) -> dict``: it trains what the
observation needs (``scale`` is ``small`` for a laptop CPU in minutes, ``full`` for the talk's
scale on one GPU), writes its figures (PNG) into ``out`` and returns the numbers, which the
command saves as ``out/<name>.json`` and prints. ``_runs.fit`` runs one ``overparam fit``.
"""

import ast
import importlib.util

OBSERVATIONS: dict[str, str] = {
    "edge_of_stability": "overparam.reproduce.edge_of_stability",
    "gd_vs_sgd": "overparam.reproduce.gd_vs_sgd",
    "ggn_split": "overparam.reproduce.ggn_split",
    "grokking": "overparam.reproduce.grokking",
    "hessian_spectrum": "overparam.reproduce.hessian_spectrum",
    "jamming": "overparam.reproduce.jamming",
    "lb_vs_sb": "overparam.reproduce.lb_vs_sb",
    "loss_surfaces": "overparam.reproduce.loss_surfaces",
    "mode_connectivity": "overparam.reproduce.mode_connectivity",
    "sgd_noise": "overparam.reproduce.sgd_noise",
}


def title(name: str) -> str:
    """The ``TITLE`` of observation ``name``, read from its source without importing it (the
    modules import torch and matplotlib: ``overparam reproduce list`` should not wait for them)."""
    origin = importlib.util.find_spec(OBSERVATIONS[name]).origin
    for node in ast.parse(open(origin).read()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "TITLE" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{OBSERVATIONS[name]} defines no TITLE")
