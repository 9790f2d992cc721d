"""Fooling patterns: for each data point, which subsets S of the classifiers one eps-bounded
perturbation can misclassify *together* (the network part of the decomposition).

A pattern query is "exists x' in the ball of x^j with every c in S wrong" — a MILP over the
verification IR, bounds and ``encode_network`` (``encoding``). Feasible patterns are
closed under subsets, so the enumeration (i) takes every subset of the clean point's fooled set
for free, (ii) asks the full set C first (Lemma 2's case: if it is feasible at every point, one
deterministic attack reaches Val = 1), then (iii) goes bottom-up by size, skipping supersets of
proven-infeasible sets and subsets of any witness's fooled set (the witness is re-evaluated in
float64 PyTorch and may fool more than asked).

Soundness: a pattern is *feasible* only with a witness that re-checks in PyTorch with every
classifier of S wrong; *infeasible* only from bounds or an infeasible MILP with margin 0 (ties
count as errors, Def. 4); everything else (time limits, tie-only witnesses) is *unknown*, which
the caller treats as feasible for upper bounds and as infeasible for attacks.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from phalanx.randomized.encoding import (
    EncodedPoint,
    add_misclassified,
    add_perturbed_point,
    can_misclassify,
    point_bounds,
)
from phalanx.randomized.objectives import Pattern, maximal_patterns
from phalanx.randomized.problem import ACCEPT_MARGIN, Classifiers, RandomizedAttackConfig, into_ball
from phalanx.types import Norm

log = logging.getLogger(__name__)


@dataclass
class QueryRecord:
    point: int
    subset: tuple[int, ...]
    status: str  # feasible | infeasible | unknown
    how: str  # clean | bounds | milp | milp-margin | implied-subset | implied-superset | deadline
    wall_time_s: float = 0.0


@dataclass
class PointPatterns:
    """What is known about one point's patterns, with a witness for every feasible one."""

    point: int
    num_classifiers: int
    feasible: dict[Pattern, np.ndarray] = field(default_factory=dict)  # pattern -> witness x'
    infeasible: set[Pattern] = field(default_factory=set)
    unknown: set[Pattern] = field(default_factory=set)
    records: list[QueryRecord] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.unknown

    def lower(self) -> list[Pattern]:
        """Maximal patterns with witnesses (for attacks); always contains a set (maybe empty)."""
        return maximal_patterns(list(self.feasible))

    def upper(self) -> list[Pattern]:
        """Maximal patterns among feasible and unknown ones (for sound upper bounds)."""
        return maximal_patterns([*self.feasible, *self.unknown])

    def witness(self, pattern: Pattern) -> np.ndarray:
        return self.feasible[frozenset(pattern)]

    def status(self, s: Pattern) -> str | None:
        if s in self.feasible:
            return "feasible"
        if s in self.infeasible:
            return "infeasible"
        if s in self.unknown:
            return "unknown"
        return None


def fooled_set(clf: Classifiers, x_adv: np.ndarray, y: int, margin: float = ACCEPT_MARGIN) -> Pattern:
    """The classifiers that misclassify ``x_adv`` (float64 PyTorch, Def. 4) by at least ``margin``.

    The default margin rejects exact-tie witnesses: Def. 4 counts a tie as an error, but whether
    a float64 tie survives depends on summation order (batch size), so a witness is accepted
    only when it misclassifies robustly; ties are re-solved with the attack margin."""
    z = clf.logits(x_adv.reshape(1, -1))[:, 0, :]
    true = z[:, y]
    others = np.delete(z, y, axis=1).max(axis=1)
    return frozenset(int(c) for c in np.flatnonzero(others - true >= margin))


