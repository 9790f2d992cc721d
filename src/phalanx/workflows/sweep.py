"""Sweeps: train and evaluate every cell of a :class:`~phalanx.workflows.sweep_spec.SweepSpec`
through an engine (``phalanx.engines``), with a manifest that makes the sweep resumable.

Sweep folder layout::

    spec.json            the spec last run in this folder (a folder can grow: more seeds, methods)
    manifest.json        every cell: state (pending, running, done, failed, skipped), attempts,
                         start/end times, wall time, the error line of a failed cell
    results.json         aggregated results of all finished cells (what ``phalanx table`` reads)
    cells/KEY/           a ``phalanx train`` run folder per cell (config, checkpoints, metrics)
                         plus its results.json; ``evals/epoch-N.json`` intermediate evaluations

Tasks write only inside their own cell folder (checkpoints, intermediate evaluations); the
driver alone writes the manifest, the aggregated results and each cell's results.json. The
manifest is replaced atomically after every finished cell, so killing the driver at any moment
loses no finished cell; a cell that was running resumes from its last checkpoint. The folder is
owned through :func:`phalanx.runs.open_run` (an flock the kernel drops when the driver dies), so a
second driver on the same folder refuses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from phalanx.engines import Engine, Outcome, Task, create_engine
from phalanx.errors import PhalanxError
from phalanx.runs import RunFolder, write_json, write_results
from phalanx.workflows.sweep_spec import Cell, EvalEntry, SweepSpec, load_sweep_spec

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
STATES = ("pending", "running", "done", "failed", "skipped")


# ---------------------------------------------------------------- one cell (runs in a worker)

def evaluate_entry(ensemble: Any, data: Any, entry: EvalEntry, *, seed: int) -> dict[str, Any]:
    """One ``[[evaluation]]`` of a trained ensemble: clean accuracy plus the protocol's result."""
    from phalanx.evaluation import evaluate_clean, transferability_matrix, whitebox_evaluation

    ensemble.eval()
    split = (data.test if entry.split == "test" else data.val).subset(entry.limit)
    gen = torch.Generator().manual_seed(seed)
    attacks = entry.build_attacks()
    out: dict[str, Any] = {"name": entry.name, "protocol": entry.protocol, "n": len(split),
                           "clean": evaluate_clean(ensemble, split, entry.batch_size)}
    if entry.protocol == "whitebox":
        out["whitebox"] = whitebox_evaluation(ensemble, split, entry.eps, attacks, members=entry.members,
                                              sanity=entry.sanity, batch_size=entry.batch_size, generator=gen)
    else:
        first = next(iter(attacks.values()))
        out["transferability"] = [
            transferability_matrix(ensemble, split, eps, attack=first, restarts=entry.restarts or 1, limit=None,
                                   batch_size=entry.batch_size, generator=gen)
            for eps in entry.eps if eps > 0]
    return out


def _evaluate_all(ensemble: Any, data: Any, evals: list[EvalEntry], seed: int, final: bool) -> dict[str, Any]:
    return {e.name: evaluate_entry(ensemble, data, e, seed=seed) for e in evals if final or not e.final_only}


def run_cell(cell: dict[str, Any], cell_dir: str, evaluations: list[dict[str, Any]],
             init_path: str | None = None) -> dict[str, Any]:
    """Train one cell into ``cell_dir`` (resuming from its checkpoint when there is one) and run
    the evaluations at each of ``cell['eval_epochs']``. Module-level so that engines can ship it
    to another process. Returns the JSON-ready cell result (the driver writes it)."""
    from phalanx.config import build_config
    from phalanx.ensembles import load_ensemble
    from phalanx.workflows.experiment import load_data, train_run

    t0 = time.perf_counter()
    run_dir = Path(cell_dir)
    cfg = build_config(cell["config"])
    evals = [EvalEntry.from_dict(e) for e in evaluations]
    data = load_data(cfg.data)
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    init = None
    if init_path is not None and not resume:
        init = load_ensemble(init_path)
    eval_epochs = [int(e) for e in cell["eval_epochs"]]
    final_epoch = cfg.train.epochs
    intermediate = {e for e in eval_epochs if e < final_epoch}
    evals_dir = run_dir / "evals"
    seed = int(cell["seed"])

    def callback(kind: str, payload: dict[str, Any]) -> None:
        if kind != "epoch" or payload["epoch"] not in intermediate:
            return
        res = _evaluate_all(ensemble_ref[0], data, evals, seed, final=False)
        write_json(evals_dir / f"epoch-{payload['epoch']}.json", res)

    if resume:
        _recover_lost_evaluation(run_dir, intermediate, lambda ens: _evaluate_all(ens, data, evals, seed, final=False))
    # the callback needs the ensemble that train_run builds: build it here and pass it in
    from phalanx.ensembles.build import build_ensemble

    ensemble = init if init is not None else build_ensemble(cfg.model, data, seed=cfg.train.seed)
    ensemble_ref = [ensemble]
    ens, fit_result, _ = train_run(cfg, run_dir, resume=resume, progress=False, init=ensemble, data=data,
                                   callback=callback)
    by_epoch: dict[str, Any] = {}
    for e in sorted(intermediate):
        f = evals_dir / f"epoch-{e}.json"
        if f.is_file():
            by_epoch[str(e)] = json.loads(f.read_text())
        else:  # killed between the epoch's checkpoint and its evaluation
            log.warning("cell %s: evaluation at epoch %d was lost to an interruption", cell["key"], e)
    by_epoch[str(final_epoch)] = _evaluate_all(ens, data, evals, seed, final=True)
    return {"history": fit_result.history, "evaluations": by_epoch, "final_epoch": final_epoch,
            "resumed_from_epoch": fit_result.resumed_from_epoch, "wall_s": round(time.perf_counter() - t0, 3)}


