"""Datasets as in-memory tensors in [0, 1], with deterministic train/validation/test splits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from phalanx.data import files
from phalanx.errors import DataNotFoundError, PhalanxError
from phalanx.registry import Registry


@dataclass(frozen=True)
class Split:
    """Images ``x`` of shape (N, C, H, W), float32 in [0, 1], and labels ``y`` (N,) int64."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise PhalanxError(f"split has {self.x.shape[0]} images but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, limit: int | None) -> Split:
        """The first ``limit`` examples (splits are already shuffled deterministically)."""
        if limit is None or limit >= len(self):
            return self
        if limit < 1:
            raise PhalanxError(f"limit must be >= 1, got {limit}")
        return Split(self.x[:limit], self.y[:limit])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class DatasetSplits:
    name: str
    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"  # "none" | "crop-flip" (CIFAR: RandomCrop(32, pad 4) + HFlip)
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def in_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise PhalanxError(f"unknown split {name!r}; accepted: train, val, test")
        return getattr(self, name)  # type: ignore[no-any-return]


Loader = Callable[..., DatasetSplits]
DATASETS: Registry[Loader] = Registry("dataset")


def _stratified_perm(y: np.ndarray, seed: int) -> np.ndarray:
    """A permutation that interleaves classes so every prefix is close to stratified."""
    rng = np.random.default_rng(seed)
    keys = np.empty(len(y))
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        # position within its class, jittered, scaled to [0, 1): sorting on it interleaves classes
        keys[idx] = (rng.permutation(len(idx)) + rng.random(len(idx))) / len(idx)
    return np.argsort(keys, kind="stable")


