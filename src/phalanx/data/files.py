"""Readers for the standard dataset file formats (IDX for MNIST-like sets, python pickles for
CIFAR), and checksum-verified downloads from the canonical sources."""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import pickle
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

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


def data_root(data_dir: Path | str | None) -> Path:
    """The folder datasets are read from: ``data_dir`` when given (it must exist: a mistyped
    ``--data-dir`` is an error, not a new folder tree), else :func:`default_data_dir`."""
    if data_dir is None:
        return default_data_dir()
    root = Path(data_dir)
    if not root.is_dir():
        raise DataNotFoundError(f"data folder {root} does not exist (--data-dir or ${DATA_DIR_ENV}); "
                                "create it or point to the folder holding the dataset files")
    return root


def read_idx(path: Path, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array; with ``expect_ndim``, one of
    another rank (e.g. a labels file where images belong) is an error."""
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
    if expect_ndim is not None and len(dims) != expect_ndim:
        kind = {1: "labels", 3: "images"}.get(len(dims), f"{len(dims)}-dimensional data")
        want = {1: "labels", 3: "images"}.get(expect_ndim, f"{expect_ndim}-dimensional data")
        raise PhalanxError(f"{path} holds {kind} {dims}, expected {want}; is the file misnamed?")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip-compressed IDX file (used by tests to make small fixtures)."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def _numpy_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dtype} (arrays of Python objects) is not data")
    return dtype


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """What protocol-2 pickles written by Python 3 use to rebuild ``bytes`` (``_codecs.encode``)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only latin1 rebuilds bytes)")
    return text.encode("latin1")


@functools.cache
def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only callables a data pickle may name: how numpy rebuilds arrays, dtypes and scalars,
    under every module path numpy has pickled them from (``numpy.core`` before 2.0,
    ``numpy._core`` since; protocol 5 uses ``_frombuffer``), found from numpy itself."""
    a = np.zeros(1, dtype=np.uint8)
    reconstruct, frombuffer = a.__reduce__()[0], a.__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _numpy_dtype,
                                       ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        out[(f"{core}.multiarray", "scalar")] = scalar
        out[(f"{core}.numeric", "_frombuffer")] = frombuffer
    for builtins in ("builtins", "__builtin__"):  # Python 2 pickles name the builtins module so
        for name, obj in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray)):
            out[(builtins, name)] = obj
    return out


class _DataUnpickler(pickle.Unpickler):
    """Builds only builtin containers, str/bytes/int/float/bool/None and numpy arrays (no object
    dtype): every other global a pickle names is refused before anything runs."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _numpy_globals().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not data "
                                         "(only builtin containers, numbers, strings and numpy arrays are read)")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it refers to a persistent object, which is not data")


def read_data_pickle(path: Path, what: str = "data file") -> Any:
    """Read a python-pickle data file (the CIFAR batches) without executing code from it.

    The one reader for pickled data (``SECURITY.md``): a restricted unpickler admits only the
    builtin containers, strings, bytes, numbers and numpy arrays that such files hold, and raises
    :class:`PhalanxError` naming the file for anything else. Text from Python 2 pickles is read
    as ``bytes`` (``encoding="bytes"``, as the CIFAR page prescribes)."""
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise PhalanxError(f"refusing {what} {path}: {exc}") from None
    except Exception as exc:  # an untrusted file: whatever it makes numpy or pickle raise is a bad file
        raise PhalanxError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from None


def _text_keys(d: Any, path: Path, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise PhalanxError(f"{path} is not a {what} (a dict was expected, got {type(d).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in d.items()}


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python-pickle batch: images (N, 3, 32, 32) uint8 and labels (N,)."""
    d = _text_keys(read_data_pickle(path, "CIFAR batch"), path, "CIFAR batch")
    if "data" not in d or label_key not in d:
        raise PhalanxError(f"{path} is not a CIFAR batch (keys data/{label_key} missing)")
    try:
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
    except (ValueError, TypeError) as exc:
        raise PhalanxError(f"{path} is not a CIFAR batch: {exc}") from None
    if len(x) != len(y):
        raise PhalanxError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def read_cifar_meta(path: Path, key: str) -> list[str]:
    """Read the class names from a CIFAR ``batches.meta`` / ``meta`` file."""
    d = _text_keys(read_data_pickle(path, "CIFAR meta file"), path, "CIFAR meta file")
    if key not in d or not isinstance(d[key], (list, tuple)):
        raise PhalanxError(f"{path} is not a CIFAR meta file (list {key} missing)")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in d[key]]


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def md5sum(path: Path) -> str:
    return file_digest(path, "md5")


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


def verify_archive(path: Path, md5: str, source: str) -> None:
    """Check a downloaded or pre-placed archive against its published MD5 before anything is
    unpacked from it; a mismatch raises :class:`PhalanxError` naming the file."""
    got = md5sum(path)
    if got != md5:
        raise PhalanxError(f"{path} does not match the published checksum of {source} (md5 {got}, expected "
                           f"{md5}); delete it (or put the original there) and run again")


def extract_tar(archive: Path, dest: Path) -> None:
    """Unpack ``archive`` into ``dest``: only regular files and folders, every one inside
    ``dest`` (no absolute paths, ``..``, links or devices; ``PhalanxError`` otherwise). Members
    are checked before anything is written."""
    root = dest.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                target = (root / m.name).resolve()
                if not (m.isreg() or m.isdir()) or os.path.isabs(m.name) or not target.is_relative_to(root):
                    kind = "link" if (m.issym() or m.islnk()) else "member"
                    raise PhalanxError(f"refusing to unpack {archive}: {kind} {m.name!r} is not a plain file or "
                                       f"folder inside {dest}")
            dest.mkdir(parents=True, exist_ok=True)
            if hasattr(tarfile, "data_filter"):  # the standard library's own check, where it has one
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.10.12 / 3.11.4
                tar.extractall(dest, members=members)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PhalanxError(f"cannot unpack {archive}: {exc}") from None
