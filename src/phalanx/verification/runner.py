"""Running many queries: candidates, query specs, an engine's workers and a resumable store.

Queries refer to members by index into one :class:`Candidates` pool (models, their IR and a
fingerprint each), so worker processes receive the pool once (the engine's
:class:`~phalanx.engines.Setup`). Results are appended to a JSON
lines store as they finish (one line per query, keyed by a stable query id built from member
fingerprints, the point, eps, label and property), so a killed run resumes without redoing
finished queries.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from phalanx.engines import Engine, Outcome, Setup, Status, Task, create_engine
from phalanx.errors import PhalanxError
from phalanx.verification.ir import NetworkIR, to_ir
from phalanx.verification.query import (
    Query,
    QueryKind,
    Verdict,
    VerificationResult,
    make_query,
    model_fingerprint,
    point_fingerprint,
    query_id,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Candidates:
    """A pool of candidate members with their IR and stable fingerprints."""

    models: tuple[nn.Module, ...]
    nets: tuple[NetworkIR, ...]
    fingerprints: tuple[str, ...]

    @classmethod
    def from_models(cls, models: Sequence[nn.Module]) -> Candidates:
        ms = tuple(m.eval() for m in models)
        if not ms:
            raise PhalanxError("need at least one candidate member")
        return cls(ms, tuple(to_ir(m) for m in ms), tuple(model_fingerprint(m) for m in ms))

    def __len__(self) -> int:
        return len(self.models)


@dataclass(frozen=True)
class QuerySpec:
    """A query by member indices and a point (flat input values and label)."""

    members: tuple[int, ...]
    point: int  # index into the run's point list (for reports)
    eps: float
    label: int
    kind: str = QueryKind.MUTUAL_ERROR.value
    quorum: int | None = None
    runner_up: bool = False

    def qid(self, cands: Candidates, x: np.ndarray) -> str:
        return query_id([[cands.fingerprints[i] for i in self.members], point_fingerprint(x), repr(float(self.eps)),
                         self.label, self.kind, self.quorum, self.runner_up])

    def build(self, cands: Candidates, x: np.ndarray) -> Query:
        bad = [i for i in self.members if not 0 <= i < len(cands)]
        if bad:
            raise PhalanxError(f"member indices {bad} out of range; accepted: 0..{len(cands) - 1}")
        return make_query([cands.models[i] for i in self.members], x, self.eps, self.label, kind=self.kind,
                          quorum=self.quorum, runner_up=self.runner_up,
                          nets=[cands.nets[i] for i in self.members], qid=self.qid(cands, x))


@dataclass
class Record:
    """One finished query: its id, spec and result."""

    qid: str
    spec: QuerySpec
    result: VerificationResult

    def to_json(self) -> dict[str, Any]:
        return {"qid": self.qid, "spec": asdict(self.spec), "result": self.result.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Record:
        s = dict(d["spec"])
        s["members"] = tuple(s["members"])
        return cls(d["qid"], QuerySpec(**s), VerificationResult.from_json(d["result"]))


@dataclass
class ResultStore:
    """Append-only JSON lines; ``path=None`` keeps results in memory only.

    ``retry_undecided``: stored TIMEOUT/ERROR/UNKNOWN answers read from ``path`` are not reused,
    so every run using the store solves them again (``--retry-undecided``); the new answers are
    appended and, being later lines, win when the file is read again."""

    path: Path | None = None
    records: dict[str, Record] = field(default_factory=dict)
    retry_undecided: bool = False

    def __post_init__(self) -> None:
        if self.path is not None:
            self.path = Path(self.path)
            if self.path.is_file():
                text = self.path.read_text()
                if text and not text.endswith("\n"):  # a write cut off by a kill: close the line
                    with open(self.path, "a") as f:
                        f.write("\n")
                for n, line in enumerate(text.splitlines()):
                    if not line.strip():
                        continue
                    try:
                        rec = Record.from_json(json.loads(line))
                    except (ValueError, KeyError, TypeError):
                        log.warning("skipping unreadable line %d of %s (a killed write?)", n + 1, self.path)
                        continue
                    self.records[rec.qid] = rec
            if self.retry_undecided:
                undecided = [q for q, r in self.records.items() if not r.result.verdict.decided]
                for q in undecided:
                    del self.records[q]
                log.info("%s: %d stored undecided answers will be solved again", self.path, len(undecided))

    def __contains__(self, qid: object) -> bool:
        return qid in self.records

    def get(self, qid: str) -> Record | None:
        return self.records.get(qid)

    def add(self, rec: Record) -> None:
        self.records[rec.qid] = rec
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(rec.to_json()) + "\n")
                f.flush()
                os.fsync(f.fileno())


# -- workers ----------------------------------------------------------------------------------

_W: dict[str, Any] = {}

#: hard kill after this many times the per-query time limit (plus a fixed grace): the verifier
#: honours the limit itself; the kill is the backstop for a solver stuck in native code
HARD_TIMEOUT_FACTOR, HARD_TIMEOUT_GRACE_S = 2.0, 30.0


def _init_worker(cands: Candidates, points: np.ndarray, backend: str, options: dict[str, Any], time_limit: float) -> None:
    """The engine's per-process setup: the candidate pool, the points and one verifier."""
    from phalanx.verification import create_verifier

    _W.update(cands=cands, points=points, verifier=create_verifier(backend, **options), limit=time_limit)