def stratified_split(
    y: np.ndarray, fractions: tuple[float, ...], seed: int
) -> list[np.ndarray]:
    """Split indices into disjoint parts with the given fractions, each stratified by class."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        bounds = np.round(np.cumsum((0.0, *fractions)) * len(idx)).astype(int)
        for i in range(len(fractions)):
            parts[i].append(idx[bounds[i] : bounds[i + 1]])
    out = []
    for p in parts:
        cat = np.concatenate(p)
        out.append(cat[_stratified_perm(y[cat], seed + 1)])
    return out


def _to_split(x: np.ndarray, y: np.ndarray, scale: float) -> Split:
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / scale)
    return Split(xt, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)))


def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


@DATASETS.register("digits", "scikit-learn's embedded 8x8 digits (1797 images, 10 classes)")
def load_digits(*, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2, **_: object) -> DatasetSplits:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = d.images.reshape(-1, 1, 8, 8)
    y = d.target
    tr, va, te = stratified_split(y, (1 - val_fraction - test_fraction, val_fraction, test_fraction), seed)
    train = _to_split(x[tr], y[tr], 16.0)
    mean, std = _channel_stats(train.x)
    return DatasetSplits(
        "digits", train, _to_split(x[va], y[va], 16.0), _to_split(x[te], y[te], 16.0),
        tuple(str(i) for i in range(10)), mean, std,
    )


_MNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
_MNIST_SOURCES = {
    "train-images-idx3-ubyte.gz": ("https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels-idx1-ubyte.gz": ("https://ossci-datasets.s3.amazonaws.com/mnist/train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "t10k-images-idx3-ubyte.gz": ("https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "t10k-labels-idx1-ubyte.gz": ("https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}
_FMNIST_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FMNIST_SOURCES = {
    "train-images-idx3-ubyte.gz": (_FMNIST_BASE + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels-idx1-ubyte.gz": (_FMNIST_BASE + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    "t10k-images-idx3-ubyte.gz": (_FMNIST_BASE + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    "t10k-labels-idx1-ubyte.gz": (_FMNIST_BASE + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


def _train_val(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int) -> tuple[Split, Split]:
    tr, va = stratified_split(y, (1 - val_fraction, val_fraction), seed)
    return _to_split(x[tr], y[tr], 255.0), _to_split(x[va], y[va], 255.0)


def _load_idx_set(
    name: str, subdir: str, sources: dict[str, tuple[str, str]], classes: tuple[str, ...],
    data_dir: Path | None, seed: int, val_fraction: float, download: bool,
) -> DatasetSplits:
    root = files.data_root(data_dir)
    paths = files.locate(root, subdir, _MNIST_FILES, sources, download_ok=download)
    xtr = files.read_idx(paths["train-images-idx3-ubyte.gz"], 3)[:, None]
    ytr = files.read_idx(paths["train-labels-idx1-ubyte.gz"], 1).astype(np.int64)
    xte = files.read_idx(paths["t10k-images-idx3-ubyte.gz"], 3)[:, None]
    yte = files.read_idx(paths["t10k-labels-idx1-ubyte.gz"], 1).astype(np.int64)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise PhalanxError(f"{name}: image and label files have different lengths")
    train, val = _train_val(xtr, ytr, val_fraction, seed)
    test = _to_split(xte, yte, 255.0)
    mean, std = _channel_stats(train.x[:10000])
    return DatasetSplits(name, train, val, test, classes, mean, std)


@DATASETS.register("mnist", "MNIST from the standard IDX .gz files (60k train, 10k test)")
def load_mnist(*, data_dir: Path | None = None, seed: int = 0, val_fraction: float = 1 / 12,
               download: bool = True, **_: object) -> DatasetSplits:
    return _load_idx_set("mnist", "mnist", _MNIST_SOURCES, tuple(str(i) for i in range(10)),
                         data_dir, seed, val_fraction, download)


@DATASETS.register("fashion-mnist", "Fashion-MNIST from the standard IDX .gz files")
def load_fashion_mnist(*, data_dir: Path | None = None, seed: int = 0, val_fraction: float = 1 / 12,
                       download: bool = True, **_: object) -> DatasetSplits:
    return _load_idx_set("fashion-mnist", "fashion-mnist", _FMNIST_SOURCES, FASHION_CLASSES,
                         data_dir, seed, val_fraction, download)


_CIFAR = {
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", ["train"], ["test"], "meta",
                 "fine_labels", "fine_label_names"),
}


def _load_cifar(name: str, data_dir: Path | None, seed: int, val_fraction: float, download: bool) -> DatasetSplits:
    folder, url, md5, train_files, test_files, meta, label_key, names_key = _CIFAR[name]
    root = files.data_root(data_dir)
    needed = train_files + test_files + [meta]
    base = next((d for d in (root / name / folder, root / folder, root / name, root)
                 if all((d / f).is_file() for f in needed)), None)
    if base is None:
        archive = root / name / url.rsplit("/", 1)[1]
        if archive.is_file():  # placed there by someone: verified like a download before unpacking
            files.verify_archive(archive, md5, url)
        elif download:
            try:
                files.download(url, archive, md5, timeout_s=60)  # lands only once its checksum matches
            except Exception as exc:  # network down, checksum mismatch, permissions
                files.log.warning("download of %s failed: %s", url, exc)
        if archive.is_file():
            files.extract_tar(archive, root / name)
            if all((root / name / folder / f).is_file() for f in needed):
                base = root / name / folder
        if base is None:
            raise DataNotFoundError(
                f"{name} files missing: expected {', '.join(needed)} in {root / name / folder} "
                f"(the python version of {url}). Extract it there or pass --data-dir / set "
                f"${files.DATA_DIR_ENV}."
            )
    parts = [files.read_cifar_batch(base / f, label_key) for f in train_files]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    tparts = [files.read_cifar_batch(base / f, label_key) for f in test_files]
    xte = np.concatenate([p[0] for p in tparts])
    yte = np.concatenate([p[1] for p in tparts])
    classes = tuple(files.read_cifar_meta(base / meta, names_key))
    train, val = _train_val(xtr, ytr, val_fraction, seed)
    mean, std = _channel_stats(train.x[:10000])
    return DatasetSplits(name, train, val, _to_split(xte, yte, 255.0), classes, mean, std,
                         augment="crop-flip")


@DATASETS.register("cifar10", "CIFAR-10 from the python-pickle batches")
def load_cifar10(*, data_dir: Path | None = None, seed: int = 0, val_fraction: float = 0.1,
                 download: bool = True, **_: object) -> DatasetSplits:
    return _load_cifar("cifar10", data_dir, seed, val_fraction, download)


@DATASETS.register("cifar100", "CIFAR-100 from the python-pickle batches")
def load_cifar100(*, data_dir: Path | None = None, seed: int = 0, val_fraction: float = 0.1,
                  download: bool = True, **_: object) -> DatasetSplits:
    return _load_cifar("cifar100", data_dir, seed, val_fraction, download)


def load_dataset(
    name: str = "digits", *, data_dir: Path | str | None = None, seed: int = 0,
    limit: int | None = None, download: bool = True,
) -> DatasetSplits:
    """Load a dataset by name. ``limit`` caps each split's size (train, val, test)."""
    loader = DATASETS.get(name)
    if limit is not None and limit < 1:
        raise PhalanxError(f"limit must be >= 1, got {limit}")
    ds = loader(data_dir=files.data_root(data_dir) if data_dir is not None else None, seed=seed, download=download)
    if limit is not None:
        ds = DatasetSplits(ds.name, ds.train.subset(limit), ds.val.subset(limit), ds.test.subset(limit),
                           ds.class_names, ds.mean, ds.std, ds.augment, ds.meta)
    return ds


def augment_crop_flip(x: Tensor, generator: torch.Generator | None, pad: int = 4) -> Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, per example."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)
    cols = torch.where(flip.to(x.device)[:, None], cols.flip(1), cols)
    idx_b = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def iterate_batches(
    split: Split, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
    augment: str = "none", drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` batches of tensors in [0, 1] from an in-memory split."""
    if batch_size < 1:
        raise PhalanxError(f"batch size must be >= 1, got {batch_size}")
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = split.x[idx]
        if augment == "crop-flip":
            x = augment_crop_flip(x, generator)
        yield x, split.y[idx]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
