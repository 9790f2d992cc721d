"""Readers for the standard dataset file formats (IDX for MNIST-like sets, python pickles for
CIFAR), and checksum-verified downloads from the canonical sources."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from phalanx.errors import DataNotFoundError, PhalanxError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "PHALANX_DATA_DIR"


def default_data_dir() -> Path:
    """``$PHALANX_DATA_DIR`` if set, else ``~/.cache/phalanx/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "phalanx" / "data"


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:  # type: ignore[operator]
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise PhalanxError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise PhalanxError(f"{path} is not an IDX file (bad magic number)")
    dtypes: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes:
        raise PhalanxError(f"{path}: unknown IDX data type 0x{code:02x}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    dtype = np.dtype(dtypes[code])
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - offset != count * dtype.itemsize:
        raise PhalanxError(f"{path}: IDX payload size does not match its header {dims}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip-compressed IDX file (used by tests to make small fixtures)."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python-pickle batch: images (N, 3, 32, 32) uint8 and labels (N,)."""
    try:
        with open(path, "rb") as f:
            # CIFAR's official distribution format is a pickle of numpy arrays and lists;
            # read only files the user placed in the data directory.
            d = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise PhalanxError(f"cannot read CIFAR batch {path}: {exc}") from None
    key = label_key.encode()
    if b"data" not in d or key not in d:
        raise PhalanxError(f"{path} is not a CIFAR batch (keys data/{label_key} missing)")
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    y = np.asarray(d[key], dtype=np.int64)
    return x, y


def read_cifar_meta(path: Path, key: str) -> list[str]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in d[key.encode()]]


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str, timeout_s: float = 30.0) -> None:
    """Download ``url`` to ``dest`` atomically and verify its MD5; raise on any failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        got = md5sum(Path(tmp))
        if got != md5:
            raise PhalanxError(f"checksum mismatch for {url}: expected md5 {md5}, got {got}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def locate(
    data_dir: Path, subdir: str, names: list[str], sources: dict[str, tuple[str, str]], *, download_ok: bool
) -> dict[str, Path]:
    """Find each file in ``data_dir/subdir`` or ``data_dir``; download missing ones if allowed.

    ``sources`` maps a file name to ``(url, md5)``. Raises :class:`DataNotFoundError` listing
    the expected files and where to get them when they cannot be found or fetched.
    """
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        for cand in (data_dir / subdir / name, data_dir / name):
            if cand.is_file():
                found[name] = cand
                break
        else:
            missing.append(name)
    if missing and download_ok:
        errors = []
        for name in list(missing):
            url, md5 = sources[name]
            dest = data_dir / subdir / name
            try:
                log.info("downloading %s", url)
                download(url, dest, md5)
                found[name] = dest
                missing.remove(name)
            except Exception as exc:  # network down, checksum mismatch, permissions
                errors.append(f"{name}: {exc}")
        if errors:
            log.info("download failed: %s", "; ".join(errors))
    if missing:
        where = "; ".join(f"{n} <- {sources[n][0]}" for n in missing)
        tried = " (download failed: no network?)" if download_ok else ""
        raise DataNotFoundError(
            f"{subdir} files missing in {data_dir / subdir} (or {data_dir}){tried}: {', '.join(missing)}. "
            f"Place them there or pass --data-dir / set ${DATA_DIR_ENV}. Sources: {where}"
        )
    return found


def extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
