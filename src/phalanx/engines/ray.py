"""The Ray engine: the same tasks on a Ray cluster (extra ``phalanx[ray]``).

- ``address=None`` starts a private local Ray instance (``ray.init(address="local")``, no
  dashboard, ``workers`` CPUs) and shuts it down on ``close``; ``address="auto"`` or
  ``"HOST:PORT"`` joins a running cluster (then ``workers`` caps the tasks in flight) and leaves
  it running. A Ray session the caller already initialised is used as it is and left open.
- Each task asks Ray for ``task.cpus`` CPUs and ``task.gpus`` GPUs; Ray sets the
  ``CUDA_VISIBLE_DEVICES`` of a GPU task. ``max_retries=0``: a task whose worker died is not
  re-run by Ray, it comes back ``CRASHED`` and the caller records it.
- A task past its ``timeout_s`` is cancelled with ``force=True`` (its worker process is killed)
  and comes back ``TIMEOUT``.
- Results flow back to the driver (the one process that writes files). A run's
  :class:`~phalanx.engines.base.Setup` is put in the object store once and run once per Ray
  worker process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from phalanx.engines.base import ENGINES, Outcome, Setup, Status, Task, execute, failed_as, run_setup
from phalanx.errors import PhalanxError

INSTALL_HINT = "the ray engine needs Ray: pip install 'phalanx[ray]'"

_WORKER_SETUP: dict[str, Any] = {"token": None, "failure": None}


def _ray_execute(task: Task, setup_box: list[Any] | None) -> Outcome:
    """Runs inside a Ray worker: the run's setup (once per process), then the task."""
    from phalanx.engines.local import _set_threads

    if setup_box is not None and _WORKER_SETUP["token"] != setup_box[0]:
        import ray

        _WORKER_SETUP["failure"] = run_setup(ray.get(setup_box[1]))
        _WORKER_SETUP["token"] = setup_box[0]
    failure = _WORKER_SETUP["failure"] if setup_box is not None else None
    _set_threads(task.cpus)
    return execute(task) if failure is None else failed_as(task, failure)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise PhalanxError(INSTALL_HINT) from None
    return ray


class RayEngine:
    """Tasks as Ray remote functions (see the module docstring)."""

    name = "ray"

    def __init__(self, workers: int = 1, *, address: str | None = None, object_store_mb: int = 256,
                 init_options: dict[str, Any] | None = None, **_: Any) -> None:
        ray = _import_ray()
        self._ray = ray
        self.workers = workers
        self.address = address
        self._owns = False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not ray.is_initialized():
            opts: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False,
                                    "configure_logging": True}
            if address is None:
                opts.update(address="local", num_cpus=workers, object_store_memory=object_store_mb * 2**20)
            else:
                opts.update(address=address)
            opts.update(init_options or {})
            try:
                ray.init(**opts)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise PhalanxError(f"cannot reach a Ray cluster at address {address!r}: {exc}; accepted: 'auto', "
                                   "HOST:PORT of a running head node, or no address for a local instance") from None
            self._owns = True
        self._remote = ray.remote(_ray_execute)
        self._closed = False

    def run(self, tasks: Iterable[Task], setup: Setup | None = None) -> Iterator[Outcome]:
        if self._closed:
            raise PhalanxError("this engine is closed; create a new one")
        ray = self._ray
        box = [setup.token, ray.put(setup)] if setup is not None else None
        source, exhausted = iter(tasks), False
        running: dict[Any, tuple[Task, float, float]] = {}  # ref -> task, start, deadline
        have = ray.cluster_resources()
        try:
            while True:
                while not exhausted and len(running) < self.workers:
                    try:
                        task = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    short = [f"{n} {r}(s)" for n, r in ((task.cpus, "CPU"), (task.gpus, "GPU")) if n > have.get(r, 0)]
                    if short:  # Ray would keep it pending for ever
                        yield Outcome(task.key, Status.FAILED, error=f"task asks for {' and '.join(short)}; the Ray "
                                      f"cluster has {have.get('CPU', 0):g} CPU(s) and {have.get('GPU', 0):g} GPU(s)")
                        continue
                    ref = self._remote.options(num_cpus=task.cpus, num_gpus=task.gpus, max_retries=0,
                                               retry_exceptions=False).remote(task, box)
                    start = time.perf_counter()
                    running[ref] = (task, start, start + task.timeout_s if task.timeout_s is not None else float("inf"))
                if not running:
                    return
                soonest = min(d for _, _, d in running.values())
                wait_s = None if soonest == float("inf") else max(0.0, soonest - time.perf_counter())
                done, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)
                for ref in done:
                    task, start, _ = running.pop(ref)
                    yield self._collect(ref, task, start)
                now = time.perf_counter()
                for ref, (task, start, deadline) in list(running.items()):
                    if now >= deadline:
                        del running[ref]
                        ray.cancel(ref, force=True)
                        yield Outcome(task.key, Status.TIMEOUT, wall_s=now - start,
                                      error=f"ran past its timeout of {task.timeout_s:g} s and was killed")
        finally:
            for ref in running:
                ray.cancel(ref, force=True)

    def _collect(self, ref: Any, task: Task, start: float) -> Outcome:
        ray = self._ray
        try:
            out: Outcome = ray.get(ref)
            return out
        except ray.exceptions.RayTaskError as exc:  # a BaseException that execute() does not catch
            return Outcome(task.key, Status.FAILED, error=str(exc).splitlines()[0], detail=str(exc),
                           wall_s=time.perf_counter() - start)
        except ray.exceptions.RayError as exc:  # the worker died (signal, OOM, os._exit) or the node was lost
            return Outcome(task.key, Status.CRASHED, error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
                           detail=str(exc), wall_s=time.perf_counter() - start)

    def close(self) -> None:
        if not self._closed and self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        self._closed = True

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ENGINES.add("ray", RayEngine, "tasks on a Ray cluster or a local Ray instance (extra phalanx[ray])")