class PatternSolver:
    """Pattern queries for one problem; caches per (point, classifier) bounds."""

    def __init__(self, clf: Classifiers, x: np.ndarray, y: np.ndarray, config: RandomizedAttackConfig) -> None:
        self.clf = clf
        self.x = np.asarray(x, dtype=np.float64).reshape(len(y), -1)
        self.y = np.asarray(y, dtype=np.int64)
        self.cfg = config
        self.norm = Norm.parse(config.norm)
        self._bounds: dict[tuple[int, int], EncodedPoint] = {}
        self.num_milp = 0

    def bounds(self, j: int, c: int) -> EncodedPoint:
        key = (j, c)
        if key not in self._bounds:
            self._bounds[key] = point_bounds(self.clf.nets[c], self.x[j], int(self.y[j]),
                                             self.cfg.eps, self.cfg.bounds)
        return self._bounds[key]

    def solve_subset(self, j: int, subset: Pattern, margin: float, time_limit_s: float, *,
                     maximize: bool = False) -> tuple[str, np.ndarray | None]:
        """One MILP: ``exists x'`` in the ball with every classifier of ``subset`` wrong by ``margin``.

        ``maximize``: the margin becomes a variable ``m`` in ``[0, margin]`` that is maximised
        (the model is infeasible iff no x' misclassifies with margin 0, and the solver stops as
        soon as an x' reaches the full ``margin``). Returns ('feasible', x') | ('infeasible', None)
        | ('timeout' | 'error', x' or None): a timeout may still carry an incumbent to re-check."""
        from phalanx.verification.milp import MilpModel

        model = MilpModel()
        xv = add_perturbed_point(model, self.x[j], self.cfg.eps, self.norm, self.cfg.bounds)
        m = model.add_var(0.0, margin) if maximize else None
        for c in sorted(subset):
            add_misclassified(model, self.clf.nets[c], xv, self.bounds(j, c), int(self.y[j]), margin, margin_var=m)
        if m is not None:
            model.set_objective([m], [1.0], sense="max")
        self.num_milp += 1
        out = model.solve(time_limit_s)
        if out.status == "infeasible":
            return "infeasible", None
        x_adv = None
        if out.values is not None:
            x_adv = into_ball(self.x[j], out.values[xv], self.cfg.eps, self.norm, self.cfg.bounds)
        if out.status in ("optimal", "target") and x_adv is not None:
            return "feasible", x_adv
        return out.status, x_adv

    def query(self, j: int, subset: Pattern, deadline: float) -> tuple[str, np.ndarray | None, str]:
        """Decide one pattern soundly (see the module docstring)."""
        y = int(self.y[j])
        if any(not can_misclassify(self.bounds(j, c), 0.0) for c in subset):
            return "infeasible", None, "bounds"
        left = deadline - time.perf_counter()
        if left <= 0:
            return "unknown", None, "deadline"
        # one MILP maximising the smallest margin over S (capped at 10x the attack margin):
        # infeasible proves the pattern impossible even with ties (margin 0); the first x' at the
        # cap ends the search with a witness that survives solver tolerances
        status, w = self.solve_subset(j, subset, max(10 * self.cfg.margin, 1e-6), left, maximize=True)
        if status == "infeasible":
            return "infeasible", None, "milp"
        if w is not None and subset <= fooled_set(self.clf, w, y):
            return "feasible", w, "milp"
        if status != "feasible":
            return "unknown", None, f"milp-{status}"
        w = self.witness_with_margin(j, subset, deadline)
        return ("feasible", w, "milp-margin") if w is not None else ("unknown", None, "tie-only")

    def witness_with_margin(self, j: int, subset: Pattern, deadline: float) -> np.ndarray | None:
        """A witness for ``subset`` at point ``j`` that re-checks in float64 PyTorch: maximise the
        margin up to 10x the attack margin, then demand 100x when solver tolerances (big-M times
        integrality tolerance) ate it; None when no margin works in time."""
        y = int(self.y[j])
        for margin, maximize in ((10 * self.cfg.margin, True), (100 * self.cfg.margin, False)):
            left = deadline - time.perf_counter()
            if margin <= 0 or left <= 0:
                break
            status, w = self.solve_subset(j, subset, margin, left, maximize=maximize)
            if w is not None and subset <= fooled_set(self.clf, w, y):
                return w
            if status not in ("feasible", "optimal"):
                break
        return None


def enumerate_patterns(solver: PatternSolver, j: int, deadline: float, *,
                       stop_unless_full: bool = False,
                       on_query: Callable[[], None] | None = None) -> PointPatterns:
    """All fooling patterns of point ``j`` (see the module docstring for the order).

    ``stop_unless_full`` (Lemma 2 with alpha = 1): stop after the full set's query."""
    clf, cn, y = solver.clf, len(solver.clf), int(solver.y[j])
    pp = PointPatterns(j, cn)
    x0 = solver.x[j]

    def add_witness(w: np.ndarray, how: str, asked: Pattern, t: float) -> None:
        fooled = fooled_set(clf, w, y)
        for k in range(len(fooled) + 1):
            for sub in itertools.combinations(sorted(fooled), k):
                s = frozenset(sub)
                if s not in pp.feasible:
                    pp.feasible[s] = w
                    pp.unknown.discard(s)
        pp.records.append(QueryRecord(j, tuple(sorted(asked)), "feasible", how, t))

    add_witness(x0.copy(), "clean", frozenset(), 0.0)

    def decide(s: Pattern) -> str:
        known = pp.status(s)
        if known is not None:
            return known
        if any(frozenset(sub) in pp.infeasible for sub in itertools.combinations(sorted(s), len(s) - 1)):
            pp.infeasible.add(s)
            pp.records.append(QueryRecord(j, tuple(sorted(s)), "infeasible", "implied-superset"))
            return "infeasible"
        t0 = time.perf_counter()
        status, w, how = solver.query(j, s, deadline)
        dt = time.perf_counter() - t0
        if on_query is not None:
            on_query()
        if status == "feasible" and w is not None:
            add_witness(w, how, s, dt)
            return "feasible"
        (pp.infeasible if status == "infeasible" else pp.unknown).add(s)
        pp.records.append(QueryRecord(j, tuple(sorted(s)), status, how, dt))
        return status

    full = frozenset(range(cn))
    if decide(full) == "feasible" or stop_unless_full:
        return pp
    for k in range(1, cn):
        for sub in itertools.combinations(range(cn), k):
            decide(frozenset(sub))
    return pp
