"""The z3 SMT backend (small networks): the IR over exact rationals, ReLUs as ``If`` terms.

Weights are converted to rationals exactly (``float.as_integer_ratio``). The property is encoded
with non-strict ``c . Y >= 0`` (a superset of the true errors), so z3's UNSAT is a proof; a SAT
model whose float64 re-check fails (an exact tie) is retried with the margin ``>= 1e-3``.
"""

from __future__ import annotations

import time
from fractions import Fraction
from typing import Any

import numpy as np

from phalanx.errors import PhalanxError
from phalanx.verification.backends import QueryBounds, Verifier, query_bounds
from phalanx.verification.ir import Affine, MaxPool, Op, Relu, Residual
from phalanx.verification.query import MARGIN, Query, Verdict, VerificationResult


def _z3() -> Any:
    try:
        import z3
    except ImportError:  # pragma: no cover - depends on the environment
        raise PhalanxError("the smt backend needs z3: pip install 'phalanx[smt]'") from None
    return z3


def exact_real(z3: Any, v: float) -> Any:
    """The float ``v`` as an exact z3 rational."""
    f = Fraction(float(v))
    return z3.Q(f.numerator, f.denominator) if f.denominator != 1 else z3.RealVal(f.numerator)


class Z3NetworkEncoder:
    """Adds an IR network's exact constraints (affine layers, ReLU/leaky-ReLU cases) to a z3 solver."""

    def __init__(self, z3: Any, solver: Any) -> None:
        self.z3, self.s, self.k = z3, solver, 0
        self.pre: Any = iter(())

    def with_bounds(self, pre: Any) -> Z3NetworkEncoder:
        """Use sound pre-activation bounds: stable units become linear terms."""
        self.pre = iter(pre)
        return self

    def fresh(self, n: int) -> list[Any]:
        out = [self.z3.Real(f"v{self.k + i}") for i in range(n)]
        self.k += n
        return out

    def run(self, ops: tuple[Op, ...], h: list[Any]) -> list[Any]:
        z3 = self.z3
        for op in ops:
            if isinstance(op, Affine):
                y = self.fresh(op.bias.size)
                for j in range(op.bias.size):
                    row = op.weight[j]
                    terms = [exact_real(z3, row[i]) * h[i] for i in np.nonzero(row)[0]]
                    self.s.add(y[j] == z3.Sum(terms) + exact_real(z3, op.bias[j]) if terms else y[j] == exact_real(z3, op.bias[j]))
                h = y
            elif isinstance(op, MaxPool):
                next(self.pre, None)
                out = []
                for g in op.groups:
                    m = h[int(g[0])]
                    for i in g[1:]:
                        m = z3.If(h[int(i)] > m, h[int(i)], m)
                    out.append(m)
                h = out
            elif isinstance(op, Residual):
                a, b = self.run(op.branch, h), self.run(op.shortcut, h)
                h = [u + v for u, v in zip(a, b, strict=True)]
            else:  # ReLU / leaky ReLU: linear where the bounds make the unit stable
                a_ = exact_real(z3, 0.0 if isinstance(op, Relu) else op.slope)
                lo, hi = next(self.pre, (np.full(len(h), -np.inf), np.full(len(h), np.inf)))
                out = []
                for i, v in enumerate(h):
                    if lo[i] >= 0:
                        out.append(v)
                    elif hi[i] <= 0:
                        out.append(a_ * v)
                    else:  # a fresh variable and a two-way case split (no nested If terms)
                        r = self.fresh(1)[0]
                        self.s.add(z3.Or(z3.And(v >= 0, r == v), z3.And(v <= 0, r == a_ * v)))
                        out.append(r)
                h = out
        return h


class SmtVerifier(Verifier):
    """z3 over exact rationals; practical for networks with a few dozen ReLUs."""

    name = "smt"

    def __init__(self, max_neurons: int = 400) -> None:
        self.max_neurons = max_neurons

    def verify(self, query: Query, *, time_limit_s: float) -> VerificationResult:
        t0 = time.perf_counter()
        z3 = _z3()
        size = sum(n.num_neurons() for n in query.nets)
        if size > self.max_neurons:
            return self._result(Verdict.ERROR, t0, message=f"{size} nonlinear units exceed the smt backend's "
                                f"max_neurons={self.max_neurons}; use milp or marabou")
        qb = query_bounds(query)
        if qb.proves_unsat(query):
            return self._result(Verdict.UNSAT, t0, message="bounds prove UNSAT (no solver call)")
        for margin in (0.0, MARGIN):
            left = time_limit_s - (time.perf_counter() - t0)
            if left <= 0:
                return self._result(Verdict.TIMEOUT, t0, message="z3 time limit")
            verdict, x, msg = self._solve(z3, query, qb, margin, left)
            if verdict is Verdict.SAT:
                r = self._sat_or_error(query, x, t0, margin=margin)
                if r.verdict is Verdict.SAT or margin > 0:
                    return r
                continue  # an exact tie: retry with the margin
            if verdict is Verdict.UNSAT and margin > 0:
                return self._result(Verdict.ERROR, t0, message="only exact ties reach the property: undecided")
            if verdict is Verdict.UNSAT and not query.complete:
                return self._result(Verdict.TIMEOUT, t0, message="runner-up query UNSAT proves nothing")
            return self._result(verdict, t0, message=msg, details={"margin": margin})
        return self._result(Verdict.ERROR, t0, message="unreachable")

    def _solve(self, z3: Any, query: Query, qb: QueryBounds, margin: float, time_s: float) -> tuple[Verdict, np.ndarray | None, str]:
        s = z3.SolverFor("QF_LRA")
        s.set("timeout", max(1, int(time_s * 1000)))
        lo, hi = query.box()
        x = [z3.Real(f"x{i}") for i in range(lo.size)]
        for i, v in enumerate(x):
            s.add(v >= exact_real(z3, lo[i]), v <= exact_real(z3, hi[i]))
        enc = Z3NetworkEncoder(z3, s)
        y: list[Any] = []
        for net, nb in zip(query.nets, qb.nets, strict=True):
            y += enc.with_bounds(nb.pre).run(net.ops, x)
        m = exact_real(z3, margin)
        holds = []
        for g in query.groups():
            disj = []
            for c in g:
                nz = np.nonzero(c)[0]
                disj.append(z3.Sum([exact_real(z3, c[i]) * y[i] for i in nz]) >= m)
            holds.append(z3.Or(disj))
        if query.required == len(holds):
            s.add(*holds)
        else:
            s.add(z3.Sum([z3.If(h, 1, 0) for h in holds]) >= query.required)
        res = s.check()
        if res == z3.sat:
            mod = s.model()
            vals = []
            for v in x:
                r = mod.eval(v, model_completion=True)
                vals.append(float(Fraction(r.numerator_as_long(), r.denominator_as_long())))
            return Verdict.SAT, np.asarray(vals), "z3 sat"
        if res == z3.unsat:
            return Verdict.UNSAT, None, "z3 unsat"
        return Verdict.TIMEOUT, None, f"z3 unknown: {s.reason_unknown()}"