def _solve(spec: QuerySpec) -> dict[str, Any]:
    """One query, run by an engine in a worker process."""
    cands, points = _W["cands"], _W["points"]
    x = points[spec.point]
    q = spec.build(cands, x)
    res = _W["verifier"].verify_guarded(q, time_limit_s=_W["limit"])
    return Record(q.qid, spec, res).to_json()


def _record(out: Outcome, spec: QuerySpec, qid: str, backend: str) -> Record:
    """The record of one finished task: the verifier's own, or TIMEOUT / ERROR when the task was
    killed, crashed or raised (never a lost query, never a decided verdict)."""
    if out.ok:
        return Record.from_json(out.value)
    if out.status is Status.FAILED and (out.error or "").startswith("PhalanxError: "):
        raise PhalanxError(out.error.removeprefix("PhalanxError: "))  # type: ignore[union-attr]
    verdict = Verdict.TIMEOUT if out.status is Status.TIMEOUT else Verdict.ERROR
    return Record(qid, spec, VerificationResult(verdict, backend, out.wall_s, message=f"{out.status.value}: {out.error}",
                                                details={"engine_status": out.status.value}))


def _setup_token(cands: Candidates, pts: np.ndarray, backend: str, opts: dict[str, Any], limit: float) -> str:
    """Equal setups get equal tokens, so an engine's warm workers skip a setup they already ran."""
    import hashlib

    h = hashlib.sha256(repr((cands.fingerprints, backend, sorted(opts.items()), limit)).encode())
    h.update(np.ascontiguousarray(pts).tobytes())
    return h.hexdigest()


def query_engine(name: str, workers: int = 1, **options: Any) -> Engine:
    """An engine for verification queries: ``create_engine`` with, for the local engine, a
    forkserver that preloads only what queries need (a shorter start-up)."""
    if name == "local":
        from phalanx.engines.local import VERIFY_PRELOAD

        options.setdefault("preload", VERIFY_PRELOAD)
    return create_engine(name, workers=workers, **options)


def run_queries(cands: Candidates, points: np.ndarray, specs: Sequence[QuerySpec], *, backend: str = "portfolio",
                options: dict[str, Any] | None = None, time_limit_s: float = 60.0, workers: int = 1,
                store: ResultStore | None = None, progress: Callable[[Iterator[Any], int], Iterator[Any]] | None = None,
                retry_undecided: bool = False, engine: Engine | str = "local",
                engine_options: dict[str, Any] | None = None, hard_timeout_s: float | None = None) -> list[Record]:
    """Solve ``specs`` (skipping those already in ``store``) as tasks of an engine.

    ``engine`` is an open :class:`~phalanx.engines.Engine` (left open) or a registry name
    (``local``, ``ray``, ``serial``) created with ``workers`` and ``engine_options`` and closed
    at the end. Each query is one task with a hard timeout (``hard_timeout_s``, default
    ``2 x time_limit_s + 30`` s); a task that is killed, crashes or raises is stored as a TIMEOUT
    or ERROR verdict. Records are appended to the store by this (driver) process as they finish,
    so a killed run resumes where it stopped. ``points`` is (P, in_dim) float64; ``spec.point``
    indexes it. Returns one record per spec, in order. With ``retry_undecided`` stored
    TIMEOUT/ERROR results are solved again.
    """
    from phalanx.verification import create_verifier

    store = store if store is not None else ResultStore()
    pts = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    for s in specs:
        bad = [i for i in s.members if not 0 <= i < len(cands)]
        if bad:
            raise PhalanxError(f"member indices {bad} out of range; accepted: 0..{len(cands) - 1}")
        if not 0 <= s.point < len(pts):
            raise PhalanxError(f"point index {s.point} out of range; accepted: 0..{len(pts) - 1}")
    ids = [s.qid(cands, pts[s.point]) for s in specs]
    todo: dict[str, QuerySpec] = {}
    for s, q in zip(specs, ids, strict=True):
        rec = store.get(q)
        if q in todo or (rec is not None and (rec.result.verdict.decided or not retry_undecided)):
            continue
        todo[q] = s
    log.info("%d queries, %d already in the store, %d to solve", len(specs), len(specs) - len(todo), len(todo))
    opts = dict(options or {})
    if todo:
        create_verifier(backend, **opts)  # a bad backend or option fails here, before any work is farmed out
        limit = hard_timeout_s if hard_timeout_s is not None else HARD_TIMEOUT_FACTOR * time_limit_s + HARD_TIMEOUT_GRACE_S
        setup = Setup(_init_worker, (cands, pts, backend, opts, time_limit_s),
                      token=_setup_token(cands, pts, backend, opts, time_limit_s))
        tasks = [Task(q, _solve, (s,), timeout_s=limit) for q, s in todo.items()]
        eng = query_engine(engine, workers, **(engine_options or {})) if isinstance(engine, str) else engine
        try:
            it: Iterator[Outcome] = eng.run(tasks, setup=setup)
            it = progress(it, len(tasks)) if progress else it
            for out in it:
                store.add(_record(out, todo[out.key], out.key, backend))
        finally:
            if isinstance(engine, str):
                eng.close()
    out_recs = []
    for s, q in zip(specs, ids, strict=True):
        rec = store.get(q)
        assert rec is not None
        # the stored spec may come from another run (another point index for the same point)
        out_recs.append(Record(q, s, rec.result))
    return out_recs
