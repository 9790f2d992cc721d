"""Small module-level task functions that exercise an engine: the engines' tests and
``benchmarks/scale.py`` (per-task overhead) use them, and users can check a cluster with them
(``phalanx.engines.probes.whoami`` reports where a task ran)."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any

_STATE: dict[str, Any] = {}


def noop(x: Any = None) -> Any:
    """Return ``x``: a task whose cost is all engine overhead."""
    return x


def square(x: float) -> float:
    return x * x


def spin(seconds: float) -> float:
    """Busy-loop for ``seconds`` of CPU time; returns the CPU seconds used."""
    c0 = time.process_time()
    while time.process_time() - c0 < seconds:
        pass
    return time.process_time() - c0


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def mark_and_sleep(path: str, seconds: float) -> None:
    """Write this process's pid to ``path``, then sleep (to watch what happens to a busy worker)."""
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)


def fail(message: str = "boom") -> None:
    raise ValueError(message)


def kill_self(signum: int = signal.SIGKILL) -> None:
    """The process running the task sends itself ``signum``."""
    os.kill(os.getpid(), signum)
    time.sleep(10)


def exit_hard(code: int = 3) -> None:
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def remember(**values: Any) -> None:
    """A :class:`~phalanx.engines.base.Setup` function: keep ``values`` in this process."""
    _STATE.update(values)


def recall(key: str) -> Any:
    """What :func:`remember` kept under ``key`` in this process."""
    return _STATE[key]


def cuda_info() -> dict[str, Any]:
    """What CUDA the task's process sees: availability, device count and its visible devices."""
    import torch

    ok = torch.cuda.is_available()
    return {"available": ok, "count": torch.cuda.device_count() if ok else 0,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "sum": float(torch.ones(4, device="cuda").sum()) if ok else None}


def whoami(x: Any = None) -> dict[str, Any]:
    """Where the task ran: pid, host and visible CUDA devices."""
    return {"x": x, "pid": os.getpid(), "host": os.uname().nodename,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
