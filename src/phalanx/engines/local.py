"""The local engine: a pool of worker processes on this machine.

Every task runs in a worker process, never in the driver, one task at a time per worker:

- **hard timeout**: a task past its ``timeout_s`` has its process killed (SIGKILL) and becomes
  ``TIMEOUT``; a fresh worker takes its place;
- **crash isolation**: a worker that dies (a signal, ``os._exit``, a segfault, the OOM killer)
  turns its task into ``CRASHED`` with the exit code or signal; the pool goes on;
- **CPU time**: each outcome carries the CPU seconds its task used (measured in the worker; for
  a killed or crashed task, read from ``/proc`` where available);
- **warm start**: workers are forked from a ``forkserver`` that has already imported torch, numpy
  and phalanx (``preload``), so a new worker costs a fork instead of a Python start-up plus
  seconds of imports (the forkserver itself starts when the engine is created, in the background,
  once per driver process); workers persist across tasks and across runs of the same engine, and a
  run's :class:`~phalanx.engines.base.Setup` is shipped to each worker once;
- **GPUs**: a task with ``gpus > 0`` waits for that many free devices and runs in a fresh worker
  whose ``CUDA_VISIBLE_DEVICES`` names them (that worker is retired afterwards, as CUDA cannot
  change devices once initialised); CPU-only tasks see no GPU when the engine manages some.

``engine.startups`` records each worker's start-up cost (wall seconds from ``start()`` until it
was ready to take work, and the CPU seconds the worker itself spent getting there).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from phalanx.engines.base import ENGINES, Outcome, Setup, Status, Task, execute, failed_as, run_setup
from phalanx.errors import PhalanxError

#: Modules the forkserver imports once, so that every worker forked from it starts warm. Besides
#: torch and phalanx: what training tasks (sweep cells) import lazily (measured CPU per import on
#: this project's dev machine: torch._dynamo, which torch imports at the first optimizer step,
#: 1.2 s; sklearn.datasets, used by the digits loader, 0.8 s; matplotlib.pyplot 0.4 s).
#: A module that is not installed is skipped.
DEFAULT_PRELOAD = ("numpy", "torch", "torch._dynamo", "phalanx", "phalanx.attacks", "phalanx.evaluation",
                   "phalanx.verification", "matplotlib.pyplot", "sklearn.datasets")
#: What verification queries need (no optimizer, no data loading, no plots in the workers): a
#: shorter forkserver boot for ``verify`` commands.
VERIFY_PRELOAD = ("numpy", "torch", "phalanx", "phalanx.verification")

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (also of a zombie), or None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return None


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _set_threads(n: int) -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(max(1, n))


def _exit_with_driver(conn: Connection) -> None:
    """Watch (in a daemon thread) for the driver's end of ``conn`` closing, and end this worker
    then: a killed driver leaves no task running. The driver never writes to a busy worker, so a
    hang-up is the only event this waits for."""
    import select
    import threading

    if not hasattr(select, "poll"):
        return
    mask = select.POLLHUP | getattr(select, "POLLRDHUP", 0)

    def watch() -> None:
        poller = select.poll()
        poller.register(conn.fileno(), mask)
        while True:
            if any(ev & mask for _, ev in poller.poll()):
                os._exit(1)

    threading.Thread(target=watch, name="phalanx-driver-watch", daemon=True).start()


def _worker_main(conn: Connection, cuda_devices: str | None) -> None:
    """A worker's loop: ``("setup", Setup)`` prepares it; ``("task", Task)`` is answered with an
    :class:`Outcome`; ``("stop",)`` or the driver's end closing ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    _exit_with_driver(conn)
    if cuda_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_devices
    conn.send(("ready", os.getpid(), _own_cpu()))
    failure: Outcome | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        if msg[0] == "setup":
            failure = run_setup(msg[1])
            continue
        task: Task = msg[1]
        _set_threads(task.cpus)
        out = execute(task) if failure is None else failed_as(task, failure)
        try:
            conn.send(out)
        except Exception as exc:  # an unpicklable result
            conn.send(Outcome(task.key, Status.FAILED, error=f"result not picklable: {type(exc).__name__}: {exc}",
                              wall_s=out.wall_s, cpu_s=out.cpu_s))


