"""The paper's SMT encoding (Gross et al. section 5) with z3, the baseline backend.

Real variables for the attack points ``x'_{ij}`` with ``sum_k |x'_{ijk} - x^j_k| <= eps``
(``|.|`` as z3's ``If``, eq. (5)) or the L-inf box, probabilities ``p_i`` (eqs. (6), (7)), the
networks written by the verification SMT backend's encoder (``phalanx.verification.smt``:
exact rational weights, ReLU / max-pool as ``If``, stable units linear by sound bounds), the 0-1
loss as an if-then-else (eq. (8)) and eq. (4) as ``sum_{ij} If(c misclassifies x'_{ij}, p_i, 0)
>= alpha |X|`` (the product ``p_i * l`` written as an ``If``, which keeps the problem in linear
real arithmetic).

Two calls, as the MILP pattern queries: margin 0 (exactly the paper's question, ties count as
errors: unsat proves robustness for this |A|), then, when the margin-0 model's attack only
re-checks on ties, the attack margin (sat gives an attack that re-checks in PyTorch)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from phalanx.errors import PhalanxError
from phalanx.randomized.milp import RawAttack
from phalanx.randomized.patterns import PatternSolver
from phalanx.randomized.problem import VALUE_TOL, into_ball, recheck_attack
from phalanx.types import Norm
from phalanx.verification.smt import exact_real


def _z3() -> Any:
    try:
        import z3
    except ImportError:  # pragma: no cover - depends on the environment
        raise PhalanxError("the smt backend needs z3: pip install z3-solver") from None
    return z3


def _solve_once(z3: Any, solver: PatternSolver, a: int, margin: float,
                timeout_s: float) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    from phalanx.verification.smt import Z3NetworkEncoder  # the one z3 network encoder

    x, y, cfg, nets = solver.x, solver.y, solver.cfg, solver.clf.nets
    n, d = x.shape
    norm = Norm.parse(cfg.norm)
    s = z3.Solver()
    s.set("timeout", max(1, int(timeout_s * 1000)))
    p = [z3.Real(f"p_{i}") for i in range(a)]
    s.add(*[pi >= 0 for pi in p], z3.Sum(*p) == 1)  # eqs. (6), (7)
    pts = []
    for i in range(a):
        row = []
        for j in range(n):
            xv = [z3.Real(f"x_{i}_{j}_{k}") for k in range(d)]
            dev = [xv[k] - exact_real(z3, x[j, k]) for k in range(d)]
            if norm is Norm.L1:  # eq. (5) with |.| as If
                s.add(z3.Sum(*[z3.If(e >= 0, e, -e) for e in dev]) <= exact_real(z3, cfg.eps))
            else:
                s.add(*[z3.And(e <= exact_real(z3, cfg.eps), e >= exact_real(z3, -cfg.eps)) for e in dev])
            if cfg.bounds is not None:
                lo, hi = exact_real(z3, cfg.bounds[0]), exact_real(z3, cfg.bounds[1])
                s.add(*[z3.And(v >= lo, v <= hi) for v in xv])
            row.append(xv)
        pts.append(row)
    enc = Z3NetworkEncoder(z3, s)
    for c, net in enumerate(nets):  # eq. (4) with the loss of eq. (8)
        acc = []
        for i in range(a):
            for j in range(n):
                z = enc.with_bounds(solver.bounds(j, c).bounds.pre).run(net.ops, pts[i][j])
                yj = int(y[j])
                wrong = z3.Or(*[z[r] - z[yj] >= exact_real(z3, margin) for r in range(len(z)) if r != yj])
                acc.append(z3.If(wrong, p[i], 0))
        s.add(z3.Sum(*acc) >= exact_real(z3, cfg.alpha * n))
    res = s.check()
    if res == z3.unsat:
        return "infeasible", None, None
    if res != z3.sat:
        return "timeout", None, None
    m = s.model()

    def val(v: Any) -> float:
        r = m.eval(v, model_completion=True)
        return float(r.numerator_as_long()) / float(r.denominator_as_long())

    probs = np.array([val(pi) for pi in p])
    atk = np.array([[[val(v) for v in pts[i][j]] for j in range(n)] for i in range(a)])
    return "sat", atk, probs


def solve_smt(solver: PatternSolver, num_attacks: int, deadline: float) -> RawAttack:
    """Decide ``exists (A, P): Val >= alpha`` with z3 (the paper's SMT baseline)."""
    z3 = _z3()
    clf, x, y, cfg = solver.clf, solver.x, solver.y, solver.cfg
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for margin in (0.0, cfg.margin):
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        status, atk, probs = _solve_once(z3, solver, num_attacks, margin, left)
        stats[f"margin_{margin:g}"] = status
        if status == "infeasible" and margin == 0.0:
            stats["solve_time_s"] = time.perf_counter() - t0
            return RawAttack("infeasible", None, None, None, None, stats=stats)
        if status != "sat" or atk is None or probs is None:
            break
        atk = np.stack([np.stack([into_ball(x[j], atk[i, j], cfg.eps, Norm.parse(cfg.norm), cfg.bounds)
                                  for j in range(x.shape[0])]) for i in range(num_attacks)])
        probs = np.clip(probs, 0, None) / np.clip(probs, 0, None).sum()
        value = recheck_attack(clf, x, y, atk, probs, cfg).value
        if best is None or value > best[2]:
            best = (atk, probs, value)
        if value >= cfg.alpha - VALUE_TOL or margin > 0 or cfg.margin <= 0:
            break
    stats["solve_time_s"] = time.perf_counter() - t0
    if best is None:
        return RawAttack("timeout", None, None, None, None, stats=stats)
    return RawAttack("sat", best[0], best[1], None, None, stats=stats)
