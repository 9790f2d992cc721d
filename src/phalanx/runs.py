"""Run folders: ownership, reuse policy, resolved config, environment, results and report.

A run folder is owned by one process at a time and never silently reused. The API, shared by
every command that writes a run folder (and by sweeps):

- :func:`open_run` ``(out, command, reuse=Reuse.NEW, root="runs") -> RunFolder`` creates
  ``out`` (or ``root/<timestamp>-<command>`` when ``out`` is None), takes the folder's lock
  and applies the reuse policy; use it as a context manager (``with open_run(...) as run:``,
  ``run.path`` is the folder). On leaving, ``.phalanx/run.json`` records ``finished`` (or ``failed``
  with the error, or ``interrupted``) and the lock is released.
- :class:`Reuse`: what an existing run in the folder may be. ``NEW`` refuses a folder that
  holds a run, except an unfinished run of the same command with no training state to resume
  (``checkpoints/last.pt``), which is retried in place; ``CONTINUE`` accepts a run of the same command (resumable query stores:
  ``verify``, ``select``) and refuses others; ``RESUME`` requires a run of the same command
  to continue (``train --resume``); ``OVERWRITE`` accepts any run and deletes its record
  files (:data:`RECORD_FILES`) and its training state (``checkpoints/last.pt``, which a
  ``--resume`` would otherwise continue under the new run's config if the new run dies before
  its first checkpoint) first, keeping ``ensemble.pt`` (a possible ``model.init``) and other files.
- The lock is ``.phalanx/lock`` in the folder: an ``flock`` held for the process's life,
  with the owner's pid and command written in it for the error message. The kernel drops it
  when the owner dies (also on SIGKILL), so a stale lock cannot block a folder; a second
  process on the same folder gets :class:`RunFolderBusy`, a :class:`~phalanx.errors.PhalanxError`.
- ``.phalanx/run.json`` records ``command``, ``status`` (running, finished, failed, interrupted),
  ``pid``, ``started`` and ``ended``. A folder without it but with ``config.json``,
  ``results.json`` or ``checkpoints/last.pt`` (written before the run record existed) counts as a
  run of unknown command.

Writes inside a run use :func:`write_json` (temp file + rename) and checkpoints
``ensembles.atomic_save``, so a crash leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch

from phalanx.errors import PhalanxError

RESULTS_SCHEMA_VERSION = 1
LOCK_FILE = ".phalanx/lock"
RUN_FILE = ".phalanx/run.json"
#: files that describe a run's outcome; ``Reuse.OVERWRITE`` deletes them before the new run
RECORD_FILES = (RUN_FILE, "config.json", "results.json", "report.md", "metrics.jsonl", "environment.json",
                "queries.jsonl", "validation.jsonl")
RESUMABLE_STATE = "checkpoints/last.pt"
_LEGACY_MARKERS = ("config.json", "results.json", RESUMABLE_STATE)


class Reuse(str, enum.Enum):
    """What may already be in a run folder (see the module docstring)."""

    NEW = "new"
    CONTINUE = "continue"
    RESUME = "resume"
    OVERWRITE = "overwrite"


class RunFolderBusy(PhalanxError):
    """Another live process holds the run folder's lock."""


def run_info(path: str | Path) -> dict[str, Any] | None:
    """The run recorded in ``path`` (``.phalanx/run.json``), ``{"command": None, ...}`` for a run folder
    written before ``.phalanx/run.json`` existed, or None when the folder holds no run."""
    p = Path(path)
    f = p / RUN_FILE
    if f.is_file():
        try:
            info = json.loads(f.read_text())
            if isinstance(info, dict):
                return info
        except (OSError, ValueError):
            pass
        return {"command": None, "status": "unreadable"}
    if any((p / m).exists() for m in _LEGACY_MARKERS):
        return {"command": None, "status": "unknown"}
    return None


