"""Verifiers: the common interface, bound propagation as an incomplete prover, and the MILP backend.

Every backend answers SAT only with a witness that :func:`~phalanx.verification.query.recheck`
confirmed in a float64 PyTorch forward pass (an unconfirmed SAT is ERROR), and UNSAT only from
a proof: bounds, an infeasible MILP, or a complete solver's UNSAT (``DESIGN.md``).
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from phalanx.errors import PhalanxError
from phalanx.verification.bounds import NetworkBounds, interval_bounds, linear_bounds
from phalanx.verification.ir import NetworkIR, stack_outputs
from phalanx.verification.milp import MilpModel, check_threads, encode_network
from phalanx.verification.query import MARGIN, Query, Verdict, VerificationResult, recheck

log = logging.getLogger(__name__)

#: slack on bound-based proofs for float64 rounding in the bound arithmetic
BOUND_TOL = 1e-9

#: HiGHS options of the MILP backend. The RINS and RENS sub-MIP heuristics took most of the time
#: on the MNIST 784-30-10 queries (e.g. 6.6 s of an 8.5 s infeasibility proof that closes in 22
#: nodes, measured with HiGHS 1.15's solving report) while the model is tiny in binaries (at
#: most a few dozen) and an incumbent with ``t >= MARGIN`` already stops the search
#: (``objective_target``); switching them off changes only the search, never what HiGHS proves.
FAST_HIGHS_OPTIONS: dict[str, bool | int | float | str] = {"mip_heuristic_run_rins": False, "mip_heuristic_run_rens": False}


class Verifier(ABC):
    """``verify(query, time_limit_s=...)`` -> :class:`VerificationResult`."""

    name: str = "verifier"
    complete: bool = True

    @abstractmethod
    def verify(self, query: Query, *, time_limit_s: float) -> VerificationResult: ...

    def verify_guarded(self, query: Query, *, time_limit_s: float) -> VerificationResult:
        """``verify`` behind the error boundary of every caller that must not lose a run: a
        backend crash becomes an ERROR verdict (never a decided one); a :class:`PhalanxError`
        (bad input) still raises."""
        t0 = time.perf_counter()
        try:
            return self.verify(query, time_limit_s=time_limit_s)
        except PhalanxError:
            raise
        except Exception as exc:  # a backend crash is an ERROR verdict, never a wrong answer
            return self._result(Verdict.ERROR, t0, message=f"{type(exc).__name__}: {exc}")

    def _result(self, verdict: Verdict, t0: float, **kw: object) -> VerificationResult:
        return VerificationResult(verdict, self.name, time.perf_counter() - t0, **kw)  # type: ignore[arg-type]

    def _sat_or_error(self, query: Query, x: np.ndarray | None, t0: float, *, unconfirmed: Verdict = Verdict.ERROR,
                      **details: object) -> VerificationResult:
        """Re-check a SAT candidate; SAT if it confirms, ``unconfirmed`` (ERROR by default) if not."""
        w, msg, det = recheck(query, x)
        det.update(details)
        if w is not None:
            return self._result(Verdict.SAT, t0, counterexample=w, message=msg, details=det)
        return self._result(unconfirmed, t0, message=f"unconfirmed SAT: {msg}", details=det)


@dataclass(frozen=True, eq=False)
class QueryBounds:
    """Sound bounds for a query: per-network pre-activation bounds and, per group, the upper
    bound of each disjunct ``c . Y`` (from bounds with the disjuncts folded into the last layer)."""

    nets: tuple[NetworkBounds, ...]
    disjunct_upper: tuple[np.ndarray, ...]
    disjunct_lower: tuple[np.ndarray, ...]

    def possible_groups(self) -> int:
        """Groups with a disjunct whose upper bound reaches 0 (``BOUND_TOL`` absorbs float64
        rounding in the bound computation, erring on the side of "possible")."""
        return sum(u.size > 0 and float(u.max()) >= -BOUND_TOL for u in self.disjunct_upper)

    def proves_unsat(self, query: Query) -> bool:
        """True when fewer than ``quorum`` groups can hold anywhere in the box (sound: the
        bounds over-approximate every reachable logit vector)."""
        return query.complete and self.possible_groups() < query.required


#: disjunct bounds of one network, per bound cache: ``{network IR: {(method, box, rows) key: (upper, lower)}}``
#: (weakly keyed: an IR is an immutable snapshot of a member's weights, freed with it)
BoundCache = weakref.WeakKeyDictionary[NetworkIR, dict[tuple[str, str, bytes], tuple[np.ndarray, np.ndarray]]]


def query_bounds(query: Query, method: str = "linear", *, per_network: bool = True,
                 disjuncts: QueryBounds | None = None, stop_at_unsat: bool = False,
                 cache: BoundCache | None = None, order: Sequence[int] | None = None,
                 box_key: str | None = None) -> QueryBounds:
    """Bounds of every network on the query's box and of every disjunct (``linear`` or ``interval``).

    The disjunct bounds (one pass per network with the disjuncts folded into its last layer) are
    all that :meth:`QueryBounds.proves_unsat` needs; ``per_network=False`` skips the second pass
    per network (pre-activation and logit bounds, needed by the MILP encoding), leaving ``nets``
    empty, and ``disjuncts`` reuses the disjunct bounds of such an earlier call.

    ``stop_at_unsat``: networks are bounded one at a time (those in ``cache`` first), stopping as
    soon as the finished groups prove UNSAT (e.g. the first member of a mutual-error pair is robust
    by its bounds); the disjuncts of the networks not bounded are then left at ``(-inf, inf)``
    (sound, and only returned when :meth:`QueryBounds.proves_unsat` holds). ``cache``: one
    network's disjunct bounds on a box are a pure function of (network, box, rows), so a query
    sharing a member, point and eps with an earlier one (all pairs of an ensemble) reuses them.
    ``order``: the networks' indices in the order to bound them (after the cached ones);
    ``box_key``: a key that identifies the query's box (by default its hash)."""
    fn = {"linear": linear_bounds, "interval": interval_bounds}.get(method)
    if fn is None:
        raise PhalanxError(f"unknown bound method {method!r}; accepted: linear, interval")
    lo, hi = query.box()
    per_net = tuple(fn(net, lo, hi) for net in query.nets) if per_network else ()
    if disjuncts is not None:
        return QueryBounds(per_net, disjuncts.disjunct_upper, disjuncts.disjunct_lower)
    groups = query.groups()
    _, slices = stack_outputs(query.nets)
    allc = np.concatenate([np.stack(g) for g in groups])  # (D, total)
    group_of = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    up, low = np.zeros(allc.shape[0]), np.zeros(allc.shape[0])
    todo = np.zeros(allc.shape[0], dtype=np.int64)  # networks still to bound, per row
    jobs = []
    box = box_key or ""
    if cache is not None and box_key is None:
        h = hashlib.sha1(np.ascontiguousarray(lo).data)
        h.update(np.ascontiguousarray(hi).data)
        box = h.hexdigest()
    rank = {i: r for r, i in enumerate(order)} if order is not None else {}
    for n, (net, sl) in enumerate(zip(query.nets, slices, strict=True)):
        spec = allc[:, sl]
        rows = np.nonzero(np.any(spec != 0.0, axis=1))[0]
        if rows.size:
            todo[rows] += 1
            key = (method, box, spec[rows].tobytes())  # the rows' bytes: a few hundred, cheaper than a hash
            hit = cache.get(net, {}).get(key) if cache is not None else None
            jobs.append(((hit is None, rank.get(n, n)), net, spec[rows], rows, key, hit))
    jobs.sort(key=lambda j: j[0])  # cached networks first: free, and they may settle the query alone
    for _, net, spec, rows, key, hit in jobs:
        if hit is None:
            sb = fn(net, lo, hi, spec=spec).output
            hit = (sb[1], sb[0])
            if cache is not None:
                cache.setdefault(net, {})[key] = hit
        up[rows] += hit[0]
        low[rows] += hit[1]
        todo[rows] -= 1
        if stop_at_unsat and query.complete and np.any(todo > 0) and _refuted(up, todo, group_of) > len(groups) - query.required:
            up[todo > 0], low[todo > 0] = np.inf, -np.inf
            break
    ups, lows, k = [], [], 0
    for g in groups:
        ups.append(up[k:k + len(g)])
        lows.append(low[k:k + len(g)])
        k += len(g)
    return QueryBounds(per_net, tuple(ups), tuple(lows))


