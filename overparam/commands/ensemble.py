"""``overparam ensemble --ckpts A B C ...``: evaluate the average of separately trained runs.

Each argument is a run folder (with ``config.yaml`` and ``checkpoints/last.ckpt``) or a
``.ckpt`` file inside one. The data come from the first run's ``config.yaml`` unless ``--data
CONFIG.yaml`` (a config with a ``data:`` section, short class names allowed) is given. Every
run's outputs on the split are stacked (a run trained with ``ensemble_size`` K adds its K
members) and the statistics of ``overparam.metrics.EnsembleStatistics`` are printed: the
error and loss of f_bar = mean_k f_k, the mean member error and loss, the output fluctuation.

    overparam ensemble --ckpts runs/a runs/b runs/c --split test --output ensemble.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from typing import Any, Optional

import torch
import yaml

from overparam.errors import ConfigError

LAST = os.path.join("checkpoints", "last.ckpt")


def find_run(path: str) -> tuple[str, str]:
    """``(checkpoint, config.yaml)`` of a run folder or of a checkpoint file inside one."""
    if os.path.isdir(path):
        ckpt, folder = os.path.join(path, LAST), path
    else:
        ckpt = path
        folder = os.path.dirname(os.path.dirname(os.path.abspath(path)))  # <run>/checkpoints/x.ckpt
    if not os.path.isfile(ckpt):
        raise ConfigError(f"--ckpts: no checkpoint at {ckpt!r}; give a run folder holding {LAST} or a .ckpt file")
    config = os.path.join(folder, "config.yaml")
    if not os.path.isfile(config):
        raise ConfigError(f"--ckpts: no config.yaml in the run folder {folder!r} of {ckpt!r}")
    return ckpt, config


def resolve_class(class_path: str) -> type:
    """A class from its full path, or by short name among the installed plugins' classes."""
    if "." in class_path:
        module, name = class_path.rsplit(".", 1)
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise ConfigError(f"unknown class {class_path!r}") from None
    from overparam.registry import load_plugins

    for plugin in load_plugins().values():
        if class_path in plugin.tasks + plugin.datamodules:
            return getattr(importlib.import_module(plugin.module), class_path)
    raise ConfigError(f"unknown class {class_path!r}; `overparam plugins` lists the installed ones")


def load_config(path: str) -> dict[str, Any]:
    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def build_datamodule(section: dict[str, Any]) -> Any:
    """A DataModule from a config's ``data: {class_path, init_args}`` section."""
    if not isinstance(section, dict) or "class_path" not in section:
        raise ConfigError("--data: the config has no data: section with a class_path")
    return resolve_class(section["class_path"])(**(section.get("init_args") or {}))


def load_task(ckpt: str, config: dict[str, Any], device: torch.device) -> Any:
    """The trained task of one run, in eval mode (its class from ``model.class_path``)."""
    cls = resolve_class(config["model"]["class_path"])
    task = cls.load_from_checkpoint(ckpt, map_location=device, weights_only=False)
    return task.eval()


@torch.no_grad()
def evaluate(ckpts: list[str], data_config: Optional[str], split: str, device: str, batch_size: int) -> dict[str, Any]:
    """Stack every run's member outputs on ``split`` and compute the ensemble statistics."""
    from overparam.metrics import EnsembleStatistics

    runs = [find_run(p) for p in ckpts]
    configs = [load_config(c) for _, c in runs]
    data_section = load_config(data_config)["data"] if data_config else configs[0].get("data")
    if not data_config:
        others = [c for c in configs[1:] if _data_key(c.get("data")) != _data_key(data_section)]
        if others:
            raise ConfigError("--ckpts: the runs were trained on different data; pass --data CONFIG.yaml to choose one")
    datamodule = build_datamodule(data_section)
    dev = torch.device(device)
    tasks = [load_task(ckpt, cfg, dev) for (ckpt, _), cfg in zip(runs, configs)]
    dtype = next(tasks[0].parameters()).dtype
    outputs_of = {t.num_outputs for t in tasks}
    if len(outputs_of) != 1 or datamodule.num_outputs not in outputs_of:
        raise ConfigError(f"--ckpts: runs have {sorted(outputs_of)} outputs, the data {datamodule.num_outputs}; they must agree")
    splits = datamodule.load_splits()
    if split not in splits:
        raise ConfigError(f"--split: the data have no {split!r} split; they have {sorted(splits)}")
    x_all, y_all = splits[split]
    tasks = [t.to(dtype) for t in tasks]
    K = sum(t.ensemble_size for t in tasks)
    sums = EnsembleStatistics(K, tasks[0].loss_fn).to(dev)
    for start in range(0, x_all.shape[0], batch_size):
        x = x_all[start : start + batch_size].to(dev)
        x = x.to(dtype) if x.is_floating_point() else x
        y = y_all[start : start + batch_size].to(dev)
        y = y.to(dtype) if y.is_floating_point() else y
        outputs = torch.cat([t.member_outputs(x) for t in tasks])  # (K, B, C)
        sums.update(outputs, y)
    result = sums.compute()
    result.update(runs=[c for c, _ in runs], members=K, N=[int(t.N) for t in tasks], split=split)
    return result


def _data_key(section: Any) -> str:
    # Batch sizes do not change the data; everything else does.
    if not isinstance(section, dict):
        return repr(section)
    args = {k: v for k, v in (section.get("init_args") or {}).items() if k not in ("batch_size", "eval_batch_size")}
    return json.dumps([section.get("class_path"), args], sort_keys=True, default=str)


def format_result(result: dict[str, Any]) -> str:
    lines = [
        f"{result['members']} members from {len(result['runs'])} runs, {result['points']:,} {result['split']} points",
        f"ensemble (f_bar) error {result['ensemble_error']:.4%}  loss {result['ensemble_loss']:.6g}",
        f"mean member      error {result['mean_member_error']:.4%}  loss {result['mean_member_loss']:.6g}",
        f"output fluctuation mean_k |f_k - f_bar|^2 = {result['fluctuation']:.6g}",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="overparam ensemble", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpts", nargs="+", required=True, help="run folders or .ckpt files (two or more)")
    parser.add_argument("--data", default=None, help="config YAML whose data: section to evaluate on (default: the first run's)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=8192, help="evaluation chunk (memory only)")
    parser.add_argument("--output", default=None, help="write the numbers as JSON to this file")
    args = parser.parse_args(argv)
    result = evaluate(args.ckpts, args.data, args.split, args.device, args.batch_size)
    print(format_result(result))
    if args.output:
        serial = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in result.items()}
        with open(args.output, "w") as fh:
            json.dump(serial, fh, indent=2)
    return 0
