"""Whole image datasets as uint8 tensors: decoded once from the official files, cached as ``.pt``.

``load_mnist`` and ``load_cifar10`` return ``{"train": (x, y), "test": (x, y)}`` with ``x``
uint8 ``(n, channels, height, width)`` and ``y`` int64 class indices, on the CPU. MNIST is read
straight from its four official files (each ``.gz`` checked against the official md5 and
decompressed in memory, so a read-only folder of ``.gz`` files works; torchvision only
downloads what is missing or corrupt); CIFAR-10 goes through torchvision's dataset class
(md5 checks, download, extraction). The decoded tensors are then saved as
``overparam-uint8-{split}.pt`` beside the raw files, or under ``<root>/overparam-cache/`` when
that folder is read-only. Later calls read the cache (a fraction of a second) as long as the
raw files keep their names, sizes and modification times.

The root is ``data_dir`` when given, else ``$OVERPARAM_DATA_DIR``, else a user cache folder
(``$XDG_CACHE_HOME/overparam/data``, default ``~/.cache/overparam/data``). Offline with no
data, or with files that fail the checksum, loading ends with one ``ConfigError`` line that
says which file is missing or corrupt, where it was looked for and how to get it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import stat
import struct
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from overparam import seeds
from overparam.data import Batch, BatchSize, OverparamDataModule
from overparam.errors import ConfigError, check_fraction, check_positive

Splits = dict[str, tuple[Tensor, Tensor]]
CACHE_FORMAT = 1
CACHE_FOLDER = "overparam-cache"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def default_data_dir() -> Path:
    """``$OVERPARAM_DATA_DIR``, else ``$XDG_CACHE_HOME/overparam/data`` (``~/.cache/...``)."""
    env = os.environ.get("OVERPARAM_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "overparam" / "data"


def resolve_data_dir(data_dir: Union[str, Path, None]) -> Path:
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


# --- the cache --------------------------------------------------------------------------------
def _stamp(folder: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and mtimes of the raw files: the cache is stale when any of them changes."""
    if not folder.is_dir():
        return []
    return sorted(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in folder.iterdir()
        if f.is_file() and not f.name.startswith("overparam-")
    )


def _writable(folder: Path) -> bool:
    """Writable by permission *and* by intent: a read-only mode or a symlinked folder (someone
    else's copy, e.g. a shared one) is left alone even when running as root."""
    return (
        folder.is_dir()
        and not folder.is_symlink()
        and os.access(folder, os.W_OK)
        and bool(folder.stat().st_mode & stat.S_IWUSR)
    )


def _cache_path(root: Path, folder: Path, split: str) -> Path:
    """Beside the raw files when that folder is ours to write, else ``<root>/overparam-cache/``."""
    name = f"overparam-uint8-{split}.pt"
    return folder / name if _writable(folder) else root / CACHE_FOLDER / folder.name / name


def _read_cache(path: Path, stamp: list, need_verified: bool) -> Optional[tuple[Tensor, Tensor]]:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
        return None
    if blob.get("format") != CACHE_FORMAT or [tuple(s) for s in blob.get("stamp", [])] != stamp:
        return None
    if need_verified and not blob.get("verified", False):
        return None
    return blob["x"], blob["y"]


def _write_cache(path: Path, x: Tensor, y: Tensor, stamp: list, verified: bool) -> None:
    """Atomic write (temp file + rename), so concurrent ranks or tests never read half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"format": CACHE_FORMAT, "x": x, "y": y, "stamp": stamp, "verified": verified}, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        rank_zero_warn(f"overparam: could not cache decoded data at {path} ({exc}); decoding again next time")


def _cached_splits(
    root: Path, folder: Path, verified: bool, decode: Callable[[], Splits]
) -> Splits:
    """Both splits from the cache when it is fresh, else ``decode()`` them and cache them."""
    stamp = _stamp(folder)
    if stamp:
        cached = {s: _read_cache(_cache_path(root, folder, s), stamp, verified) for s in ("train", "test")}
        if all(v is not None for v in cached.values()):
            return cached  # type: ignore[return-value]
    splits = decode()
    stamp = _stamp(folder)  # torchvision may have extracted files just now
    for split, (x, y) in splits.items():
        _write_cache(_cache_path(root, folder, split), x, y, stamp, verified)
    return splits


def _quiet(make: Callable):
    """Call a torchvision constructor with its download chatter on stdout silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        return make()


