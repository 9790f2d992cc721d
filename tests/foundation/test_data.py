from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from conftest import MNIST_DIR, requires_mnist
from phalanx.data import iterate_batches, load_dataset, read_idx, write_idx
from phalanx.errors import DataNotFoundError, PhalanxError


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}


def test_digits_split_deterministic_disjoint_stratified():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.y, c.train.y)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    # disjoint by index: the digits set has a few duplicate images, so compare index-derived content
    tr, va, te = _rows(a.train.x), _rows(a.val.x), _rows(a.test.x)
    assert len(tr & te) <= 3 and len(tr & va) <= 3  # only genuine duplicate images may coincide
    assert a.train.x.min() >= 0 and a.train.x.max() <= 1 and a.train.x.dtype == torch.float32
    assert a.in_shape == (1, 8, 8) and a.num_classes == 10
    # stratified: each class's share in test within 1.5 points of its share overall
    full = torch.cat([a.train.y, a.val.y, a.test.y])
    for k in range(10):
        assert abs((a.test.y == k).float().mean() - (full == k).float().mean()) < 0.015


def test_digits_split_indices_partition_the_data():
    from sklearn.datasets import load_digits

    from phalanx.data import stratified_split

    y = load_digits().target
    parts = stratified_split(y, (0.7, 0.1, 0.2), seed=3)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and len(set(allidx.tolist())) == len(y)


def test_limit_and_batches():
    d = load_dataset("digits", limit=50)
    assert len(d.train) == 50 and len(d.test) == 50
    sizes = [len(y) for _, y in iterate_batches(d.train, 16)]
    assert sizes == [16, 16, 16, 2]
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    b1 = [y for _, y in iterate_batches(d.train, 16, shuffle=True, generator=g1)]
    b2 = [y for _, y in iterate_batches(d.train, 16, shuffle=True, generator=g2)]
    assert all(torch.equal(u, v) for u, v in zip(b1, b2))
    with pytest.raises(PhalanxError, match="limit"):
        load_dataset("digits", limit=0)


def test_unknown_dataset_lists_known():
    with pytest.raises(PhalanxError, match=r"known: .*digits.*mnist"):
        load_dataset("imagenet")


def test_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(PhalanxError):
        read_idx(tmp_path / "bad.gz")


def _fake_mnist(root, n_train=60, n_test=20):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_datasets_from_files(tmp_path, name):
    _fake_mnist(tmp_path / name)
    d = load_dataset(name, data_dir=tmp_path, download=False)
    assert d.in_shape == (1, 28, 28) and len(d.test) == 20 and len(d.train) + len(d.val) == 60
    assert d.train.x.max() <= 1.0 and d.train.x.min() >= 0.0
    assert len(d.class_names) == 10


def test_missing_files_error_lists_names(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    with pytest.raises(DataNotFoundError, match="data_batch_1"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_cifar_from_pickle_batches(tmp_path):
    base = tmp_path / "cifar10" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}
        (base / name).write_bytes(pickle.dumps(data))
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    d = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert d.in_shape == (3, 32, 32) and len(d.test) == 10 and d.class_names[3] == "c3"
    assert d.augment == "crop-flip"
    # the augmentation keeps shape and range
    x, _ = next(iterate_batches(d.train, 8, shuffle=True, generator=torch.Generator().manual_seed(0),
                                augment=d.augment))
    assert x.shape == (8, 3, 32, 32) and x.min() >= 0 and x.max() <= 1


@requires_mnist
def test_real_mnist():
    d = load_dataset("mnist", data_dir=MNIST_DIR.parent, download=False)
    assert len(d.train) + len(d.val) == 60000 and len(d.test) == 10000
    counts = torch.bincount(d.test.y, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
