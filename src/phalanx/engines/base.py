"""The engine contract: run independent tasks (sweep cells, verification queries) somewhere and
stream their outcomes back to the one driver process, which alone writes files.

An engine never raises because a task failed: a task that raises, exceeds its timeout or whose
process dies becomes an :class:`Outcome` with status ``FAILED``, ``TIMEOUT`` or ``CRASHED``.
Engines do not retry; the caller records the failure and decides.
"""

from __future__ import annotations

import enum
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from phalanx.errors import PhalanxError
from phalanx.registry import Registry


@dataclass(frozen=True)
class Task:
    """One unit of work. ``fn`` must be a module-level function (picklable by reference) and
    ``args``/``kwargs`` picklable; the return value must be picklable too."""

    key: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    cpus: int = 1
    gpus: int = 0

    def __post_init__(self) -> None:
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise PhalanxError(f"task {self.key!r}: timeout_s must be > 0 or None, got {self.timeout_s!r}")
        if self.cpus < 0 or self.gpus < 0:
            raise PhalanxError(f"task {self.key!r}: cpus and gpus must be >= 0, got {self.cpus}, {self.gpus}")


@dataclass(frozen=True)
class Setup:
    """Per-process preparation shared by the tasks of one ``run``: ``fn(*args, **kwargs)`` is called
    once in every process that runs some of those tasks, before the first of them (again in a
    process that replaces a killed one). ``fn`` keeps what it builds in module state, where the
    tasks' functions find it; the payload (models, data) thus travels once per process, not once
    per task. ``token`` tells one run's setup from another's."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __call__(self) -> None:
        self.fn(*self.args, **self.kwargs)


class Status(str, enum.Enum):
    DONE = "done"
    FAILED = "failed"  # the task raised
    TIMEOUT = "timeout"  # the task ran past its timeout and was killed
    CRASHED = "crashed"  # the process running the task died (signal, OOM, os._exit)


@dataclass(frozen=True)
class Outcome:
    key: str
    status: Status
    value: Any = None
    error: str | None = None  # one line for FAILED/TIMEOUT/CRASHED
    detail: str | None = None  # traceback, when there is one
    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU time of the process that ran the task, when known

    @property
    def ok(self) -> bool:
        return self.status is Status.DONE


class Engine(Protocol):
    """``run`` yields one outcome per task, in completion order, and returns when all are done;
    ``setup`` (optional) prepares every process that runs tasks of this run. Engines are context
    managers; ``close`` releases workers."""

    name: str
    workers: int

    def run(self, tasks: Iterable[Task], setup: Setup | None = None) -> Iterator[Outcome]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc: object) -> None: ...


def _one_line(exc: BaseException) -> str:
    return (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0]


def run_setup(setup: Setup | None) -> Outcome | None:
    """Call ``setup`` here; ``None`` when it succeeded (or there is none), else a FAILED outcome
    (key ``"setup"``) that the engine reports for every task it cannot run."""
    if setup is None:
        return None
    try:
        setup()
    except Exception as exc:  # the engine boundary records every failure
        return Outcome("setup", Status.FAILED, error=f"setup failed: {_one_line(exc)}", detail=traceback.format_exc())
    return None


def failed_as(task: Task, setup_failure: Outcome) -> Outcome:
    """The outcome of ``task`` that could not run because its process's setup failed."""
    return Outcome(task.key, Status.FAILED, error=setup_failure.error, detail=setup_failure.detail)


def execute(task: Task) -> Outcome:
    """Run one task in this process, turning an exception into a FAILED outcome."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        value = task.fn(*task.args, **task.kwargs)
    except Exception as exc:  # the engine boundary records every failure
        return Outcome(task.key, Status.FAILED, error=_one_line(exc),
                       detail=traceback.format_exc(), wall_s=time.perf_counter() - t0,
                       cpu_s=time.process_time() - c0)
    return Outcome(task.key, Status.DONE, value=value, wall_s=time.perf_counter() - t0,
                   cpu_s=time.process_time() - c0)


class SerialEngine:
    """In-process, one task at a time: no timeouts, no crash isolation. For debugging and as the
    reference that the other engines must agree with."""

    name = "serial"

    def __init__(self, workers: int = 1, **_: Any) -> None:
        self.workers = 1

    def run(self, tasks: Iterable[Task], setup: Setup | None = None) -> Iterator[Outcome]:
        failure = run_setup(setup)
        for task in tasks:
            yield execute(task) if failure is None else failed_as(task, failure)

    def close(self) -> None:
        pass

    def __enter__(self) -> SerialEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ENGINES: Registry[Callable[..., Engine]] = Registry("engine")
ENGINES.add("serial", SerialEngine, "in-process, one task at a time (no timeouts or crash isolation)")


def create_engine(name: str = "local", *, workers: int = 1, **options: Any) -> Engine:
    """``create_engine("local", workers=2)``; ``create_engine("ray", workers=4, address="auto")``."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise PhalanxError(f"workers must be a positive integer, got {workers!r}")
    return ENGINES.get(name)(workers=workers, **options)