def _first_line(exc: Exception) -> str:
    """One line out of torchvision's multi-line download error: the first line and the last cause."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"


# --- MNIST ------------------------------------------------------------------------------------
# IDX headers (LeCun et al.'s format): big-endian int32 magic number, then one int32 per dimension.
IDX_IMAGES, IDX_LABELS = 2051, 2049


def _mnist_files() -> list[tuple[str, str]]:
    """``(name.gz, md5)`` of the four official files, as torchvision lists them."""
    from torchvision.datasets import MNIST

    return list(MNIST.resources)


def _idx_size(header: bytes) -> Optional[int]:
    """The byte size an IDX file with this header must have, None when it is not MNIST's IDX."""
    if len(header) < 8:
        return None
    magic, count = struct.unpack(">ii", header[:8])
    if magic == IDX_LABELS:
        return 8 + count
    if magic == IDX_IMAGES and len(header) >= 16:
        rows, cols = struct.unpack(">ii", header[8:16])
        return 16 + count * rows * cols
    return None


def _idx_intact(path: Path) -> bool:
    """An extracted IDX file whose size matches its header (a truncated copy does not)."""
    with open(path, "rb") as f:
        header = f.read(16)
    return _idx_size(header) == path.stat().st_size


def _decode_idx(blob: bytes, source: Path) -> Tensor:
    """``(n, 1, 28, 28)`` uint8 images or ``(n,)`` int64 labels from the bytes of an IDX file."""
    if _idx_size(blob[:16]) != len(blob):
        raise ConfigError(f"MNIST file {source} is damaged (its size does not match its header); replace it with the official file")
    magic, count = struct.unpack(">ii", blob[:8])
    if magic == IDX_LABELS:
        return torch.frombuffer(bytearray(blob[8:]), dtype=torch.uint8).long()
    rows, cols = struct.unpack(">ii", blob[8:16])
    return torch.frombuffer(bytearray(blob[16:]), dtype=torch.uint8).view(count, 1, rows, cols)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _mnist_problems(folder: Path) -> dict[str, str]:
    """File name -> what is wrong, for every official file neither intact as ``.gz`` nor extracted."""
    problems = {}
    for gz_name, md5 in _mnist_files():
        gz, extracted = folder / gz_name, folder / gz_name.removesuffix(".gz")
        if gz.is_file() and _md5(gz) == md5:
            continue
        if extracted.is_file() and _idx_intact(extracted):
            continue
        problems[gz_name] = "corrupt (md5 differs from the official file: truncated or altered)" if gz.is_file() else "missing"
    return problems


def _download_mnist(folder: Path, names: list[str]) -> Optional[str]:
    """Fetch the named official files into ``folder`` (torchvision's mirrors, md5-checked);
    returns None, or the first line of the last failure."""
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import download_url

    md5s = dict(MNIST.resources)
    failure = None
    for name in names:
        for mirror in MNIST.mirrors:
            try:
                _quiet(lambda: download_url(f"{mirror}{name}", str(folder), name, md5s[name]))
                failure = None
                break
            except (RuntimeError, OSError, ValueError) as exc:  # URLError is an OSError
                failure = _first_line(exc)
        if failure:
            return failure
    return None