def _refuted(up: np.ndarray, todo: np.ndarray, group_of: np.ndarray) -> int:
    """Groups all of whose disjuncts are finished and below 0 (none can hold)."""
    open_ = (todo > 0) | (up >= -BOUND_TOL)
    return int(np.sum(~np.bincount(group_of, weights=open_, minlength=int(group_of.max()) + 1).astype(bool)))


class BoundsVerifier(Verifier):
    """Incomplete: UNSAT when linear bounds prove it, otherwise TIMEOUT (undecided)."""

    name = "bounds"
    complete = False

    def __init__(self, method: str = "linear") -> None:
        self.method = method

    def verify(self, query: Query, *, time_limit_s: float = 0.0) -> VerificationResult:
        t0 = time.perf_counter()
        qb = query_bounds(query, self.method, per_network=False, stop_at_unsat=True)
        if qb.proves_unsat(query):
            return self._result(Verdict.UNSAT, t0, message=f"{self.method} bounds: at most "
                                f"{qb.possible_groups()} of {query.required} required groups can hold")
        return self._result(Verdict.TIMEOUT, t0, message="bounds inconclusive (incomplete method)")


def build_milp(query: Query, qb: QueryBounds, *, objective_target: float | None = MARGIN) -> tuple[MilpModel, np.ndarray, int]:
    """The query as a MILP: maximise ``t`` subject to ``t <= c . Y`` for the chosen disjunct of
    every active group, at least ``quorum`` groups active, ``t >= 0``. Feasible iff some input in
    the box satisfies the property with non-strict inequalities (a superset of the true errors),
    so infeasibility proves UNSAT; the optimum ``t*`` is the best worst-case margin."""
    m = MilpModel()
    lo, hi = query.box()
    x = m.add_vars(lo, hi)
    outs = [encode_network(m, net, x, nb) for net, nb in zip(query.nets, qb.nets, strict=True)]
    y = np.concatenate(outs)
    groups = query.groups()
    all_required = query.required == len(groups)
    # t <= the margin of every active group, so t <= the q-th largest of the groups' best upper bounds
    best = sorted((float(u.max()) for u in qb.disjunct_upper), reverse=True)
    t_hi = max(0.0, best[query.required - 1])
    t = m.add_var(0.0, t_hi)
    actives = []
    for g, up, low in zip(groups, qb.disjunct_upper, qb.disjunct_lower, strict=True):
        keep = [i for i in range(len(g)) if up[i] >= -BOUND_TOL]  # a disjunct that cannot reach 0 never holds
        if not keep:
            if all_required:
                m.add_row([t], [1.0], -np.inf, -1.0)  # infeasible: this group can never hold
            continue
        active = None if all_required else m.add_var(0.0, 1.0, integer=True)
        if active is not None:
            actives.append(active)
        if len(keep) == 1 and active is None:
            c = g[keep[0]]
            nz = np.nonzero(c)[0]
            m.add_row(np.concatenate([[t], y[nz]]), np.concatenate([[1.0], -c[nz]]), -np.inf, 0.0)
            continue
        zs = []
        for i in keep:
            c = g[i]
            nz = np.nonzero(c)[0]
            z = m.add_var(0.0, 1.0, integer=True)
            zs.append(z)
            big = t_hi - min(float(low[i]), 0.0)  # t - c.Y <= t_hi - lb(c.Y) always
            # t - c.Y + big * z <= big   <=>   t <= c.Y + big (1 - z)
            m.add_row(np.concatenate([[t], y[nz], [z]]), np.concatenate([[1.0], -c[nz], [big]]), -np.inf, big)
        if active is None:
            m.add_row(zs, [1.0] * len(zs), 1.0, 1.0)
        else:
            m.add_row([*zs, active], [1.0] * len(zs) + [-1.0], 0.0, 0.0)
    if actives:
        m.add_row(actives, [1.0] * len(actives), float(query.required), np.inf)
    elif not all_required:
        m.add_row([t], [1.0], -np.inf, -1.0)
    m.set_objective([t], [1.0], "max")
    m.objective_target = objective_target
    return m, x, t