@dataclass
class _Worker:
    proc: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    devices: tuple[str, ...] | None  # the GPUs it owns; None for a CPU worker
    pid: int = 0
    token: str | None = None  # the setup it has run
    task: Task | None = None
    started: float = 0.0
    deadline: float = float("inf")
    cpu0: float | None = None

    @property
    def gpu(self) -> bool:
        return self.devices is not None


def _death(proc: Any) -> str:
    proc.join(timeout=5)
    code = proc.exitcode
    if code is None:
        return "worker process stopped answering"
    if code < 0:
        try:
            return f"worker process killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"worker process killed by signal {-code}"
    return f"worker process exited with code {code}"


class LocalEngine:
    """A process pool on this machine: hard timeouts, crash isolation, CPU accounting and warm
    workers (see the module docstring). ``workers`` processes run at most that many tasks at
    once; ``gpus`` lists the devices (``CUDA_VISIBLE_DEVICES`` entries) tasks may claim (default: ``CUDA_VISIBLE_DEVICES``,
    else every device torch sees, else none)."""

    name = "local"

    def __init__(self, workers: int = 1, *, start_method: str | None = None,
                 preload: Sequence[str] = DEFAULT_PRELOAD, gpus: Sequence[int | str] | None = None,
                 **_: Any) -> None:
        methods = mp.get_all_start_methods()
        method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
        if method not in methods:
            raise PhalanxError(f"start method {method!r} is not available here; accepted: {', '.join(methods)}")
        self.workers = workers
        self.start_method = method
        self._ctx = mp.get_context(method)
        if method == "forkserver":
            from multiprocessing import forkserver

            self._ctx.set_forkserver_preload(list(preload))
            forkserver.ensure_running()  # boots (imports) in the background while the caller prepares its tasks
        self.gpus: tuple[str, ...] = tuple(map(str, gpus)) if gpus is not None else _visible_gpus()
        self._idle: list[_Worker] = []  # warm CPU workers
        self._busy: dict[int, _Worker] = {}  # by pid
        self.startups: list[dict[str, float]] = []
        self._closed = False

    # -- workers ---------------------------------------------------------------------------------
    def _spawn(self, devices: tuple[str, ...] | None) -> _Worker:
        here, there = self._ctx.Pipe(duplex=True)
        cuda = ",".join(devices) if devices is not None else ("" if self.gpus else None)
        proc = self._ctx.Process(target=_worker_main, args=(there, cuda),  # type: ignore[attr-defined]
                                 daemon=True, name="phalanx-worker")
        t0 = time.perf_counter()
        proc.start()
        there.close()
        w = _Worker(proc, here, devices)
        try:
            msg = here.recv()
        except (EOFError, OSError):
            raise PhalanxError(f"a local-engine worker could not start: {_death(proc)}") from None
        w.pid = msg[1]
        self.startups.append({"wall_s": time.perf_counter() - t0, "cpu_s": float(msg[2])})
        return w

    def _kill(self, w: _Worker) -> float | None:
        cpu = _proc_cpu(w.pid)
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=5)
        w.conn.close()
        return cpu

    def _dispatch(self, w: _Worker, task: Task, setup: Setup | None) -> None:
        token = setup.token if setup is not None else None
        if w.token != token:  # also a run without setup: the worker forgets an earlier run's failed setup
            w.conn.send(("setup", setup))
            w.token = token
        w.task, w.started = task, time.perf_counter()
        w.deadline = w.started + task.timeout_s if task.timeout_s is not None else float("inf")
        w.cpu0 = _proc_cpu(w.pid)
        w.conn.send(("task", task))
        self._busy[w.pid] = w

    def _lost(self, w: _Worker, status: Status, error: str) -> Outcome:
        """The outcome of the task of a worker that is killed (timeout) or died (crash)."""
        assert w.task is not None
        cpu = self._kill(w)
        used = cpu - w.cpu0 if cpu is not None and w.cpu0 is not None else 0.0
        return Outcome(w.task.key, status, error=error, wall_s=time.perf_counter() - w.started, cpu_s=max(0.0, used))

    def _free_gpus(self) -> list[str]:
        used = {d for w in self._busy.values() if w.devices for d in w.devices}
        return [d for d in self.gpus if d not in used]

    # -- the contract ----------------------------------------------------------------------------
    def run(self, tasks: Iterable[Task], setup: Setup | None = None) -> Iterator[Outcome]:
        if self._closed:
            raise PhalanxError("this engine is closed; create a new one")
        source, waiting, exhausted = iter(tasks), deque[Task](), False
        try:
            while True:
                # hand out work while there is a free slot and a task that can start
                while len(self._busy) < self.workers:
                    if not waiting and not exhausted:
                        try:
                            waiting.append(next(source))
                        except StopIteration:
                            exhausted = True
                    free = self._free_gpus()
                    task = next((t for t in waiting if t.gpus <= len(free) or t.gpus > len(self.gpus)), None)
                    if task is None:
                        break
                    waiting.remove(task)
                    if task.gpus > len(self.gpus):
                        yield Outcome(task.key, Status.FAILED, error=f"task asks for {task.gpus} GPU(s); this engine "
                                      f"has {len(self.gpus)} ({list(self.gpus)})")
                        continue
                    if task.gpus:
                        w = self._spawn(tuple(free[: task.gpus]))
                    else:
                        w = self._idle.pop() if self._idle else self._spawn(None)
                    self._dispatch(w, task, setup)
                if not self._busy:
                    if exhausted and not waiting:
                        return
                    continue
                now = time.perf_counter()
                limit = min(w.deadline for w in self._busy.values()) - now
                ready = wait([w.conn for w in self._busy.values()], timeout=max(0.0, limit) if limit < 1e9 else None)
                for w in list(self._busy.values()):
                    if w.conn in ready:
                        del self._busy[w.pid]
                        try:
                            out: Outcome = w.conn.recv()
                        except (EOFError, OSError):
                            yield self._lost(w, Status.CRASHED, _death(w.proc))
                            continue
                        w.task = None
                        if w.gpu:
                            self._retire(w)
                        else:
                            self._idle.append(w)
                        yield out
                    elif time.perf_counter() >= w.deadline:
                        del self._busy[w.pid]
                        assert w.task is not None
                        yield self._lost(w, Status.TIMEOUT, f"ran past its timeout of {w.task.timeout_s:g} s and "
                                         "was killed")
        finally:  # the consumer stopped early or failed: tasks still running are abandoned
            for w in list(self._busy.values()):
                self._kill(w)
            self._busy.clear()

    def _retire(self, w: _Worker) -> None:
        try:
            w.conn.send(("stop",))
        except OSError:
            pass
        w.proc.join(timeout=5)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(timeout=5)
        w.conn.close()

    def close(self) -> None:
        for w in self._idle:
            self._retire(w)
        for w in self._busy.values():
            self._kill(w)
        self._idle, self._busy, self._closed = [], {}, True

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


def _visible_gpus() -> tuple[str, ...]:
    """The devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [d.strip() for d in env.split(",")]
        return tuple(ids[: ids.index("-1")] if "-1" in ids else [d for d in ids if d])
    torch = sys.modules.get("torch")
    try:
        return tuple(str(i) for i in range(torch.cuda.device_count())) if torch is not None else ()
    except Exception:  # no usable CUDA driver
        return ()


ENGINES.add("local", LocalEngine, "a process pool on this machine: hard timeouts, crash isolation, warm workers")
