"""Callbacks used by DDP tests through the real CLI (importable as ``tests.ddp_helpers``)."""

import json
import os

import lightning.pytorch as pl


class RecordBatches(pl.Callback):
    """Writes, per rank, the first input feature of every training sample seen, per epoch."""

    def __init__(self) -> None:
        self.seen: dict[int, list[float]] = {}

    def on_train_step(self, trainer, pl_module, record) -> None:
        for x, _ in record.data.chunks:
            self.seen.setdefault(record.epoch, []).extend(x[:, 0].tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        path = os.path.join(trainer.log_dir, f"seen_rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump({"world_size": trainer.world_size, "seen": self.seen}, f)
