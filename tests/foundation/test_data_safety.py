"""Data files never execute code: CIFAR pickles go through one restricted unpickler, and a
pre-placed archive is checksum-verified and unpacked only inside its folder."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from phalanx.data import datasets, load_dataset
from phalanx.data.files import md5sum, read_cifar_batch, read_cifar_meta, read_data_pickle
from phalanx.errors import PhalanxError

CIFAR10 = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
CIFAR100 = ["train", "test", "meta"]
FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_int(v: int) -> bytes:
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def py2_cifar_pickle(data: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> bytes:
    """A batch byte for byte in the form of the published CIFAR files: Python 2 cPickle,
    protocol 2, text as byte strings, the array rebuilt by ``numpy.core.multiarray._reconstruct``."""
    arr = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b")
           + b"\x87R(" + _py2_int(1) + _py2_int(data.shape[0]) + b"M" + struct.pack("<H", data.shape[1]) + b"\x86"
           + b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R("
           + _py2_int(3) + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + _py2_int(0) + b"tb"
           + b"\x89" + _py2_str(data.astype(np.uint8).tobytes()) + b"tb")
    lab = b"](" + b"".join(_py2_int(v) for v in labels) + b"e"
    return (b"\x80\x02}(" + _py2_str(b"batch_label") + _py2_str(b"training batch 1 of 5")
            + _py2_str(b"data") + arr + _py2_str(label_key) + lab + b"u.")


class _Exec:
    """A payload that creates ``marker`` when unpickled by a plain ``pickle.load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class _System(_Exec):
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return os.system, (f"touch {self.marker}",)


def malicious(marker: Path, kind: str = "exec") -> bytes:
    payload = _Exec(marker) if kind == "exec" else _System(marker)
    # the evil object sits where a real file has its array, behind legitimate-looking keys
    return pickle.dumps({b"batch_label": b"x", b"data": payload, b"labels": [0]}, protocol=2)


def _legit(name: str, rng: np.random.Generator, n: int = 6) -> bytes:
    if name in ("batches.meta", "meta"):
        key = b"label_names" if name == "batches.meta" else b"fine_label_names"
        return pickle.dumps({key: [f"c{i}".encode() for i in range(100 if name == "meta" else 10)]}, protocol=2)
    key = b"labels" if name.startswith(("data_batch", "test_batch")) else b"fine_labels"
    return py2_cifar_pickle(rng.integers(0, 256, (n, 3072), dtype=np.uint8), [i % 10 for i in range(n)], key)


def _place(root: Path, dataset: str, bad: str | None = None, marker: Path | None = None) -> Path:
    base = root / dataset / FOLDER[dataset]
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in CIFAR10 if dataset == "cifar10" else CIFAR100:
        (base / name).write_bytes(malicious(marker) if name == bad and marker else _legit(name, rng))
    return base


def test_the_payload_is_live_under_plain_pickle(tmp_path) -> None:
    """The test payloads really run code under ``pickle.load`` (so the tests below can fail)."""
    for kind in ("exec", "system"):
        marker = tmp_path / f"{kind}.marker"
        pickle.loads(malicious(marker, kind))
        assert marker.exists()


@pytest.mark.parametrize(("dataset", "name"), [("cifar10", n) for n in CIFAR10] + [("cifar100", n) for n in CIFAR100])
def test_malicious_pickle_in_each_cifar_file_runs_nothing(tmp_path, dataset, name) -> None:
    marker = tmp_path / "pwned"
    _place(tmp_path / "data", dataset, bad=name, marker=marker)
    with pytest.raises(PhalanxError, match=rf"refusing CIFAR .*{name}: it names (__builtin__|builtins)\.exec"):
        load_dataset(dataset, data_dir=tmp_path / "data", download=False)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["exec", "system"])
def test_refused_globals_name_the_file_and_the_global(tmp_path, kind) -> None:
    marker, f = tmp_path / "pwned", tmp_path / "data_batch_1"
    f.write_bytes(malicious(marker, kind))
    with pytest.raises(PhalanxError, match=r"data_batch_1: it names (__builtin__\.exec|builtins\.exec|posix\.system)"):
        read_cifar_batch(f, "labels")
    assert not marker.exists()


def test_object_arrays_and_other_numpy_callables_are_refused(tmp_path) -> None:
    f = tmp_path / "test_batch"
    f.write_bytes(pickle.dumps({b"data": np.array([1, "a"], dtype=object), b"labels": [0]}, protocol=2))
    with pytest.raises(PhalanxError, match="object dtype"):
        read_cifar_batch(f, "labels")
    f.write_bytes(pickle.dumps({b"data": np.load, b"labels": [0]}))  # a numpy function, but not a data type
    with pytest.raises(PhalanxError, match=r"it names numpy.*load"):
        read_cifar_batch(f, "labels")
    f.write_bytes(b"\x80\x02}q\x00.garbage-after-stop")  # not an error: pickle stops at STOP
    with pytest.raises(PhalanxError, match="not a CIFAR batch"):
        read_cifar_batch(f, "labels")
    f.write_bytes(b"\x80\x02(")  # truncated
    with pytest.raises(PhalanxError, match=r"cannot read CIFAR batch .*test_batch"):
        read_cifar_batch(f, "labels")


