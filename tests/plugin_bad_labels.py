"""A DataModule whose labels do not fit its outputs (label 7 with 3 outputs), for the CLI error tests.

Loaded by class path (``--data tests.plugin_bad_labels.SevenOfThree``) in process, or with
``OVERPARAM_PLUGINS=tests.plugin_bad_labels`` in a subprocess.
"""

import torch

from overparam.data import OverparamDataModule


class SevenOfThree(OverparamDataModule):
    """Three outputs, and one training label 7: a plugin author's off-by-a-few bug."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (4,)

    @property
    def num_outputs(self) -> int:
        return 3

    @property
    def num_train(self) -> int:
        return 32

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        y = torch.randint(3, (32,), generator=generator)
        y[5] = 7
        return {"train": (torch.randn(32, 4, generator=generator), y), "test": (torch.randn(8, 4), torch.zeros(8, dtype=torch.long))}
