"""Running many queries: candidates, query specs, parallel workers and a resumable store.

Queries refer to members by index into one :class:`Candidates` pool (models, their IR and a
fingerprint each), so worker processes receive the pool once. Results are appended to a JSON
lines store as they finish (one line per query, keyed by a stable query id built from member
fingerprints, the point, eps, label and property), so a killed run resumes without redoing
finished queries.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

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


def _init_worker(cands: Candidates, points: np.ndarray, backend: str, options: dict[str, Any], time_limit: float) -> None:
    import torch

    torch.set_num_threads(1)
    from phalanx.verification import create_verifier

    _W.update(cands=cands, points=points, verifier=create_verifier(backend, **options), limit=time_limit)


def _solve(spec: QuerySpec) -> dict[str, Any]:
    cands, points = _W["cands"], _W["points"]
    x = points[spec.point]
    q = spec.build(cands, x)
    try:
        res = _W["verifier"].verify(q, time_limit_s=_W["limit"])
    except PhalanxError:
        raise
    except Exception as exc:  # a backend crash is an ERROR verdict, never a wrong answer
        res = VerificationResult(Verdict.ERROR, str(_W["verifier"].name), 0.0, message=f"{type(exc).__name__}: {exc}")
    return Record(q.qid, spec, res).to_json()


def run_queries(cands: Candidates, points: np.ndarray, specs: Sequence[QuerySpec], *, backend: str = "portfolio",
                options: dict[str, Any] | None = None, time_limit_s: float = 60.0, workers: int = 1,
                store: ResultStore | None = None, progress: Callable[[Iterator[Any], int], Iterator[Any]] | None = None,
                retry_undecided: bool = False) -> list[Record]:
    """Solve ``specs`` (skipping those already in ``store``), in ``workers`` processes.

    ``points`` is (P, in_dim) float64; ``spec.point`` indexes it. Returns one record per spec, in
    order. With ``retry_undecided`` stored TIMEOUT/ERROR results are solved again.
    """
    store = store if store is not None else ResultStore()
    pts = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    ids = [s.qid(cands, pts[s.point]) for s in specs]
    todo, seen = [], set()
    for s, q in zip(specs, ids, strict=True):
        rec = store.get(q)
        if q in seen or (rec is not None and (rec.result.verdict.decided or not retry_undecided)):
            continue
        seen.add(q)
        todo.append(s)
    log.info("%d queries, %d already in the store, %d to solve", len(specs), len(specs) - len(todo), len(todo))
    opts = dict(options or {})
    if todo:
        if workers <= 1:
            _init_worker(cands, pts, backend, opts, time_limit_s)
            it: Iterator[dict[str, Any]] = (_solve(s) for s in todo)
            it = progress(it, len(todo)) if progress else it
            for d in it:
                store.add(Record.from_json(d))
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(cands, pts, backend, opts, time_limit_s)) as pool:
                it = pool.imap_unordered(_solve, todo)
                it = progress(it, len(todo)) if progress else it
                for d in it:
                    store.add(Record.from_json(d))
    out = []
    for s, q in zip(specs, ids, strict=True):
        rec = store.get(q)
        assert rec is not None
        # the stored spec may come from another run (another point index for the same point)
        out.append(Record(q, s, rec.result))
    return out