@pytest.mark.parametrize("protocol", ["py2", 2, 4, 5])
def test_legit_cifar_format_files_load(tmp_path, protocol) -> None:
    """The published files' form (Python 2, ``numpy.core``) and what numpy 2 writes today
    (``numpy._core``; protocol 5 rebuilds arrays with ``_frombuffer``) all read back exactly."""
    rng = np.random.default_rng(1)
    data, labels = rng.integers(0, 256, (4, 3072), dtype=np.uint8), [3, 1, 4, 1]
    f = tmp_path / "data_batch_1"
    if protocol == "py2":
        f.write_bytes(py2_cifar_pickle(data, labels))
    else:
        f.write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"filenames": [b"a.png"] * 4,
                                    b"batch_label": b"b"}, protocol=protocol))
    x, y = read_cifar_batch(f, "labels")
    assert x.shape == (4, 3, 32, 32) and np.array_equal(x.reshape(4, -1), data) and y.tolist() == labels
    assert isinstance(read_data_pickle(f), dict)
    m = tmp_path / "batches.meta"
    m.write_bytes(pickle.dumps({"label_names": ["cat", "dog"], "num_vis": 3072}, protocol=protocol
                               if protocol != "py2" else 2))
    assert read_cifar_meta(m, "label_names") == ["cat", "dog"]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_synthetic_cifar_folder_loads(tmp_path, dataset) -> None:
    _place(tmp_path, dataset)
    d = load_dataset(dataset, data_dir=tmp_path, download=False)
    assert d.in_shape == (3, 32, 32) and len(d.test) == 6 and len(d.class_names) == (10 if dataset == "cifar10" else 100)


def _tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def _cifar10_archive(path: Path, marker: Path | None = None, bad: str = "data_batch_1") -> Path:
    rng = np.random.default_rng(0)
    return _tar(path, {f"cifar-10-batches-py/{n}": (malicious(marker) if marker and n == bad else _legit(n, rng))
                       for n in CIFAR10})


def _accept_md5(monkeypatch, archive: Path) -> None:
    """Pretend ``archive`` is the published one (its checksum becomes the expected one)."""
    entry = datasets._CIFAR["cifar10"]
    monkeypatch.setitem(datasets._CIFAR, "cifar10", (entry[0], entry[1], md5sum(archive), *entry[3:]))


def test_preplaced_archive_is_verified_before_unpacking(tmp_path) -> None:
    marker = tmp_path / "pwned"
    archive = _cifar10_archive(tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz", marker)
    for download in (False, True):  # a placed archive is never downloaded over, only verified
        with pytest.raises(PhalanxError, match=r"cifar-10-python\.tar\.gz does not match the published checksum"):
            load_dataset("cifar10", data_dir=tmp_path / "data", download=download)
    assert not (tmp_path / "data" / "cifar10" / "cifar-10-batches-py").exists() and archive.is_file()
    assert not marker.exists()


def test_verified_archive_with_a_malicious_batch_runs_nothing(tmp_path, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    archive = _cifar10_archive(tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz", marker, "test_batch")
    _accept_md5(monkeypatch, archive)
    with pytest.raises(PhalanxError, match=r"refusing CIFAR batch .*test_batch"):
        load_dataset("cifar10", data_dir=tmp_path / "data", download=False)
    assert not marker.exists()


def test_verified_legit_archive_unpacks_and_loads(tmp_path, monkeypatch) -> None:
    archive = _cifar10_archive(tmp_path / "cifar10" / "cifar-10-python.tar.gz")
    _accept_md5(monkeypatch, archive)
    d = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert len(d.test) == 6 and (tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()


@pytest.mark.parametrize("evil", ["../escaped", "/tmp/phalanx-absolute-escape", "cifar-10-batches-py/../../escaped",
                                  "link"])
def test_archive_members_outside_the_folder_are_refused(tmp_path, monkeypatch, evil) -> None:
    root = tmp_path / "data"
    archive = _cifar10_archive(root / "cifar10" / "cifar-10-python.tar.gz")
    members = {f"cifar-10-batches-py/{n}": _legit(n, np.random.default_rng(0)) for n in CIFAR10}
    links = {"cifar-10-batches-py/evil-link": "/etc"} if evil == "link" else None
    if evil != "link":
        members[evil] = b"escaped"
    _tar(archive, members, links)
    _accept_md5(monkeypatch, archive)
    with pytest.raises(PhalanxError, match=r"refusing to unpack .*not a plain file or folder inside"):
        load_dataset("cifar10", data_dir=root, download=False)
    assert not (tmp_path / "escaped").exists() and not (root / "escaped").exists()
    assert not Path("/tmp/phalanx-absolute-escape").exists()
    assert not (root / "cifar10" / "cifar-10-batches-py").exists()  # nothing unpacked before the check


def test_downloads_are_checked_before_they_land(tmp_path, monkeypatch) -> None:
    import hashlib
    import urllib.request

    from phalanx.data.files import download

    body = b"the published bytes"

    class _Resp(io.BytesIO):
        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *a: object) -> None:
            self.close()

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Resp(body))
    dest = tmp_path / "d" / "file.gz"
    with pytest.raises(PhalanxError, match="checksum mismatch"):
        download("https://example.invalid/file.gz", dest, "0" * 32)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no partial or temporary file left
    download("https://example.invalid/file.gz", dest, hashlib.md5(body).hexdigest())
    assert dest.read_bytes() == body