def _read_mnist_file(folder: Path, gz_name: str, md5: str) -> Tensor:
    """One official file, decoded: from the verified ``.gz`` when there is one, else the extracted copy.

    An extracted copy beside an intact ``.gz`` that is damaged (e.g. truncated by a full disk)
    is rebuilt from the ``.gz`` when the folder may be written, and ignored otherwise.
    """
    gz, extracted = folder / gz_name, folder / gz_name.removesuffix(".gz")
    if gz.is_file() and _md5(gz) == md5:
        with gzip.open(gz, "rb") as f:
            blob = f.read()
        if extracted.is_file() and not _idx_intact(extracted) and _writable(folder):
            tmp = extracted.with_name(f"{extracted.name}.{os.getpid()}.tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, extracted)
            rank_zero_warn(f"overparam: {extracted} was damaged (size does not match its header); rebuilt it from {gz.name}")
        return _decode_idx(blob, gz)
    return _decode_idx(extracted.read_bytes(), extracted)


def load_mnist(data_dir: Union[str, Path, None] = None, download: bool = True) -> Splits:
    """MNIST (LeCun et al. 1998): 60,000 / 10,000 digits, ``x`` uint8 ``(n, 1, 28, 28)``.

    Reads the four official files in ``<root>/MNIST/raw/``, each as its ``.gz`` (checked against
    the official md5, decompressed in memory: a read-only folder holding only the ``.gz`` files
    works) or, without one, as the extracted IDX file (its size checked against its header).
    Files missing or corrupt are downloaded when ``download`` is on and the network answers;
    otherwise one ConfigError line says which file is missing or corrupt and how to fix it.
    """
    root = resolve_data_dir(data_dir)
    folder = root / "MNIST" / "raw"

    def decode() -> Splits:
        problems = _mnist_problems(folder)
        if problems:
            failure = "data.download is false"
            if download:
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    failure = _download_mnist(folder, list(problems))
                except OSError as exc:
                    failure = f"cannot create {folder}: {exc.strerror or exc}"
                failure = failure and f"download failed: {failure}"
                problems = _mnist_problems(folder)
            if problems:
                raise _mnist_error(folder, problems, failure or "download failed")
        files = {name.removesuffix(".gz"): _read_mnist_file(folder, name, md5) for name, md5 in _mnist_files()}
        return {
            "train": (files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"]),
            "test": (files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"]),
        }

    # Every file used was md5-checked (.gz) or is the extraction of one: the cache is verified.
    return _cached_splits(root, folder, True, decode)


def _mnist_error(folder: Path, problems: dict[str, str], failure: str) -> ConfigError:
    corrupt = [name for name, problem in problems.items() if problem != "missing"]
    if corrupt:
        return ConfigError(
            f"MNIST file {folder / corrupt[0]} is {problems[corrupt[0]]} and no fresh copy could be had ({failure}); "
            "replace it with the official file, or delete it and run once with internet"
        )
    return ConfigError(
        f"MNIST not found in {folder} (missing: {', '.join(problems)}) and {failure}; "
        f"put the four official files (train-images-idx3-ubyte.gz, ...) in {folder}, or point "
        "data.data_dir / $OVERPARAM_DATA_DIR at a folder holding MNIST/raw/, or run once with internet"
    )


# --- CIFAR-10 ---------------------------------------------------------------------------------
def _cifar10_class(verify_integrity: bool):
    from torchvision.datasets import CIFAR10

    if verify_integrity:
        return CIFAR10

    class CIFAR10Unverified(CIFAR10):
        """torchvision's CIFAR10 with the md5 check reduced to "the files exist"."""

        def _check_integrity(self) -> bool:
            return all((Path(self.root) / self.base_folder / name).is_file() for name, _ in self.train_list + self.test_list)

    return CIFAR10Unverified


def load_cifar10(
    data_dir: Union[str, Path, None] = None, download: bool = True, verify_integrity: bool = True
) -> Splits:
    """CIFAR-10 (Krizhevsky 2009): 50,000 / 10,000 colour images, ``x`` uint8 ``(n, 3, 32, 32)``.

    Args:
        data_dir: the root holding ``cifar-10-batches-py/`` (see ``resolve_data_dir``).
        download: let torchvision download the archive when the files are missing or fail
            the md5 check.
        verify_integrity: check torchvision's md5 of every batch file. Turn it off only for a
            copy you trust that is known to differ from the official release (e.g. one
            re-encoded for offline use); a warning says so on every load.
    """
    root = resolve_data_dir(data_dir)
    folder = root / CIFAR10_FOLDER
    if not verify_integrity:
        rank_zero_warn(
            f"overparam: CIFAR-10 md5 check is off (data.verify_integrity=false): the files in {folder} are used "
            "as they are; results are only comparable with runs on the same copy"
        )

    def decode() -> Splits:
        present = all((folder / name).is_file() for name in CIFAR10_FILES)
        dataset = _cifar10_class(verify_integrity)
        try:
            sets = {s: _quiet(lambda: dataset(str(root), train=s == "train", download=download)) for s in ("train", "test")}
        except (RuntimeError, OSError) as exc:
            how = (
                f"download failed: {_first_line(exc)}" if download else "data.download is false"
            )
            if present and verify_integrity:
                raise ConfigError(
                    f"CIFAR-10 files in {folder} fail torchvision's md5 check and no fresh copy could be had ({how}); "
                    "replace them with the official release, or set data.verify_integrity=false to use them as they are"
                ) from None
            raise ConfigError(
                f"CIFAR-10 not found in {folder} and {how}; put the python-version batches "
                f"(data_batch_1..5, test_batch, batches.meta) in {folder}, or point data.data_dir / "
                "$OVERPARAM_DATA_DIR at a folder holding cifar-10-batches-py/, or run once with internet"
            ) from None
        return {
            s: (torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets, dtype=torch.long))
            for s, d in sets.items()
        }

    return _cached_splits(root, folder, verify_integrity, decode)


# --- subsets and labels -------------------------------------------------------------------------
def balanced_subset(labels: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Indices of ``n`` points, as class-balanced as the data allows, in increasing order.

    Each class is shuffled (seeded); a point's key is ``rank_within_class * C + class`` and
    the ``n`` smallest keys win. So every class gets ``n // C`` or one more point (the first
    classes take the remainder) while it has points left, and the subset for ``n`` is
    contained in the subset for any larger ``n`` with the same seed (nested P).
    """
    if n > labels.numel():
        raise ConfigError(f"asked for {n} points out of {labels.numel()}")
    # numpy: torch's parallel integer sort is slow on a few busy cores, and this is CPU-side.
    y = labels.numpy()
    classes = int(y.max()) + 1 if y.size else 1
    perm = torch.randperm(y.size, generator=generator).numpy()
    shuffled = perm[np.argsort(y[perm], kind="stable")]  # grouped by class, shuffled within
    grouped = y[shuffled]
    counts = np.bincount(grouped, minlength=classes)
    rank = np.arange(y.size) - (np.cumsum(counts) - counts)[grouped]  # rank within its class
    chosen = shuffled[np.argsort(rank * classes + grouped, kind="stable")[:n]]
    return torch.from_numpy(np.sort(chosen))


def scramble_labels(y: Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Replace exactly ``round(fraction * n)`` labels by a *different* label (seeded).

    Class indices move to one of the other ``C - 1`` classes uniformly; +-1 labels flip sign.
    (Zhang et al. 2017, "Understanding deep learning requires rethinking generalization",
    corrupt labels the same way but may redraw the true class; here every chosen label is
    wrong, so the corrupted fraction is exact.) Returns the new labels and the boolean mask
    of scrambled points.
    """
    n = y.shape[0]
    chosen = torch.randperm(n, generator=generator)[: round(fraction * n)]
    y = y.clone()
    if y.is_floating_point():
        y[chosen] = -y[chosen]
    else:
        shift = torch.randint(1, num_classes, (chosen.numel(),), generator=generator)
        y[chosen] = (y[chosen] + shift) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return y, mask


# --- the shared DataModule ------------------------------------------------------------------------
class ImageData(OverparamDataModule):
    """Base of the real-image DataModules: subsample, carve, relabel on the CPU; normalise on the device.

    ``load_splits`` keeps images as uint8 on the CPU (subsets of the decoded dataset);
    ``setup`` moves them to the device once and normalises there
    (``(x / 255 - mean) / std`` per channel), then applies ``transform_inputs`` (e.g. PCA)
    and the fixed input noise. The uint8 splits stay on the CPU in ``raw`` so the data can be
    placed again on another device or dtype.

    Seeds: every random choice draws from its own stream of ``seed`` (val carving, training
    subsample, test subsample, label noise, input noise, pairing), so changing one option does
    not reshuffle the others. Validation and test data are never corrupted: they measure
    the true task.

    Args:
        data_dir: root of the raw data (default ``$OVERPARAM_DATA_DIR`` or a user cache folder).
        download: let torchvision download missing files.
        n_train: P, a class-balanced, seeded subsample of the training set (nested: the
            subsample for P is inside the one for any larger P); None for all remaining points.
        n_test: a class-balanced subsample of the test set; None for all of it.
        val_size: points carved (class-balanced) from the training set for validation,
            chosen before the training subsample; 0 for no validation loop.
        label_noise: fraction of training labels replaced by a wrong label.
        input_noise: std of fixed Gaussian noise added to the training inputs after
            normalisation (and after ``transform_inputs``).
        batch_size, eval_batch_size, seed, analysis_size, passes_per_epoch: see ``OverparamDataModule``.
    """

    train_size = 0  # points in the official training split
    test_size = 0
    num_classes = 10
    image_shape: tuple[int, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __init__(
        self,
        data_dir: Optional[str] = None,
        download: bool = True,
        n_train: Optional[int] = None,
        n_test: Optional[int] = None,
        val_size: int = 0,
        label_noise: float = 0.0,
        input_noise: float = 0.0,
        batch_size: BatchSize = 128,
        eval_batch_size: int = 8192,
        seed: int = 0,
        analysis_size: Optional[int] = None,
        passes_per_epoch: int = 1,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, seed, analysis_size, passes_per_epoch)
        check_positive("data.val_size", val_size, allow_zero=True)
        if val_size >= self.train_size:
            raise ConfigError(f"data.val_size must be below the {self.train_size} training points, got {val_size}")
        available = self.train_size - val_size
        if n_train is not None:
            check_positive("data.n_train", n_train)
            if n_train > available:
                raise ConfigError(f"data.n_train must be at most {available} (training set minus val_size), got {n_train}")
        if n_test is not None:
            check_positive("data.n_test", n_test)
            if n_test > self.test_size:
                raise ConfigError(f"data.n_test must be at most {self.test_size}, got {n_test}")
        check_fraction("data.label_noise", label_noise)
        check_positive("data.input_noise", input_noise, allow_zero=True)
        self.data_dir, self.download = data_dir, download
        self.n_train, self.n_test, self.val_size = n_train, n_test, val_size
        self.label_noise, self.input_noise = label_noise, input_noise
        self.raw: dict[str, Batch] = {}
        self.scrambled: Optional[Tensor] = None  # (P,) bool: which training labels were scrambled

    # --- what subclasses provide -------------------------------------------------------------
    def decoded(self) -> dict[str, Batch]:
        """The whole dataset, ``{"train", "test"}``: uint8 images and class indices (CPU)."""
        raise NotImplementedError

    @property
    def binary(self) -> bool:
        """True when labels are +-1 with one output."""
        return False

    def make_examples(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Batch:
        """Inputs and class labels of one split from its chosen images (default: as they are)."""
        return x, y

    def binary_labels(self, y: Tensor) -> Tensor:
        """+-1 float labels from class indices (used when ``binary``)."""
        raise NotImplementedError

    def transform_inputs(self, splits: dict[str, Batch]) -> dict[str, Batch]:
        """Device-side transform after normalisation (default: none)."""
        return splits

    # --- shapes, known before any data is loaded ---------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.image_shape

    @property
    def num_outputs(self) -> int:
        return 1 if self.binary else self.num_classes

    @property
    def num_train(self) -> int:
        return self.n_train if self.n_train is not None else self.train_size - self.val_size

    # --- loading --------------------------------------------------------------------------
    def load_splits(self) -> dict[str, Batch]:
        """Subsample, carve the validation split, pair/relabel, scramble (CPU, uint8 images)."""
        full = self.decoded()
        x, y = full["train"]
        chosen: dict[str, Tensor] = {}
        rest = torch.arange(y.numel())
        if self.val_size:
            val = balanced_subset(y, self.val_size, seeds.data_stream(self.seed, 1))
            chosen["val"] = val
            keep = torch.ones(y.numel(), dtype=torch.bool)
            keep[val] = False
            rest = rest[keep]
        if self.n_train is not None:
            rest = rest[balanced_subset(y[rest], self.n_train, seeds.data_stream(self.seed, 2))]
        chosen["train"] = rest
        splits = {name: (x[idx], y[idx]) for name, idx in chosen.items()}
        x_test, y_test = full["test"]
        if self.n_test is not None:
            idx = balanced_subset(y_test, self.n_test, seeds.data_stream(self.seed, 3))
            x_test, y_test = x_test[idx], y_test[idx]
        splits["test"] = (x_test, y_test)
        for stream, name in enumerate(("train", "val", "test"), start=10):
            if name in splits:
                x_s, y_s = self.make_examples(*splits[name], seeds.data_stream(self.seed, stream))
                splits[name] = (x_s, self.binary_labels(y_s) if self.binary else y_s)
        if self.label_noise:
            x_tr, y_tr = splits["train"]
            y_tr, self.scrambled = scramble_labels(y_tr, self.label_noise, self.num_classes, seeds.data_stream(self.seed, 4))
            splits["train"] = (x_tr, y_tr)
        return splits

    def setup(self, stage: Optional[str] = None) -> None:
        """Place the uint8 splits on the device once, then normalise and transform them there."""
        if self.splits and getattr(self, "_placed_on", None) == (self.device, self.dtype):
            return
        self.raw = self.raw or self.load_splits()
        self.splits, self._placed_on = dict(self.raw), None
        super().setup(stage)  # moves uint8 images and labels to the device
        mean = torch.tensor(self.mean, device=self.device, dtype=self.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device, dtype=self.dtype).view(1, -1, 1, 1)
        splits = {name: ((x.to(self.dtype) / 255 - mean) / std, y) for name, (x, y) in self.splits.items()}
        splits = self.transform_inputs(splits)
        if self.input_noise:
            x, y = splits["train"]
            noise = torch.randn(x.shape, generator=seeds.data_stream(self.seed, 5), dtype=self.dtype)
            splits["train"] = (x + self.input_noise * noise.to(self.device), y)
        self.splits = splits
