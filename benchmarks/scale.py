"""Engines side by side: speedup of ``verify pairs`` queries and of a sweep with 2 workers over 1
(local process pool and Ray), per-task overhead of each engine, and worker start-up cost.

All in one run, interleaved (each round runs every configuration once, in a shuffled order) and
reported as medians and ratios of medians measured in the same run. Every process does its work
on 1 thread. Beside every figure: the CPU time the tasks themselves used (measured in the worker
processes), and the **foreign load**, i.e. the cores busy with other people's processes during
the measurement (``/proc/stat`` busy time minus this benchmark's own CPU time, per wall second;
for Ray the Ray daemons count as foreign), plus ``/proc/loadavg``.

- verify pairs: mutual-error queries (MILP) for all pairs of a 3-member digits MLP ensemble on
  agreement points, through :func:`phalanx.verification.runner.run_queries` with a new engine
  per run (as one ``phalanx verify pairs`` invocation does); verdicts must agree across engines.
- sweep: ``phalanx.workflows.sweep.run_sweep`` of 4 small digits cells (2 methods x 2 seeds) into
  a fresh folder per run (skipped when the sweep module is not installed).
- overhead: ``--tasks`` no-op tasks; (engine wall - serial wall) / tasks, per engine.
- start-up: the local engine's first worker (forkserver boot, imports torch once), a further
  forkserver worker, and a ``spawn`` worker (what ``verify pairs`` used before the engines: a
  fresh interpreter importing torch); Ray: instance start and first task.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py [--rounds 3]
Writes benchmarks/out/scale.json and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


# -- measuring ---------------------------------------------------------------------------------

def _busy_jiffies() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    tck = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals) - idle) / tck, sum(vals) / tck


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(fn: Callable[[], tuple[Any, float]]) -> dict[str, Any]:
    """Run ``fn`` (returning (value, CPU seconds its tasks used elsewhere)); wall, CPU, foreign load."""
    busy0, _ = _busy_jiffies()
    own0, t0 = _own_cpu(), time.perf_counter()
    value, task_cpu = fn()
    wall = time.perf_counter() - t0
    own = _own_cpu() - own0
    busy1, _ = _busy_jiffies()
    foreign = max(0.0, (busy1 - busy0) - own - task_cpu) / wall
    return {"wall_s": wall, "driver_cpu_s": own, "task_cpu_s": task_cpu, "foreign_cores": foreign,
            "loadavg": open("/proc/loadavg").read().split()[:3], "value": value}


# -- workloads ---------------------------------------------------------------------------------

def verify_workload(points: int, eps: tuple[float, ...], width: int) -> tuple[Any, np.ndarray, list[Any]]:
    from phalanx import Ensemble, TrainConfig, create_method, create_model, fit
    from phalanx.data import load_dataset
    from phalanx.verification.runner import Candidates
    from phalanx.verification.scores import agreement_points, pair_specs

    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    ens = Ensemble([create_model("mlp", data.in_shape, 10, mean=data.mean, std=data.std, widths=[width])
                    for _ in range(3)], "mean-logits")
    fit(ens, create_method("baseline"), data, TrainConfig(epochs=6, batch_size=64, lr=0.05, seed=0, device="cpu"),
        progress=False)
    cands = Candidates.from_models(list(ens.eval().members))
    idx = agreement_points(cands.models, data.val.x, data.val.y, count=points)
    pts = data.val.x[idx].reshape(len(idx), -1).double().numpy()
    return cands, pts, pair_specs((0, 1, 2), len(pts), eps, data.val.y[idx].tolist())


def run_verify(engine: str, workers: int, work: tuple[Any, np.ndarray, list[Any]]) -> tuple[Any, float]:
    from phalanx.engines import create_engine
    from phalanx.verification.runner import ResultStore, run_queries

    cands, pts, specs = work
    cpu = 0.0

    def count(it: Any, total: int) -> Any:
        nonlocal cpu
        for out in it:
            cpu += out.cpu_s
            yield out

    with create_engine(engine, workers=workers) as eng:
        recs = run_queries(cands, pts, specs, backend="milp", time_limit_s=60, store=ResultStore(), engine=eng,
                           progress=count)
    return [r.result.verdict.value for r in recs], cpu


SWEEP_SPEC = """
[sweep]
name = "scale-bench"
seeds = [0, 1]
timeout_s = 600
[base.data]
dataset = "digits"
[base.model]
name = "mlp"
members = 3
[base.train]
epochs = {epochs}
batch_size = 64
optimizer = "adam"
lr = 0.003
schedule = "constant"
device = "cpu"
[method.baseline]
[method.adp]
name = "adp"
[[evaluation]]
name = "whitebox"
protocol = "whitebox"
attacks = ["fgsm"]
eps = [0.1]
limit = 100
"""


def run_sweep_once(engine: str, workers: int, epochs: int, scratch: Path) -> tuple[Any, float]:
    from phalanx.workflows.sweep import run_sweep  # type: ignore[import-not-found]

    folder = Path(tempfile.mkdtemp(dir=scratch))
    spec = folder / "spec.toml"
    spec.write_text(SWEEP_SPEC.format(epochs=epochs))
    run_sweep(spec, folder / "out", engine=engine, workers=workers, progress=False)
    man = json.loads((folder / "out" / "manifest.json").read_text())
    cells = man.get("cells", man)
    states = sorted(str(c.get("state")) for c in (cells.values() if isinstance(cells, dict) else cells))
    cpu = sum(float(c.get("cpu_s", 0.0) or 0.0) for c in (cells.values() if isinstance(cells, dict) else cells))
    if set(states) != {"done"}:
        raise RuntimeError(f"sweep on {engine} x{workers}: cells not all done ({states}); see {folder}")
    return states, cpu


def overhead(engine: str, workers: int, tasks: int) -> tuple[Any, float]:
    from phalanx.engines import Task, create_engine, probes

    with create_engine(engine, workers=workers) as eng:
        list(eng.run([Task("warm", probes.noop)]))  # workers up: measure steady-state dispatch only
        t0 = time.perf_counter()
        outs = list(eng.run([Task(str(i), probes.noop, (i,)) for i in range(tasks)]))
        wall = time.perf_counter() - t0
    assert sorted(o.value for o in outs) == list(range(tasks))
    return wall, sum(o.cpu_s for o in outs)


def startup() -> dict[str, Any]:
    from phalanx.engines import LocalEngine, Task, probes

    out: dict[str, Any] = {}
    for method in ("forkserver", "spawn"):
        with LocalEngine(workers=2, start_method=method) as eng:
            list(eng.run([Task(str(i), probes.noop) for i in range(2)]))
            out[method] = eng.startups
    return out


# -- main --------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--sweep-epochs", type=int, default=2)
    ap.add_argument("--engines", default="local,ray")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "scale.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    engines = [e for e in args.engines.split(",") if e]
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                       "torch": torch.__version__, "loadavg_start": open("/proc/loadavg").read()},
                           "args": vars(args)}
    if "ray" in engines:
        import ray

        from phalanx.engines import Task, create_engine, probes

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 object_store_memory=256 * 2**20)
        res["ray_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with create_engine("ray", workers=2) as eng:
            list(eng.run([Task("a", probes.noop), Task("b", probes.noop)]))
        res["ray_first_tasks_s"] = time.perf_counter() - t0
    res["startup"] = startup()

    work = verify_workload(args.points, (0.05, 0.1), args.width)
    res["verify_queries"] = len(work[2])
    sweep_ok = not args.skip_sweep
    if sweep_ok:
        try:
            import phalanx.workflows.sweep  # noqa: F401
        except ImportError:
            sweep_ok = False
            res["sweep"] = "phalanx.workflows.sweep not installed: skipped"
    scratch = Path(tempfile.mkdtemp(prefix="phalanx-scale-"))
    configs = [(e, w) for e in engines for w in (1, 2)]
    runs: dict[str, list[dict[str, Any]]] = {}
    rng = random.Random(0)
    for r in range(args.rounds):
        order = configs[:]
        rng.shuffle(order)
        for e, w in order:
            m = measure(lambda e=e, w=w: run_verify(e, w, work))
            runs.setdefault(f"verify/{e}/{w}", []).append(m)
            print(f"round {r} verify {e} x{w}: {m['wall_s']:.2f} s (task CPU {m['task_cpu_s']:.2f} s, foreign "
                  f"{m['foreign_cores']:.2f} cores)", flush=True)
            if sweep_ok:
                m = measure(lambda e=e, w=w: run_sweep_once(e, w, args.sweep_epochs, scratch))
                runs.setdefault(f"sweep/{e}/{w}", []).append(m)
                print(f"round {r} sweep {e} x{w}: {m['wall_s']:.2f} s", flush=True)
        for e in ["serial", *engines]:
            m = measure(lambda e=e: overhead(e, 1, args.tasks))
            runs.setdefault(f"overhead/{e}", []).append(m)
    verdicts = {k: v[0]["value"] for k, v in runs.items() if k.startswith("verify/")}
    assert len({json.dumps(v) for v in verdicts.values()}) == 1, "engines disagree on verdicts"
    summary: dict[str, Any] = {}
    for k, ms in runs.items():
        summary[k] = {"median_wall_s": statistics.median(m["wall_s"] for m in ms),
                      "median_task_cpu_s": statistics.median(m["task_cpu_s"] for m in ms),
                      "median_foreign_cores": statistics.median(m["foreign_cores"] for m in ms)}
    for kind in ("verify", "sweep"):
        for e in engines:
            one, two = summary.get(f"{kind}/{e}/1"), summary.get(f"{kind}/{e}/2")
            if one and two:
                summary[f"{kind}/{e}/speedup"] = one["median_wall_s"] / two["median_wall_s"]
    serial = statistics.median(m["value"] for m in runs["overhead/serial"])
    for e in engines:
        summary[f"overhead/{e}/per_task_ms"] = 1000 * (statistics.median(m["value"] for m in runs[f"overhead/{e}"])
                                                       - serial) / args.tasks
    res["runs"] = {k: [{kk: vv for kk, vv in m.items() if kk != "value"} for m in ms] for k, ms in runs.items()}
    res["summary"] = summary
    res["machine"]["loadavg_end"] = open("/proc/loadavg").read()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(summary, indent=2))
    if "ray" in engines:
        import ray

        ray.shutdown()


if __name__ == "__main__":
    main()
