"""CIFAR-CNN on the real (re-encoded) CIFAR-10 copy: options, integrity switch, augmentation, learning."""

from __future__ import annotations

import os
import stat
import sys
import urllib.error
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from overparam.datasets import load_cifar10
from overparam.errors import ConfigError
from overparam.models import ConvNet, count_parameters
from overparam.plugins.cifar_cnn import CifarCNN, CifarData, random_crop_flip

REPO = Path(__file__).resolve().parents[1]
UNVERIFIED = pytest.mark.filterwarnings("ignore:.*md5 check is off")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch):
    """No test may reach the network (a failed md5 check would otherwise try to download)."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def cifar(root: Path, **kwargs) -> CifarData:
    data = CifarData(data_dir=str(root), verify_integrity=False, **kwargs)
    data.setup()
    return data


@pytest.fixture(scope="module")
def small(cifar_root: Path) -> CifarData:
    with pytest.warns(UserWarning, match="md5 check is off"):
        return cifar(cifar_root, n_train=500, n_test=200, val_size=100)


def test_unverified_copy_loads_and_caches_outside_the_shared_folder(cifar_root: Path, small: CifarData):
    folder = cifar_root / "cifar-10-batches-py"
    x, y = small.raw["train"]
    assert x.dtype == torch.uint8 and x.shape == (500, 3, 32, 32)
    assert torch.bincount(y).tolist() == [50] * 10
    assert torch.bincount(small.raw["val"][1]).tolist() == [10] * 10
    writable_here = not folder.is_symlink() and os.stat(folder).st_mode & stat.S_IWUSR
    cache = (folder if writable_here else cifar_root / "overparam-cache" / folder.name) / "overparam-uint8-train.pt"
    assert cache.is_file()
    if not writable_here:
        assert not (folder / "overparam-uint8-train.pt").exists(), "cache written into a shared folder"


@UNVERIFIED
def test_decoded_images_match_the_documented_copy(cifar_root: Path):
    splits = load_cifar10(cifar_root, verify_integrity=False)
    x, y = splits["train"]
    assert x.shape == (50_000, 3, 32, 32) and splits["test"][0].shape == (10_000, 3, 32, 32)
    assert y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # shared/data/README.md
    assert splits["test"][1][:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    mean = x[:10_000].double().mean((0, 2, 3)) / 255
    assert (mean - torch.tensor([0.4913, 0.4821, 0.4465], dtype=torch.float64)).abs().max() < 0.01


def test_verified_load_of_the_reencoded_copy_is_one_line(cifar_root: Path):
    with pytest.raises(ConfigError, match="fail torchvision's md5 check") as error:
        CifarData(data_dir=str(cifar_root), n_train=10).setup()
    assert "\n" not in str(error.value) and "data.verify_integrity=false" in str(error.value)


def test_missing_data_offline_is_one_line(tmp_path: Path):
    with pytest.raises(ConfigError) as error:
        CifarData(data_dir=str(tmp_path)).setup()
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "cifar-10-batches-py") in message and "download failed" in message


@UNVERIFIED
def test_binary_labels_are_vehicles_against_animals(cifar_root: Path, small: CifarData):
    binary = cifar(cifar_root, n_train=500, n_test=200, val_size=100, labels="binary")
    assert binary.num_outputs == 1 and small.num_outputs == 10
    for split in ("train", "val", "test"):
        classes = small.raw[split][1]
        vehicle = (classes == 0) | (classes == 1) | (classes == 8) | (classes == 9)
        assert torch.equal(binary.split(split)[1], torch.where(vehicle, 1.0, -1.0))


@UNVERIFIED
def test_label_noise_and_input_noise(cifar_root: Path, small: CifarData):
    noisy = cifar(cifar_root, n_train=500, n_test=200, val_size=100, label_noise=0.4, input_noise=0.1)
    assert (noisy.split("train")[1] != small.split("train")[1]).sum() == 200
    delta = noisy.split("train")[0] - small.split("train")[0]
    assert abs(delta.std().item() - 0.1) < 0.002
    assert torch.equal(noisy.split("test")[0], small.split("test")[0])


def test_normalised_per_channel(small: CifarData):
    x = small.split("train")[0]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (small.raw["train"][0].float() / 255 - mean) / std)


def test_random_crop_flip_against_a_loop():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    generator = torch.Generator().manual_seed(3)
    out = random_crop_flip(x, 2, generator)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):  # the output must be one of the 25 crops, flipped or not
        crops = [padded[b, :, i : i + 5, j : j + 5] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], c) or torch.equal(out[b], c.flip(-1)) for c in crops)
    # Without padding every image is itself or its mirror image, and both occur.
    flips = [torch.equal(o, i.flip(-1)) for o, i in zip(random_crop_flip(x.repeat(20, 1, 1, 1), 0, generator), x.repeat(20, 1, 1, 1))]
    assert 0 < sum(flips) < 40


def test_augmentation_only_on_training_batches(cifar_root: Path, small: CifarData):
    with pytest.warns(UserWarning):
        augmented = cifar(cifar_root, n_train=500, n_test=200, val_size=100, augment=True)
    loader = augmented.train_dataloader()
    assert loader.transform is not None
    step = next(iter(loader))[0]
    (x, y), n = step.chunks[0], step.global_size
    assert x.shape == (128, 3, 32, 32) and n == 128 and not step.whole_train_set
    order = loader.permutation(0)[:128]
    assert not torch.equal(x, augmented.split("train")[0][order]), "training batch was not augmented"
    assert torch.equal(y, augmented.split("train")[1][order])
    assert torch.equal(next(iter(loader))[0].chunks[0][0], x), "augmentation must be seeded"
    val_x = next(iter(augmented.val_dataloader()))[0]
    assert torch.equal(val_x, augmented.split("val")[0])


def test_width_scales_channels_and_N():
    net = ConvNet(3, 10, width=64)
    convs = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [64, 128, 256]
    assert count_parameters(net) == 90 * 64**2 + 74 * 64 + 10 == 373_386
    task = CifarCNN(width=4, input_shape=(3, 32, 32), num_outputs=1, ensemble_size=3)
    assert task(torch.zeros(5, 3, 32, 32)).shape == (3, 5, 1)


def test_batch_norm_with_an_ensemble_is_refused():
    CifarCNN(width=4, input_shape=(3, 32, 32), num_outputs=10, batch_norm=True)  # K = 1 is fine
    with pytest.raises(ConfigError, match="BatchNorm"):
        CifarCNN(width=4, input_shape=(3, 32, 32), num_outputs=10, batch_norm=True, ensemble_size=2)


@UNVERIFIED
def test_small_cnn_learns_vehicles_vs_animals_in_seconds(cifar_root: Path):
    data = CifarData(data_dir=str(cifar_root), verify_integrity=False, n_train=2000, n_test=1000, labels="binary", batch_size=50)
    task = CifarCNN(width=8, input_shape=data.input_shape, num_outputs=1, num_train=data.num_train, lr=0.05, momentum=0.9)
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, datamodule=data)
    error = trainer.test(task, datamodule=data, verbose=False)[0]["test/error"]
    assert error < 0.25, f"test error {error:.3f} (always 'animal' gives 0.40)"


@UNVERIFIED
def test_config_gives_the_documented_network(cifar_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from overparam.cli import OverparamCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["overparam"])
    args = ["-c", str(REPO / "configs" / "cifar_cnn.yaml"), f"--data.data_dir={cifar_root}"]
    cli = OverparamCLI(args=args, run=False)
    assert isinstance(cli.model, CifarCNN) and cli.model.N == 373_386
    assert cli.datamodule.num_train == 45_000 and cli.datamodule.augment
