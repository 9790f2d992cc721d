"""Verification-aided member selection (Amir et al. 2022, section III-C), its validation by
verified robust accuracy of the whole ensemble (appendix A, section IV), and the comparison of
the joint gradient attacks G.A. 1/2/3 against verification (section V, table III).

Selection: start from ``k`` of the ``n`` candidates; compute the uniqueness scores (Def. 4) of
the current ensemble on the agreement points; take the least unique member ``N_l``; for every
fresh candidate ``N_f`` compute ``US_{E - N_l + N_f}(N_f)``; replace ``N_l`` by the best one if
its score is *strictly* higher than ``US_E(N_l)``; repeat until no candidate improves, the
iteration cap, or the time budget. Scores are averaged over the eps list. Every pairwise query is
solved once and kept in the store, so later steps reuse earlier results.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from phalanx.engines import Engine
from phalanx.errors import PhalanxError
from phalanx.verification.query import QueryKind, Verdict
from phalanx.verification.runner import Candidates, QuerySpec, Record, ResultStore, query_engine, run_queries
from phalanx.verification.scores import ScoreTable

log = logging.getLogger(__name__)

Progress = Callable[[Iterator[Any], int], Iterator[Any]]


@dataclass
class SelectionConfig:
    k: int = 5
    eps: tuple[float, ...] = (0.01, 0.02, 0.03)
    backend: str = "portfolio"
    backend_options: dict[str, Any] = field(default_factory=dict)
    time_limit_s: float = 60.0
    workers: int = 1
    engine: str = "local"  # where queries run (see phalanx.engines); engine_options e.g. {"address": "auto"}
    engine_options: dict[str, Any] = field(default_factory=dict)
    max_iters: int = 10
    time_budget_s: float | None = None
    initial: tuple[int, ...] | None = None
    retry_undecided: bool = False  # on resume, solve stored TIMEOUT/ERROR queries again

    def __post_init__(self) -> None:
        if self.k < 2:
            raise PhalanxError(f"k must be >= 2 members, got {self.k}")
        if self.max_iters < 0:
            raise PhalanxError(f"max_iters must be >= 0, got {self.max_iters}")
        if not self.eps:
            raise PhalanxError("need at least one eps")


@dataclass
class SelectionStep:
    iteration: int
    ensemble: tuple[int, ...]
    uniqueness: dict[int, float]
    weakest: int
    candidate_scores: dict[int, float]
    replaced: tuple[int, int] | None
    queries: int
    wall_time_s: float

    def to_json(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "ensemble": list(self.ensemble),
                "uniqueness": {str(k): v for k, v in self.uniqueness.items()}, "weakest": self.weakest,
                "candidate_scores": {str(k): v for k, v in self.candidate_scores.items()},
                "replaced": list(self.replaced) if self.replaced else None, "queries": self.queries,
                "wall_time_s": self.wall_time_s}


@dataclass
class SelectionResult:
    initial: tuple[int, ...]
    final: tuple[int, ...]
    steps: list[SelectionStep]
    stop_reason: str
    initial_table: ScoreTable
    final_table: ScoreTable

    def to_json(self) -> dict[str, Any]:
        return {"initial": list(self.initial), "final": list(self.final), "stop_reason": self.stop_reason,
                "steps": [s.to_json() for s in self.steps], "initial_scores": self.initial_table.to_json(),
                "final_scores": self.final_table.to_json()}

    def markdown(self) -> str:
        from phalanx.reports import table

        rows = [[s.iteration, " ".join(f"N{i}" for i in s.ensemble), f"N{s.weakest}",
                 f"{100 * s.uniqueness[s.weakest]:.2f}",
                 ", ".join(f"N{c}: {100 * v:.2f}" for c, v in sorted(s.candidate_scores.items())),
                 f"N{s.replaced[0]} -> N{s.replaced[1]}" if s.replaced else "-", s.queries, f"{s.wall_time_s:.1f}"]
                for s in self.steps]
        hist = table(["iter", "ensemble", "least unique", "its US %", "fresh candidates' US %", "swap",
                      "new queries", "time s"], rows)
        return f"Selection history (stop: {self.stop_reason}):\n\n{hist}\n"


def _pairs(members: Sequence[int]) -> list[tuple[int, int]]:
    return [(a, b) for a, b in itertools.combinations(sorted(members), 2)]


def select_members(cands: Candidates, points: np.ndarray, labels: Sequence[int], cfg: SelectionConfig, *,
                   store: ResultStore | None = None, progress: Progress | None = None,
                   engine: Engine | None = None) -> SelectionResult:
    """Run the iterative scheme of section III-C on agreement ``points`` (P, in_dim). Queries run
    on ``engine`` (left open) or on one created from ``cfg.engine`` for the whole selection."""
    if engine is None:
        with query_engine(cfg.engine, cfg.workers, **cfg.engine_options) as eng:
            return select_members(cands, points, labels, cfg, store=store, progress=progress, engine=eng)
    n = len(cands)
    if cfg.k >= n:
        raise PhalanxError(f"selection needs more candidates than members: k={cfg.k}, candidates={n}")
    ens = tuple(cfg.initial) if cfg.initial is not None else tuple(range(cfg.k))
    if len(ens) != cfg.k or len(set(ens)) != cfg.k or any(not 0 <= i < n for i in ens):
        raise PhalanxError(f"initial ensemble {ens} must be {cfg.k} distinct indices in 0..{n - 1}")
    store = store if store is not None else ResultStore()
    m = len(points)
    t_start = time.perf_counter()

    # this run's records only: a resumed store may also hold queries on other points or labels
    mine: dict[str, Record] = {}

    def solve(pairs: Sequence[tuple[int, int]]) -> tuple[list[Record], int]:
        specs = [QuerySpec(pair, p, float(e), int(labels[p])) for e in cfg.eps for pair in pairs for p in range(m)]
        before = len(store.records)
        recs = run_queries(cands, points, specs, backend=cfg.backend, options=cfg.backend_options,
                           time_limit_s=cfg.time_limit_s, store=store, progress=progress,
                           retry_undecided=cfg.retry_undecided, engine=engine)
        mine.update((r.qid, r) for r in recs)
        return recs, len(store.records) - before

    def table(members: Sequence[int]) -> ScoreTable:
        return ScoreTable.from_records(list(mine.values()), members, cfg.eps, m)

    steps: list[SelectionStep] = []
    initial = ens
    stop = "iteration cap"
    for it in range(cfg.max_iters + 1):
        t0 = time.perf_counter()
        _, new_q = solve(_pairs(ens))
        tab = table(ens)
        us = {i: tab.mean_uniqueness(i) for i in ens}
        weakest = min(ens, key=lambda i: (us[i], i))
        rest = [i for i in ens if i != weakest]
        fresh = [f for f in range(n) if f not in ens]
        scores: dict[int, float] = {}
        if it < cfg.max_iters and not _over(cfg, t_start):
            _, q2 = solve([(min(f, j), max(f, j)) for f in fresh for j in rest])
            new_q += q2
            for f in fresh:
                scores[f] = table([*rest, f]).mean_uniqueness(f, [*rest, f])
        best = max(scores, key=lambda f: (scores[f], -f)) if scores else None
        swap = (weakest, best) if best is not None and scores[best] > us[weakest] else None
        steps.append(SelectionStep(it, ens, us, weakest, scores, swap, new_q, time.perf_counter() - t0))
        log.info("selection step %d: ensemble %s, weakest N%d (US %.4f), swap %s", it, ens, weakest, us[weakest], swap)
        if it == cfg.max_iters:
            stop = "iteration cap"
            break
        if _over(cfg, t_start) and not scores:
            stop = "time budget"
            break
        if swap is None:
            stop = "converged (no fresh candidate is more unique)"
            break
        ens = tuple(sorted([*rest, swap[1]]))
        if _over(cfg, t_start):
            stop = "time budget"
            solve(_pairs(ens))
            break
    return SelectionResult(initial, ens, steps, stop, table(initial), table(ens))


def _over(cfg: SelectionConfig, t_start: float) -> bool:
    return cfg.time_budget_s is not None and time.perf_counter() - t_start > cfg.time_budget_s


# -- validation: verified robust accuracy of the whole ensemble ---------------------------------

def ensemble_kind(combiner: str) -> QueryKind:
    """The composite query for an ensemble combiner; mean-of-probabilities cannot be encoded."""
    c = str(getattr(combiner, "value", combiner))
    if c == "mean-logits":
        return QueryKind.MEAN_LOGITS
    if c in ("majority", "vote", "majority-vote"):
        return QueryKind.MAJORITY
    if c in ("vote-prob", "vote-index"):
        raise PhalanxError(f"combiner {c!r} (a vote with a tie rule) is verified as 'majority', a strict majority of "
                           "votes for the label, which is sufficient under any tie rule: give --combiner majority")
    if c == "random":
        raise PhalanxError("combiner 'random' (one member drawn per query) is not one network to verify; randomized "
                           "ensembles are attacked and verified by `phalanx randomized-attack` (Gross et al.)")
    raise PhalanxError(
        f"combiner {c!r} cannot be verified exactly: the mean (or max) of softmax probabilities is not piecewise "
        "linear, so no MILP/SMT/Marabou encoding is exact; accepted: mean-logits, majority (verify the members "
        "as a mean-logits or majority-vote ensemble instead)")


def verified_robust_accuracy(cands: Candidates, members: Sequence[int], x: torch.Tensor, y: torch.Tensor,
                             eps_list: Sequence[float], *, combiner: str = "mean-logits", backend: str = "portfolio",
                             options: dict[str, Any] | None = None, time_limit_s: float = 60.0, workers: int = 1,
                             store: ResultStore | None = None, progress: Progress | None = None,
                             pgd_steps: int = 50, pgd_restarts: int = 2, seed: int = 0,
                             engine: Engine | str = "local", engine_options: dict[str, Any] | None = None,
                             ) -> dict[str, Any]:
    """Per eps: verified robust accuracy (UNSAT and clean-correct), its upper bound (counting
    undecided as robust), and the PGD estimate on the same points (appendix A, section IV).
    Queries run on ``engine`` (see :func:`~phalanx.verification.runner.run_queries`)."""
    from phalanx.attacks import create_attack
    from phalanx.ensembles import Ensemble
    from phalanx.types import Norm, ThreatModel

    kind = ensemble_kind(combiner)
    mem = tuple(sorted(members))
    ens = Ensemble([cands.models[i] for i in mem], "mean-logits").eval()
    with torch.no_grad():
        z = ens.member_logits(x)
    if kind is QueryKind.MEAN_LOGITS:
        pred = z.mean(0).argmax(-1)
    else:  # strict majority of votes for the true label
        pred = torch.where((z.argmax(-1) == y).sum(0) > len(mem) / 2, y, torch.full_like(y, -1))
    correct = pred == y
    pts = x.reshape(len(x), -1).double().numpy()
    idx = [int(i) for i in correct.nonzero().flatten()]
    specs = [QuerySpec(mem, p, float(e), int(y[p]), kind=kind.value) for e in eps_list for p in idx]
    recs = run_queries(cands, pts, specs, backend=backend, options=options, time_limit_s=time_limit_s,
                       workers=workers, store=store, progress=progress, engine=engine, engine_options=engine_options)
    by = {(r.spec.eps, r.spec.point): r for r in recs}
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for e in eps_list:
        verdicts = [by[(float(e), p)].result.verdict for p in idx]
        unsat = sum(v is Verdict.UNSAT for v in verdicts)
        sat = sum(v is Verdict.SAT for v in verdicts)
        atk = create_attack("pgd", steps=pgd_steps, restarts=pgd_restarts, loss="cw")
        if kind is QueryKind.MEAN_LOGITS:
            adv = atk(ens, x, y, ThreatModel(Norm.LINF, float(e)), generator=gen)
            with torch.no_grad():
                pgd_ok = ens.member_logits(adv).mean(0).argmax(-1) == y
        else:  # majority: attack the vote by its mean-logits surrogate, score by the vote
            adv = atk(ens, x, y, ThreatModel(Norm.LINF, float(e)), generator=gen)
            with torch.no_grad():
                pgd_ok = (ens.member_logits(adv).argmax(-1) == y).sum(0) > len(mem) / 2
        n = len(x)
        rows.append({"eps": float(e), "points": n, "clean_correct": len(idx), "unsat": unsat, "sat": sat,
                     "undecided": len(idx) - unsat - sat, "verified_robust_accuracy": unsat / n,
                     "robust_accuracy_upper": (len(idx) - sat) / n,
                     "pgd_robust_accuracy": float((pgd_ok & correct).float().mean())})
    return {"members": list(mem), "combiner": kind.value, "rows": rows}


# -- section V: gradient attacks vs verification -------------------------------------------------

def attack_comparison(cands: Candidates, records: Sequence[Record], points: np.ndarray, *,
                      attacks: Sequence[str] = ("ga1", "ga2", "ga3"), seed: int = 0) -> dict[str, Any]:
    """SAT counts of each joint gradient attack on the same mutual-error queries as ``records``
    (paper table III): an attack's SAT is a witness that re-checks in float64 PyTorch."""
    from phalanx.verification.portfolio import _attack_candidates
    from phalanx.verification.query import recheck

    counts = {a: 0 for a in attacks}
    ver_sat = ver_unsat = 0
    unsound = 0
    for r in records:
        q = r.spec.build(cands, points[r.spec.point])
        for a, cand in _attack_candidates(q, attacks, steps=20, restarts=1, seed=seed):
            ok = recheck(q, cand)[0] is not None
            counts[a] += ok
            if ok and r.result.verdict is Verdict.UNSAT:
                unsound += 1  # an attack broke a query proven UNSAT: must never happen
        ver_sat += r.result.verdict is Verdict.SAT
        ver_unsat += r.result.verdict is Verdict.UNSAT
    return {"queries": len(records), "attack_sat": counts, "verification_sat": ver_sat,
            "verification_unsat": ver_unsat, "attack_sat_on_unsat": unsound}

