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
import json
import os
from typing import Any, Optional

import torch

from overparam.errors import ConfigError
from overparam.runs import import_class, load_run, read_yaml



@torch.no_grad()
def evaluate(ckpts: list[str], data_config: Optional[str], split: str, device: str, batch_size: int) -> dict[str, Any]:
    """Stack every run's member outputs on ``split`` and compute the ensemble statistics."""
    from overparam.metrics import EnsembleStatistics

    runs = [load_run(p, "--ckpts", device) for p in ckpts]
    configs = [run.config for run in runs]
    if data_config and not os.path.isfile(data_config):
        raise ConfigError(f"--data: {data_config} does not exist")
    data_section = read_yaml(data_config).get("data") if data_config else configs[0].get("data")
    if not data_config:
        others = [c for c in configs[1:] if _data_key(c.get("data")) != _data_key(data_section)]
        if others:
            raise ConfigError("--ckpts: the runs were trained on different data; pass --data CONFIG.yaml to choose one")
    if not isinstance(data_section, dict) or "class_path" not in data_section:
        raise ConfigError("--data: the config has no data: section with a class_path")
    datamodule = import_class(data_section["class_path"], "--data")(**(data_section.get("init_args") or {}))
    dev = torch.device(device)
    tasks = [run.task for run in runs]
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
    result.update(runs=[run.checkpoint for run in runs], members=K, N=[int(t.N) for t in tasks], split=split)
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
