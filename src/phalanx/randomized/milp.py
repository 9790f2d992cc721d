"""The monolithic MILP of Gross et al. section 5 (eqs. (4)-(8)) with the networks inside.

Variables: probabilities ``p_i`` (eqs. (6), (7)); one perturbed copy ``x'_{ij}`` of every point
per attack with the L1 budget through auxiliary ``|delta|`` variables (eq. (5)); one network
encoding per (attack, point, classifier) from ``encode_network``; a binary 0-1 loss
``l^c_{ij}`` with ``l = 1 => c misclassifies x'_{ij}`` (eq. (8), indicator with a margin); the
products ``w^c_{ij} = p_i l^c_{ij}`` linearised exactly (``w <= p_i``, ``w <= l``,
``w >= p_i - (1 - l)``, ``w >= 0``; the paper's big-M product with M = 1); and
``t <= 1/N sum_{ij} w^c_{ij}`` for every classifier (eq. (4) with ``t >= alpha``, or ``max t``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phalanx.randomized.encoding import add_misclassified, add_perturbed_point, can_misclassify
from phalanx.randomized.patterns import PatternSolver


@dataclass
class RawAttack:
    """A solver's answer before the PyTorch re-check. ``status``: optimal | infeasible | timeout |
    error. ``upper_bound``: a proven bound on the best Val (None when nothing was proven);
    ``patterns[i][j]``: the classifiers the solver claims attack i fools at point j."""

    status: str
    attacks: np.ndarray | None
    probabilities: np.ndarray | None
    solver_value: float | None
    upper_bound: float | None
    patterns: list[list[frozenset[int]]] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def solve_monolithic_milp(solver: PatternSolver, num_attacks: int, objective: str, alpha: float,
                          deadline: float, margin: float = 0.0) -> RawAttack:
    """Build and solve the paper's MILP with misclassification meaning ``z_r - z_y >= margin``.

    With margin 0 (ties count as errors, Def. 4) its optimum and infeasibility are proofs about
    every attack, but its attack may fool some classifiers only at exact ties, which no float64
    re-check confirms. With the attack margin (``cfg.margin``) every pattern it claims has a
    witness with room to spare, so its attack re-checks, but its optimum bounds nothing. The
    caller solves margin 0 first and the attack margin when the re-check falls short."""
    from phalanx.verification.milp import MilpModel

    clf, cfg = solver.clf, solver.cfg
    n, cn, a = len(solver.y), len(clf), num_attacks
    model = MilpModel()
    p = model.add_vars(np.zeros(a), np.ones(a))
    model.add_row(list(p), [1.0] * a, 1.0, 1.0)  # eq. (6)
    for i in range(a - 1):  # symmetry breaking
        model.add_row([int(p[i]), int(p[i + 1])], [1.0, -1.0], 0.0, math.inf)
    t = model.add_var(0.0, 1.0)
    xv: list[list[np.ndarray]] = []
    loss: dict[tuple[int, int, int], int] = {}
    terms: list[list[int]] = [[] for _ in range(cn)]
    for i in range(a):
        row = []
        for j in range(n):
            v = add_perturbed_point(model, solver.x[j], cfg.eps, solver.norm, cfg.bounds)  # eq. (5)
            row.append(v)
            for c in range(cn):
                enc = solver.bounds(j, c)
                if not can_misclassify(enc, margin):
                    continue  # l^c_{ij} = 0 proven by bounds
                lv = model.add_var(0.0, 1.0, integer=True)
                add_misclassified(model, clf.nets[c], v, enc, int(solver.y[j]), margin, indicator=lv)
                w = model.add_var(0.0, 1.0)
                model.add_row([w, int(p[i])], [1.0, -1.0], -math.inf, 0.0)
                model.add_row([w, lv], [1.0, -1.0], -math.inf, 0.0)
                model.add_row([w, int(p[i]), lv], [1.0, -1.0, -1.0], -1.0, math.inf)
                loss[(i, j, c)] = lv
                terms[c].append(w)
        xv.append(row)
    for c in range(cn):  # eq. (4): t <= 1/N sum_ij w^c_ij
        model.add_row([*terms[c], t], [1.0 / n] * len(terms[c]) + [-1.0], 0.0, math.inf)
    if objective == "max-min":
        model.set_objective([t], [1.0], sense="max")
    elif objective == "max-sum":  # the paper's MaxMILP (section 6.1)
        allw = [w for ws in terms for w in ws]
        model.set_objective(allw, [1.0] * len(allw), sense="max")
    else:  # the paper's MILP: constraints (4)-(7) with Val >= alpha, no objective
        model.add_row([t], [1.0], float(alpha), math.inf)
        model.set_objective([t], [0.0], sense="max")
    stats: dict[str, Any] = {"num_vars": model.num_vars, "num_binaries": model.num_binaries, "num_rows": model.num_rows,
                             "margin": margin}
    t0 = time.perf_counter()
    out = model.solve(max(deadline - time.perf_counter(), 0.01))
    stats.update(solve_time_s=time.perf_counter() - t0, nodes=out.nodes, solver_status=out.status)
    upper: float | None = None
    scale = 1.0 if objective == "max-min" else 1.0 / (cn * n)
    if objective != "feasibility" and margin == 0.0:
        # only a closed gap is a proof (DESIGN.md); a dual bound after a time limit is just recorded
        if out.status == "optimal" and out.objective is not None:
            upper = float(out.objective) * scale
        elif out.dual_bound is not None and math.isfinite(out.dual_bound):
            stats["dual_bound_at_timeout"] = min(1.0, float(out.dual_bound) * scale)
    if out.status == "infeasible":  # a proof only at margin 0 (the caller decides)
        return RawAttack("infeasible", None, None, None, upper, stats=stats)
    if out.values is None:
        return RawAttack(out.status, None, None, None, upper, stats=stats)
    vals = out.values
    attacks = np.stack([np.stack([vals[xv[i][j]] for j in range(n)]) for i in range(a)])
    pats = [[frozenset(c for c in range(cn) if (i, j, c) in loss and vals[loss[(i, j, c)]] > 0.5)
             for j in range(n)] for i in range(a)]
    status = "optimal" if out.status in ("optimal", "target") else out.status
    return RawAttack(status, attacks, vals[p], float(vals[t]), upper, pats, stats)
