"""MNIST-FC on the real digits: every data option, the offline error, learning, the config."""

from __future__ import annotations

import gzip
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from overparam.datasets import balanced_subset, load_mnist
from overparam.errors import ConfigError
from overparam.plugins.mnist_fc import MnistData, MnistFC, pca_projection

REPO = Path(__file__).resolve().parents[1]


def mnist(root: Path, **kwargs) -> MnistData:
    data = MnistData(data_dir=str(root), **kwargs)
    data.setup()
    return data


def rows(x: torch.Tensor) -> list[bytes]:
    """Each image as bytes, to compare images across splits and configurations."""
    return [r.numpy().tobytes() for r in x.flatten(1)]


@pytest.fixture(scope="module")
def plain(mnist_root: Path) -> MnistData:
    return mnist(mnist_root, n_train=1000, n_test=500, val_size=500)


def test_decoded_once_and_cached(mnist_root: Path):
    splits = load_mnist(mnist_root)
    assert splits["train"][0].shape == (60_000, 1, 28, 28) and splits["train"][0].dtype == torch.uint8
    assert splits["test"][0].shape == (10_000, 1, 28, 28)
    # Published facts of the official release (shared/data/README.md).
    assert splits["train"][1][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert torch.bincount(splits["test"][1]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(splits["train"][0].double().mean().item() / 255 - 0.1307) < 1e-4
    assert (mnist_root / "MNIST" / "raw" / "overparam-uint8-train.pt").is_file()


def test_second_load_reads_the_cache_without_torchvision(mnist_root: Path, monkeypatch: pytest.MonkeyPatch):
    load_mnist(mnist_root)  # builds the cache if needed
    import torchvision.datasets

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again although the cache is fresh")

    monkeypatch.setattr(torchvision.datasets, "MNIST", refuse)
    assert load_mnist(mnist_root)["test"][0].shape == (10_000, 1, 28, 28)


def test_subsample_is_class_balanced_nested_and_disjoint_from_val(mnist_root: Path, plain: MnistData):
    x_tr, y_tr = plain.raw["train"]
    x_val, y_val = plain.raw["val"]
    assert torch.bincount(y_tr).tolist() == [100] * 10
    assert torch.bincount(y_val).tolist() == [50] * 10
    assert torch.bincount(plain.raw["test"][1]).tolist() == [50] * 10
    assert not set(rows(x_tr)) & set(rows(x_val)), "validation points leaked into the training subset"
    smaller = MnistData(data_dir=str(mnist_root), n_train=300, val_size=500).load_splits()
    assert set(rows(smaller["train"][0])) <= set(rows(x_tr)), "the subsample for P=300 is not inside P=1000"
    assert plain.num_train == 1000 and plain.split("train")[0].shape == (1000, 1, 28, 28)


def test_balanced_subset_when_a_class_runs_out():
    labels = torch.tensor([0] * 3 + [1] * 10 + [2] * 10)
    counts = torch.bincount(labels[balanced_subset(labels, 15, torch.Generator().manual_seed(0))])
    assert counts.tolist() == [3, 6, 6]


def test_normalised_on_the_device_in_float(plain: MnistData):
    x, y = plain.split("train")
    assert x.dtype == torch.float32 and y.dtype == torch.long
    expected = (plain.raw["train"][0].float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(x, expected)


def test_label_noise_scrambles_the_exact_fraction(mnist_root: Path, plain: MnistData):
    noisy = mnist(mnist_root, n_train=1000, n_test=500, val_size=500, label_noise=0.25)
    y_clean, y_noisy = plain.raw["train"][1], noisy.raw["train"][1]
    changed = y_clean != y_noisy
    assert changed.sum() == 250
    assert torch.equal(changed, noisy.scrambled)
    assert torch.equal(noisy.raw["train"][0], plain.raw["train"][0]), "label noise must not move inputs"
    for split in ("val", "test"):
        assert torch.equal(noisy.raw[split][1], plain.raw[split][1]), f"{split} labels must stay clean"


def test_parity_labels(mnist_root: Path, plain: MnistData):
    parity = mnist(mnist_root, n_train=1000, n_test=500, val_size=500, labels="parity")
    assert parity.num_outputs == 1
    for split in ("train", "val", "test"):
        digits = plain.raw[split][1]
        y = parity.split(split)[1]
        assert y.dtype == torch.float32
        assert torch.equal(y, torch.where(digits % 2 == 0, 1.0, -1.0))
    flipped = mnist(mnist_root, n_train=1000, n_test=500, val_size=500, labels="parity", label_noise=0.1)
    assert (flipped.split("train")[1] != parity.split("train")[1]).sum() == 100


def test_pca_dimension_and_whiteness(mnist_root: Path, plain: MnistData):
    white = mnist(mnist_root, n_train=1000, n_test=500, val_size=500, pca_dim=20, whiten=True)
    assert white.input_shape == (20,)
    for split in ("train", "val", "test"):
        assert white.split(split)[0].shape == (plain.split(split)[0].shape[0], 20)
    z = white.split("train")[0].double()
    torch.testing.assert_close(z.mean(0), torch.zeros(20, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.T.cov(correction=0), torch.eye(20, dtype=torch.float64), atol=1e-4, rtol=0)
    # Without whitening: the variances are the top eigenvalues of the training covariance.
    raw = mnist(mnist_root, n_train=1000, n_test=500, val_size=500, pca_dim=20)
    pixels = plain.split("train")[0].flatten(1).double()
    top = torch.linalg.eigvalsh(pixels.T.cov(correction=0)).flip(0)[:20]
    torch.testing.assert_close(raw.split("train")[0].double().var(0, correction=0), top, rtol=1e-4, atol=1e-5)


def test_pca_projection_on_known_axes():
    # Variances 9, 4, 1 along the axes: components in that order, signs fixed positive.
    x = torch.tensor([[3.0, 0, 0], [-3, 0, 0], [0, 2, 0], [0, -2, 0], [0, 0, 1], [0, 0, -1]]) * 6**0.5 / 2**0.5
    mean, W = pca_projection(x, 2, whiten=False)
    torch.testing.assert_close(W, torch.tensor([[1.0, 0], [0, 1], [0, 0]], dtype=torch.float64))
    _, W_white = pca_projection(x, 2, whiten=True)
    torch.testing.assert_close(((x - mean).double() @ W_white).var(0, correction=0), torch.ones(2, dtype=torch.float64))


def test_sum_mod_10_labels_of_known_pairs(mnist_root: Path, plain: MnistData):
    pairs = mnist(mnist_root, n_train=1000, n_test=500, val_size=500, sum_mod_10=True)
    assert pairs.input_shape == (1, 28, 56) and pairs.num_outputs == 10
    for split in ("train", "test"):
        x_single, y_single = plain.raw[split]
        label_of = dict(zip(rows(x_single), y_single.tolist()))
        x_pair, y_pair = pairs.raw[split]
        left, right = rows(x_pair[..., :28].contiguous()), rows(x_pair[..., 28:].contiguous())
        assert left == rows(x_single), "the first digit of pair i is digit i of the split"
        expected = [(label_of[a] + label_of[b]) % 10 for a, b in zip(left, right)]
        assert y_pair.tolist() == expected
        assert len(set(right)) == len(right), "second digits are a permutation of the split"
    net = MnistFC(width=[8], input_shape=pairs.input_shape, num_outputs=pairs.num_outputs)
    assert net.net(pairs.split("train")[0][:3]).shape == (3, 10)


def test_input_noise_is_fixed_gaussian_on_training_inputs(mnist_root: Path, plain: MnistData):
    noisy = mnist(mnist_root, n_train=1000, n_test=500, val_size=500, input_noise=0.5)
    delta = noisy.split("train")[0] - plain.split("train")[0]
    assert abs(delta.std().item() - 0.5) < 0.005 and abs(delta.mean().item()) < 0.005
    for split in ("val", "test"):
        assert torch.equal(noisy.split(split)[0], plain.split(split)[0])
    again = mnist(mnist_root, n_train=1000, n_test=500, val_size=500, input_noise=0.5)
    assert torch.equal(again.split("train")[0], noisy.split("train")[0]), "noise must be seeded"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_train": 60_000, "val_size": 10}, r"data.n_train must be at most 59990"),
        ({"labels": "odd"}, r"data.labels must be one of digits, parity"),
        ({"whiten": True}, r"data.whiten needs data.pca_dim"),
        ({"n_train": 10, "pca_dim": 10, "whiten": True}, r"data.pca_dim must be at most 9"),
        ({"label_noise": 1.5}, r"data.label_noise must be in \[0, 1\]"),
        ({"val_size": 60_000}, r"data.val_size must be below"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as error:
        MnistData(**kwargs)
    assert "\n" not in str(error.value)


def test_offline_without_data_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConfigError) as error:
        MnistData(data_dir=str(tmp_path / "empty")).setup()
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "empty" / "MNIST" / "raw") in message and "download failed" in message
    assert "OVERPARAM_DATA_DIR" in message
    with pytest.raises(ConfigError, match="data.download is false"):
        MnistData(data_dir=str(tmp_path / "empty2"), download=False).setup()


def _official_gz_copy(mnist_root: Path, root: Path) -> Path:
    """``root/MNIST/raw`` holding only copies of the four official ``.gz`` files (the README's layout)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in sorted((mnist_root / "MNIST" / "raw").glob("*.gz")):
        shutil.copy(gz, raw / gz.name)
    assert len(list(raw.iterdir())) == 4
    return raw


def test_a_read_only_folder_of_the_official_gz_files_is_read_as_it_is(mnist_root: Path, tmp_path: Path):
    raw = _official_gz_copy(mnist_root, tmp_path / "ro")
    files = sorted(raw.iterdir())
    raw.chmod(0o555)  # the offline layout may live on a read-only share
    try:
        splits = load_mnist(tmp_path / "ro", download=False)
    finally:
        raw.chmod(0o755)
    assert splits["train"][0].shape == (60_000, 1, 28, 28) and splits["test"][1][:3].tolist() == [7, 2, 1]
    assert sorted(raw.iterdir()) == files, "nothing extracted or cached beside the read-only files"
    assert (tmp_path / "ro" / "overparam-cache" / "raw" / "overparam-uint8-train.pt").is_file()


def test_a_truncated_gz_is_reported_as_corrupt_not_missing(mnist_root: Path, tmp_path: Path):
    raw = _official_gz_copy(mnist_root, tmp_path)
    gz = raw / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:1000])
    with pytest.raises(ConfigError) as error:
        load_mnist(tmp_path, download=False)
    message = str(error.value)
    assert "\n" not in message and "not found" not in message
    assert f"MNIST file {gz} is corrupt (md5 differs from the official file: truncated or altered)" in message
    assert "replace it with the official file" in message


def test_a_truncated_extracted_file_beside_its_gz_is_rebuilt(mnist_root: Path, tmp_path: Path):
    raw = _official_gz_copy(mnist_root, tmp_path)
    extracted = raw / "t10k-labels-idx1-ubyte"
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz") as f:
        whole = f.read()
    extracted.write_bytes(whole[:5000])
    with pytest.warns(UserWarning, match="t10k-labels-idx1-ubyte was damaged"):
        splits = load_mnist(tmp_path, download=False)
    assert torch.bincount(splits["test"][1]).tolist()[:3] == [980, 1135, 1032]
    assert extracted.read_bytes() == whole


def test_default_root_from_environment(mnist_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OVERPARAM_DATA_DIR", str(mnist_root))
    assert MnistData(n_train=10).load_splits()["train"][0].shape == (10, 1, 28, 28)


def test_small_fc_learns_mnist_in_seconds(mnist_root: Path):
    data = MnistData(data_dir=str(mnist_root), n_train=1000, n_test=1000, batch_size=50)
    task = MnistFC(width=[64], input_shape=data.input_shape, num_outputs=10, num_train=data.num_train, lr=0.1, momentum=0.9)
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, datamodule=data)
    error = trainer.test(task, datamodule=data, verbose=False)[0]["test/error"]
    assert error < 0.2, f"test error {error:.3f} after 3 epochs on 1000 digits (chance: 0.9)"


def test_config_gives_the_talk_sized_network(mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from overparam.cli import OverparamCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["overparam"])
    cli = OverparamCLI(args=["-c", str(REPO / "configs" / "mnist_fc.yaml"), f"--data.data_dir={mnist_root}"], run=False)
    assert isinstance(cli.model, MnistFC) and cli.model.N == 443_610
    assert cli.datamodule.num_train == 55_000 and cli.model.num_train == 55_000


@pytest.mark.slow
def test_cli_fit_and_offline_error(cli, mnist_root: Path, tmp_path: Path):
    config = str(REPO / "configs" / "mnist_fc.yaml")
    small = ["--data.n_train=1000", "--data.val_size=200", "--model.width=[32]", "--trainer.max_epochs=1"]
    done = cli("fit", "-c", config, f"--data.data_dir={mnist_root}", *small)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "overparam summary: N = 25,450  P = 1,000" in done.stdout
    failed = cli("fit", "-c", config, f"--data.data_dir={tmp_path / 'none'}", "--data.download=false", *small)
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("overparam: error: MNIST not found in") and "data.download is false" in last