def _recover_lost_evaluation(run_dir: Path, intermediate: set[int], evaluate: Callable[[Any], Any]) -> None:
    """A driver killed after an epoch's training checkpoint but before that epoch's evaluation
    (``fit`` writes ``checkpoints/last.pt``, then ``ensemble.pt``, then calls back) resumes
    *after* that epoch, so its callback never comes again. ``last.pt`` holds exactly that
    epoch's weights (``ensemble.pt`` may still hold the epoch before), so evaluate them now."""
    from phalanx.ensembles import ensemble_from_state, safe_load

    ckpt = run_dir / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        return
    state = safe_load(ckpt, "training checkpoint")
    epoch = state.get("epoch") if isinstance(state, dict) else None
    target = run_dir / "evals" / f"epoch-{epoch}.json"
    if epoch in intermediate and not target.is_file():
        log.info("evaluating %s at epoch %s (interrupted before its evaluation)", run_dir, epoch)
        write_json(target, evaluate(ensemble_from_state(state["ensemble"], str(ckpt)).eval()))


# ---------------------------------------------------------------- the sweep folder

def own_sweep_folder(folder: Path) -> RunFolder:
    """Take the folder's run lock (:func:`phalanx.runs.open_run`, command ``sweep``): a second
    driver on the same folder refuses; a sweep folder may be continued; a folder holding another
    command's run is refused. A sweep folder written before run records existed is adopted."""
    from phalanx.runs import Reuse, open_run, run_info

    info = run_info(folder)
    legacy = info is not None and info.get("command") is None and (folder / "manifest.json").is_file()
    # adopting a legacy sweep folder: OVERWRITE only drops top-level record files (the aggregated
    # results.json, which the driver rewrites at once); cells, manifest and spec stay
    return open_run(folder, "sweep", reuse=Reuse.OVERWRITE if legacy else Reuse.CONTINUE)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise PhalanxError(f"{folder} is not a sweep folder (no manifest.json)")
    try:
        return dict(json.loads(path.read_text()))
    except ValueError as exc:
        raise PhalanxError(f"{path} is not valid JSON: {exc}") from None


@dataclass
class SweepResult:
    folder: Path
    counts: dict[str, int]
    ran: list[str]  # cells executed in this call

    @property
    def ok(self) -> bool:
        return self.counts.get("failed", 0) == 0 and self.counts.get("skipped", 0) == 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"


def _counts(manifest: dict[str, Any]) -> dict[str, int]:
    out = dict.fromkeys(STATES, 0)
    for c in manifest["cells"].values():
        out[c["state"]] += 1
    return out


def sweep_status(folder: str | Path) -> dict[str, Any]:
    """Counts per state and an ETA (mean wall time of finished cells of the same method, else of
    all finished cells, times the cells left, divided by the workers of the last run)."""
    man = read_manifest(folder)
    counts = _counts(man)
    walls: dict[str, list[float]] = {}
    for c in man["cells"].values():
        if c["state"] == "done" and c.get("wall_s") is not None:
            walls.setdefault(c["method"], []).append(float(c["wall_s"]))
    every = [w for ws in walls.values() for w in ws]
    left = 0.0
    unknown = 0
    for c in man["cells"].values():
        if c["state"] in ("pending", "running"):
            ws = walls.get(c["method"]) or every
            if ws:
                left += sum(ws) / len(ws)
            else:
                unknown += 1
    workers = max(1, int(man.get("workers", 1)))
    return {"folder": str(folder), "counts": counts, "total": len(man["cells"]),
            "eta_s": left / workers if every and not unknown else None,
            "failed": {k: c.get("error") for k, c in man["cells"].items() if c["state"] == "failed"},
            "skipped": {k: c.get("error") for k, c in man["cells"].items() if c["state"] == "skipped"},
            "running": [k for k, c in man["cells"].items() if c["state"] == "running"]}