class RunFolder:
    """An owned run folder (see :func:`open_run`); ``path`` is the folder."""

    def __init__(self, path: Path, command: str, lock: IO[str]) -> None:
        self.path = path
        self.command = command
        self._lock: IO[str] | None = lock
        self.info: dict[str, Any] = {"command": command, "status": "running", "pid": os.getpid(),
                                     "host": socket.gethostname(), "started": _now(), "ended": None}
        write_json(path / RUN_FILE, self.info)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:  # closed by a caller that does not pass on the exception (click < 8.2)
            exc_type, exc = sys.exc_info()[:2]
        if exc_type is None:
            self.close("finished")
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)) or exc_type.__name__ == "Abort":
            self.close("interrupted")
        else:
            self.close("failed", f"{exc_type.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def close(self, status: str = "finished", error: str | None = None) -> None:
        """Record ``status`` in ``.phalanx/run.json`` and release the lock (idempotent)."""
        if self._lock is None:
            return
        try:
            self.info.update(status=status, ended=_now())
            if error:
                self.info["error"] = error
            with contextlib.suppress(OSError):  # a full disk must not hide the run's own error
                write_json(self.path / RUN_FILE, self.info)
        finally:
            _unlock(self.path, self._lock)
            self._lock = None


def open_run(out: str | Path | None, command: str, *, reuse: Reuse | str = Reuse.NEW,
             root: str | Path = "runs") -> RunFolder:
    """Create/own the run folder ``out`` (default ``root/<timestamp>-<command>``) for ``command``.

    Raises :class:`RunFolderBusy` if another process owns it and :class:`PhalanxError` if the
    folder holds a run that ``reuse`` does not accept or cannot be created."""
    policy = Reuse(reuse)
    path = new_run_dir(root, command) if out is None else Path(out)
    if out is not None:
        if path.exists() and not path.is_dir():
            raise PhalanxError(f"run folder {path} exists and is not a folder")
        if policy is Reuse.RESUME and not path.is_dir():
            raise PhalanxError(f"cannot resume: run folder {path} does not exist")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PhalanxError(f"cannot create run folder {path}: {exc.strerror or exc}") from None
    lock = _lock(path, command)
    try:
        _check_reuse(path, command, policy)
        if policy is Reuse.OVERWRITE:
            for name in (*RECORD_FILES, RESUMABLE_STATE):
                (path / name).unlink(missing_ok=True)
        return RunFolder(path, command, lock)
    except BaseException:
        _unlock(path, lock)
        raise


def _check_reuse(path: Path, command: str, policy: Reuse) -> None:
    info = run_info(path)
    if policy is Reuse.OVERWRITE:
        return
    if policy is Reuse.RESUME:
        if info is None:
            raise PhalanxError(f"cannot resume: {path} holds no run")
        if info.get("command") not in (None, command):
            raise PhalanxError(f"cannot resume: {path} holds a {info['command']} run, not a {command} run")
        return
    if info is None:
        return
    if (info.get("command") == command and info.get("status") != "finished"
            and not (path / RESUMABLE_STATE).exists()):
        return  # an unfinished run of this command with nothing to resume: retry in place
    status = info.get("status", "unknown")
    if status == "running":  # we hold the lock, so its owner ended without recording the end
        status = f"unfinished (pid {info.get('pid')} ended)"
    what = f"a {status} {info.get('command') or 'phalanx'} run"
    if policy is Reuse.CONTINUE and info.get("command") == command:
        return
    hint = ("continue it with --resume or replace it with --overwrite" if command == "train"
            else "replace it with --overwrite")
    raise PhalanxError(f"run folder {path} already holds {what}; choose another --out, or {hint}")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _lock(path: Path, command: str) -> IO[str]:
    """Take ``path/.phalanx/lock`` (flock, non-blocking); the pid and command go in the file."""
    lock_path = path / LOCK_FILE
    try:
        lock_path.parent.mkdir(exist_ok=True)
    except OSError as exc:
        raise PhalanxError(f"cannot write in run folder {path}: {exc.strerror or exc}") from None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: an exclusive create (stale after a crash)
        fcntl = None  # type: ignore[assignment]
    while True:
        try:
            if fcntl is None:  # pragma: no cover
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_RDWR)
            else:
                fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        except FileExistsError:  # pragma: no cover
            raise RunFolderBusy(f"run folder {path} is in use ({_owner(lock_path)}); remove {lock_path} "
                                "if no phalanx process uses it") from None
        except OSError as exc:
            raise PhalanxError(f"cannot write in run folder {path}: {exc.strerror or exc}") from None
        f = os.fdopen(fd, "r+")
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                f.close()
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunFolderBusy(f"run folder {path} is in use by another phalanx process "
                                        f"({_owner(lock_path)}); wait for it or choose another --out") from None
                raise
            try:  # the holder before us may have unlinked the file: lock the live one
                if os.fstat(f.fileno()).st_ino != os.stat(lock_path).st_ino:
                    f.close()
                    continue
            except FileNotFoundError:
                f.close()
                continue
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                            "since": _now()}))
        f.flush()
        return f


def _unlock(path: Path, f: IO[str]) -> None:
    with contextlib.suppress(OSError):
        (path / LOCK_FILE).unlink()  # unlink while holding the lock; waiters re-check the inode
    f.close()


def _owner(lock_path: Path) -> str:
    try:
        o = json.loads(lock_path.read_text())
        return f"pid {o['pid']} on {o['host']}, {o['command']} since {o['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


def new_run_dir(root: str | Path, command: str) -> Path:
    """Create ``root/<timestamp>-<command>`` (suffix -2, -3 ... if it exists), atomically."""
    base = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}"
    path, i = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            i += 1
            path = base.with_name(f"{base.name}-{i}")
        except OSError as exc:
            raise PhalanxError(f"cannot create run folder {path}: {exc.strerror or exc}") from None


def git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(seed: int | None, device: str) -> dict[str, Any]:
    import numpy

    from phalanx import __version__

    return {
        "phalanx": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "numpy": numpy.__version__, "platform": platform.platform(), "processor": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": device, "seed": seed, "git_revision": git_revision(),
        "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_default) + "\n")
    tmp.replace(path)
    return path


def write_results(run_dir: str | Path, kind: str, payload: dict[str, Any]) -> Path:
    """``results.json`` with a schema version and the kind of result."""
    return write_json(Path(run_dir) / "results.json",
                      {"schema_version": RESULTS_SCHEMA_VERSION, "kind": kind, **payload})


def _default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "value"):
        return o.value
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