class MilpVerifier(Verifier):
    """Exact big-M MILP solved by HiGHS with gap 0; UNSAT only from proven infeasibility."""

    name = "milp"

    def __init__(self, bounds: str = "linear", threads: int = 1, highs_options: dict[str, bool | int | float | str] | None = None) -> None:
        self.bounds, self.threads = bounds, check_threads(threads)
        self.highs_options = dict(FAST_HIGHS_OPTIONS if highs_options is None else highs_options)

    def verify(self, query: Query, *, time_limit_s: float) -> VerificationResult:
        return self.verify_with_bounds(query, None, time_limit_s=time_limit_s)

    def verify_with_bounds(self, query: Query, qb: QueryBounds | None, *, time_limit_s: float) -> VerificationResult:
        """:meth:`verify`, reusing ``qb`` when a caller (the portfolio's bounds stage) already
        computed the query's bounds with the same method (``self.bounds``)."""
        t0 = time.perf_counter()
        qb = qb if qb is not None else query_bounds(query, self.bounds, per_network=False, stop_at_unsat=True)
        if qb.proves_unsat(query):
            return self._result(Verdict.UNSAT, t0, message="bounds prove UNSAT (no solver call)")
        if not qb.nets:  # the encoding needs every network's own bounds
            qb = query_bounds(query, self.bounds, disjuncts=qb)
        model, x, _ = build_milp(query, qb)
        model.options = self.highs_options
        left = time_limit_s - (time.perf_counter() - t0)
        if left <= 0:
            return self._result(Verdict.TIMEOUT, t0, message="time limit reached while building the MILP")
        out = model.solve(left, threads=self.threads)
        det = {"binaries": model.num_binaries, "nodes": out.nodes, "status": out.status,
               "objective": out.objective, "dual_bound": out.dual_bound}
        if out.status == "infeasible":
            if not query.complete:
                return self._result(Verdict.TIMEOUT, t0, message="runner-up query infeasible: proves nothing",
                                    details=det)
            return self._result(Verdict.UNSAT, t0, message="MILP infeasible", details=det)
        if out.status == "error":
            return self._result(Verdict.ERROR, t0, message=f"HiGHS: {out.message}", details=det)
        if out.values is not None and (out.objective or 0.0) > 0.0:
            unconfirmed = Verdict.TIMEOUT if out.status == "timeout" else Verdict.ERROR
            return self._sat_or_error(query, out.values[x], t0, unconfirmed=unconfirmed, **det)
        if out.status == "timeout":
            return self._result(Verdict.TIMEOUT, t0, message="HiGHS time limit", details=det)
        # optimal with t* = 0: only exact ties reach the property; undecided at float precision
        return self._result(Verdict.ERROR, t0, message="optimum is an exact tie (t* = 0): undecided", details=det)