def cell_digest(cell: Cell, spec: SweepSpec) -> str:
    """Hash of everything that defines a cell's result: its config, dependency, evaluation
    epochs and the evaluations. A folder can grow (more seeds, methods, axes); a changed cell
    is refused."""
    payload = {**cell.to_dict(), "evaluations": [e.to_dict() for e in spec.evaluations]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _entry(cell: Cell, spec: SweepSpec) -> dict[str, Any]:
    return {"state": "pending", "method": cell.method, "seed": cell.seed, "axes": cell.axes,
            "depends_on": cell.depends_on, "digest": cell_digest(cell, spec), "attempts": 0, "started": None,
            "finished": None, "wall_s": None, "error": None}


def _load_or_create(folder: Path, spec: SweepSpec, cells: list[Cell]) -> dict[str, Any]:
    """The folder's manifest, extended by the spec's new cells; a cell whose definition differs
    from the one recorded (config, evaluations) is an error: its results would be mixed."""
    path = folder / "manifest.json"
    if path.is_file():
        man = read_manifest(folder)
    else:
        man = {"schema_version": MANIFEST_VERSION, "sweep": spec.name, "created": _now(), "cells": {}}
    for c in cells:
        entry = man["cells"].get(c.key)
        if entry is None:
            man["cells"][c.key] = _entry(c, spec)
        elif entry.setdefault("digest", cell_digest(c, spec)) != cell_digest(c, spec):
            raise PhalanxError(f"cell {c.key} in {folder} was run with a different config or evaluations "
                               f"than the spec now gives; use another --out folder")
    man["sweep"] = spec.name
    write_json(folder / "spec.json", {"name": spec.name, "spec": spec.source})
    write_json(path, man)
    return man


def run_sweep(spec: SweepSpec | str | Path, folder: str | Path, *, engine: str | Engine = "serial",
              workers: int = 1, retry_failed: bool = False, rerun: Sequence[str] = (), progress: bool = True,
              engine_options: dict[str, Any] | None = None,
              on_outcome: Callable[[str, Outcome], None] | None = None) -> SweepResult:
    """Run (or resume) every cell of ``spec`` in ``folder``. Finished cells are never recomputed;
    cells that were running when a previous driver died resume from their last checkpoint;
    failed cells (and the cells that depend on them) are retried only with ``retry_failed``.
    ``rerun`` names cells to recompute from scratch (their folders are deleted), together with
    the cells that start from them."""
    if not isinstance(spec, SweepSpec):
        spec = load_sweep_spec(spec)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cells = spec.cells()
    by_key = {c.key: c for c in cells}
    order = {c.key: i for i, c in enumerate(cells)}
    with own_sweep_folder(out):
        man = _load_or_create(out, spec, cells)
        man["workers"] = workers
        for key in _with_dependents(rerun, cells):
            shutil.rmtree(out / "cells" / key, ignore_errors=True)
            man["cells"][key].update(state="pending", error=None)
        for key, entry in man["cells"].items():
            if key not in by_key:
                continue
            if entry["state"] in ("running", "pending") and _finished_on_disk(out, key, entry["digest"]):
                entry.update(state="done", error=None)  # the driver died after writing the cell
            elif entry["state"] == "running":
                entry["state"] = "pending"
            elif entry["state"] == "failed" and retry_failed:
                entry.update(state="pending", error=None)
            elif entry["state"] == "skipped":
                entry.update(state="pending", error=None)
        write_json(out / "manifest.json", man)
        _write_aggregate(out, spec, man)
        eng = create_engine(engine, workers=workers, **(engine_options or {})) if isinstance(engine, str) else engine
        ran: list[str] = []
        lock = threading.Lock()
        bar = _bar(len(cells), _counts(man)["done"], progress, spec.name)
        try:
            while True:
                _skip_blocked(man, by_key)
                ready = [c for c in cells if man["cells"][c.key]["state"] == "pending"
                         and (c.depends_on is None or man["cells"][c.depends_on]["state"] == "done")]
                if not ready:
                    break
                # seed-major order; one engine worker: one cell per round, so that the cells that
                # depend on it become ready at once (a complete seed early, not a layer of methods)
                ready.sort(key=lambda c: (c.seed, order[c.key]))
                if eng.workers == 1:
                    ready = ready[:1]
                for outcome in eng.run(_tasks(ready, out, spec, man, lock, bar)):
                    with lock:
                        _record(out, by_key[outcome.key], outcome, man)
                        write_json(out / "manifest.json", man)
                        _write_aggregate(out, spec, man)
                    ran.append(outcome.key)
                    if outcome.ok:
                        bar.update(1)
                    _postfix(bar, man)
                    if on_outcome is not None:
                        on_outcome(outcome.key, outcome)
            write_json(out / "manifest.json", man)
            _write_aggregate(out, spec, man)
        finally:
            bar.close()
            if isinstance(engine, str):
                eng.close()
    return SweepResult(out, _counts(man), ran)


def _with_dependents(keys: Sequence[str], cells: list[Cell]) -> list[str]:
    known = {c.key for c in cells}
    for k in keys:
        if k not in known:
            raise PhalanxError(f"--rerun names {k!r}, which is not a cell of this sweep; cells: "
                               f"{', '.join(sorted(known))}")
    chosen = set(keys)
    for c in cells:  # dependency order: an init cell comes before the cells that start from it
        if c.depends_on in chosen:
            chosen.add(c.key)
    return [c.key for c in cells if c.key in chosen]


def _finished_on_disk(out: Path, key: str, digest: str) -> bool:
    f = out / "cells" / key / "results.json"
    if not f.is_file():
        return False
    try:
        res = json.loads(f.read_text())
    except ValueError:
        return False
    return bool(res.get("cell") == key and res.get("cell_digest", digest) == digest)


def _skip_blocked(man: dict[str, Any], by_key: dict[str, Cell]) -> None:
    changed = True
    while changed:
        changed = False
        for key, entry in man["cells"].items():
            cell = by_key.get(key)
            if entry["state"] != "pending" or cell is None or cell.depends_on is None:
                continue
            dep = man["cells"][cell.depends_on]
            if dep["state"] in ("failed", "skipped"):
                entry.update(state="skipped", error=f"depends on {cell.depends_on}, which {dep['state']}")
                changed = True


def _tasks(ready: list[Cell], out: Path, spec: SweepSpec, man: dict[str, Any], lock: threading.Lock,
           bar: Any) -> Iterator[Task]:
    evals = [e.to_dict() for e in spec.evaluations]
    gpus = spec.gpus_per_cell if spec.gpus_per_cell is not None else int(torch.cuda.is_available())
    for c in ready:
        init = str(out / "cells" / c.depends_on / "ensemble.pt") if c.depends_on is not None else None
        with lock:
            entry = man["cells"][c.key]
            entry.update(state="running", started=_now(), attempts=int(entry.get("attempts", 0)) + 1)
            write_json(out / "manifest.json", man)
        _postfix(bar, man)
        yield Task(c.key, run_cell, (c.to_dict(), str(out / "cells" / c.key), evals, init),
                   timeout_s=spec.timeout_s, gpus=gpus)


def _record(out: Path, cell: Cell, outcome: Outcome, man: dict[str, Any]) -> None:
    entry = man["cells"][cell.key]
    entry.update(finished=_now(), wall_s=round(outcome.wall_s, 3), cpu_s=round(outcome.cpu_s, 3))
    cell_dir = out / "cells" / cell.key
    if outcome.ok:
        value = outcome.value
        write_results(cell_dir, "sweep-cell", {"cell": cell.key, "cell_digest": entry["digest"], **cell.to_dict(),
                                               **value})
        entry.update(state="done", error=None, resumed_from_epoch=value.get("resumed_from_epoch"))
    else:
        entry.update(state="failed", error=f"{outcome.status.value}: {outcome.error}")
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / "error.txt").write_text((outcome.error or "") + "\n\n" + (outcome.detail or ""))
        log.warning("cell %s failed: %s", cell.key, entry["error"])


def _write_aggregate(out: Path, spec: SweepSpec, man: dict[str, Any]) -> None:
    cells: dict[str, Any] = {}
    for key, entry in man["cells"].items():
        item = {k: entry[k] for k in ("state", "method", "seed", "axes", "error")}
        f = out / "cells" / key / "results.json"
        if entry["state"] == "done" and f.is_file():
            res = json.loads(f.read_text())
            item["final_epoch"] = res.get("final_epoch")
            item["evaluations"] = res.get("evaluations", {})
        cells[key] = item
    write_results(out, "sweep", {"sweep": spec.name, "methods": [m.label for m in spec.methods],
                                 "evaluations": [e.to_dict() for e in spec.evaluations], "cells": cells})


def _bar(total: int, initial: int, enabled: bool, name: str) -> Any:
    if not enabled:
        from phalanx.training.loop import _NoBar

        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"sweep {name}", unit="cell")


def _postfix(bar: Any, man: dict[str, Any]) -> None:
    c = _counts(man)
    bar.set_postfix(done=c["done"], running=c["running"], failed=c["failed"], skipped=c["skipped"])
