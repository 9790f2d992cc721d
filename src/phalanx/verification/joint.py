"""Joint bounds of a query over all its members at once, and their use as a proof of UNSAT.

A query's property (``query.py``) is: at least ``quorum`` groups hold, a group holding when one
of its disjuncts ``c . Y >= 0`` does, over the concatenated logits ``Y`` of members that share
one input. Bounding each member alone misses that the members see *the same* ``x``. Here:

1. every disjunct row ``c`` is split into its members' parts, each part is back-substituted
   through its member (``crown.joint_forms``) and the linear forms are added before
   concretising: one upper form ``f_d(x) = A_d x + c_d >= c_d . Y`` per disjunct, valid on the
   box (the members as one block-diagonal wide network on a shared input). For mean-logits
   queries, whose disjuncts span all members, this alone is the joint bound.
2. a conjunction (a set of ``quorum`` groups, one disjunct each) can hold only if
   ``max_x min_d f_d(x) >= 0``. By LP duality (minimax over the box) that maximum equals
   ``min over lambda in the simplex of max_x sum_d lambda_d f_d(x)``; *any* ``lambda`` gives a
   sound upper bound, so the multipliers come from HiGHS's duals of the small LP
   ``max t s.t. t <= f_d(x), x in box`` and the bound is recomputed in float64 from them
   (rounding-widened as in ``crown.py``): HiGHS's tolerances can cost tightness, never soundness.
   All conjunctions refuted -> UNSAT. This is the "one specification through all members"
   bound: it refutes pairs in which each member alone can err but never on the same input.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from phalanx.verification.backends import BOUND_TOL
from phalanx.verification.crown import (
    ROUND_ABS,
    ROUND_REL,
    Forms,
    Graph,
    Part,
    PreBounds,
    Relax,
    graph,
    joint_forms,
    pre_bounds,
    spec_interval,
)
from phalanx.verification.ir import stack_outputs
from phalanx.verification.milp import highs_solver
from phalanx.verification.query import Query, QueryKind

#: most conjunctions refuted one by one (beyond, only the per-group count is used)
MAX_CONJUNCTIONS = 256


@dataclass
class Setup:
    """A query's graphs, input box and disjunct rows, shared by every node of a search."""

    query: Query
    graphs: list[Graph]
    x_lo: torch.Tensor
    x_hi: torch.Tensor
    rows: np.ndarray  # (D, total) disjunct coefficients, groups concatenated
    group_of: np.ndarray  # (D,) group index of each row
    specs: list[torch.Tensor]  # per member: (D, out) its part of the rows
    users: list[bool]  # per member: do any rows involve it


def setup(query: Query, device: str | torch.device | None = None) -> Setup:
    graphs = [graph(n, device) for n in query.nets]
    lo, hi = query.box()
    dev = graphs[0].device
    groups = query.groups()
    rows = np.concatenate([np.stack(g) for g in groups])
    group_of = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    _, slices = stack_outputs(query.nets)
    specs = [torch.as_tensor(rows[:, s], dtype=torch.float64, device=dev) for s in slices]
    users = [bool(np.any(rows[:, s] != 0.0)) for s in slices]
    t = torch.as_tensor
    return Setup(query, graphs, t(lo, device=dev), t(hi, device=dev), rows, group_of, specs, users)


@dataclass
class NodeBounds:
    """Bounds of a query on one branch-and-bound domain (the whole box at the root)."""

    pre: list[PreBounds]
    forms: Forms | None  # upper forms of the rows (None when a split domain is empty)
    upper: np.ndarray  # (D,) upper bounds of the rows
    lower: np.ndarray  # (D,) lower bounds of the rows
    unsat: bool
    reason: str
    candidates: list[np.ndarray] = field(default_factory=list)
    #: the rows bounded at this domain, in the order of ``forms.rec`` (the others are inherited)
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def member_bounds(st: Setup, i: int, splits: dict[int, torch.Tensor] | None = None,
                  floor: list[tuple[torch.Tensor, torch.Tensor]] | None = None, start: int = 0) -> PreBounds:
    """Member ``i``'s pre-activation bounds on the (split) box (``crown.pre_bounds``)."""
    with torch.no_grad():
        return pre_bounds(st.graphs[i], st.x_lo, st.x_hi, splits, floor, start)


def evaluate(st: Setup, pres: list[PreBounds], *, alpha_steps: int = 0, record: bool = False,
             joint: bool = True, splits: list[dict[int, torch.Tensor]] | None = None,
             parent: NodeBounds | None = None, deadline: float | None = None) -> NodeBounds:
    """Bound the disjunct rows jointly over the members and try to refute the property.

    ``splits``: per member, the branch-and-bound splits of the domain (for beta multipliers).
    With ``parent`` (a domain containing this one) only the parent's live rows are bounded, upper
    bounds only; the parent's bounds, valid on the superset, are kept where they are tighter."""
    q = st.query
    d = st.rows.shape[0]
    if not all(p.feasible for p in pres):
        return NodeBounds(pres, None, np.full(d, -np.inf), np.full(d, -np.inf), True, "split domain is empty")
    sp = splits if splits is not None else [{} for _ in pres]
    ids = np.arange(d) if parent is None else np.nonzero(parent.upper >= -BOUND_TOL)[0]
    sel = torch.as_tensor(ids, device=st.x_lo.device)
    specs = [s[sel] if parent is not None else torch.cat([s, -s]) for s in st.specs]
    parts = [Part(g, s, Relax(p.pre), dict(m)) for g, s, p, u, m in
             zip(st.graphs, specs, pres, st.users, sp, strict=True) if u]
    got = joint_forms(parts, st.x_lo, st.x_hi, alpha_steps, record=record, deadline=deadline)
    with torch.no_grad():
        up_t = got.upper(st.x_lo, st.x_hi)
        ibp = torch.zeros_like(up_t)
        for g, s, p, u in zip(st.graphs, st.specs, pres, st.users, strict=True):
            if u:  # interval arithmetic on the refined bounds, added over the members
                lo_i, hi_i = spec_interval(g, p, s[sel])
                ibp = ibp + (torch.cat([hi_i, -lo_i]) if parent is None else hi_i)
        up: np.ndarray = torch.minimum(up_t, ibp).cpu().numpy()
    n = ids.size
    if parent is None:
        upper, lower = up[:n], -up[n:]
        forms = Forms(got.a[:n], got.c[:n], got.c_abs[:n], [{k: v[:n] for k, v in r.items()} for r in got.rec])
    else:
        upper, lower = parent.upper.copy(), parent.lower.copy()
        upper[ids] = np.minimum(upper[ids], up)
        a_full = torch.zeros(d, got.a.shape[1], dtype=got.a.dtype, device=got.a.device)
        c_full, abs_full = torch.zeros(d, dtype=got.a.dtype, device=got.a.device), torch.zeros(d, dtype=got.a.dtype,
                                                                                             device=got.a.device)
        a_full[sel], c_full[sel], abs_full[sel] = got.a, got.c, got.c_abs
        forms = Forms(a_full, c_full, abs_full, got.rec)
    live = upper >= -BOUND_TOL
    possible = [g for g in range(q.num_groups) if live[st.group_of == g].any()]
    nb = NodeBounds(pres, forms, upper, lower, False, "", ids=ids)
    if q.complete and len(possible) < q.required:
        nb.unsat, nb.reason = True, f"joint bounds: {len(possible)} of {q.required} required groups can hold"
        return nb
    nb.candidates = [_argmax_vertex(forms.a[r], st) for r in np.argsort(-upper)[:3] if live[r]]
    if not joint or not q.complete or q.kind is QueryKind.MEAN_LOGITS or q.required < 2:
        return nb
    refuted, cands = refute_conjunctions(st, forms, upper, possible)
    nb.candidates += cands
    if refuted:
        nb.unsat, nb.reason = True, "joint bounds: no conjunction of required groups can hold on one input"
    return nb


def _argmax_vertex(a: torch.Tensor, st: Setup) -> np.ndarray:
    return torch.where(a > 0, st.x_hi, st.x_lo).cpu().numpy()  # type: ignore[no-any-return]


def conjunctions(st: Setup, upper: np.ndarray, possible: list[int]) -> list[tuple[int, ...]] | None:
    """Every choice of ``quorum`` possible groups and one live disjunct of each (row indices),
    or None when there are more than ``MAX_CONJUNCTIONS``."""
    live = {g: [int(r) for r in np.nonzero((st.group_of == g) & (upper >= -BOUND_TOL))[0]] for g in possible}
    out: list[tuple[int, ...]] = []
    for subset in itertools.combinations(possible, st.query.required):
        n = int(np.prod([len(live[g]) for g in subset]))
        if len(out) + n > MAX_CONJUNCTIONS:
            return None
        out += list(itertools.product(*(live[g] for g in subset)))
    return out


def refute_conjunctions(st: Setup, forms: Forms, upper: np.ndarray,
                        possible: list[int]) -> tuple[bool, list[np.ndarray]]:
    """True when every conjunction is refuted by a sound multiplier certificate; also the LP
    maximisers of the conjunctions that were not (SAT candidates)."""
    combos = conjunctions(st, upper, possible)
    if combos is None:
        return False, []
    a = forms.a.detach().cpu().numpy()
    c = forms.c.detach().cpu().numpy()
    c_abs = forms.c_abs.detach().cpu().numpy()
    lo, hi = st.x_lo.cpu().numpy(), st.x_hi.cpu().numpy()
    cands: list[np.ndarray] = []
    ok = True
    for combo in combos:
        rows = list(combo)
        lam, x = _lp_multipliers(a[rows], c[rows], lo, hi)
        if certified_max(lam, a[rows], c[rows], c_abs[rows], lo, hi) < -BOUND_TOL:
            continue
        ok = False
        if x is not None:
            cands.append(x)
        if len(cands) >= 4:
            break
    return ok, cands


def certified_max(lam: np.ndarray, a: np.ndarray, c: np.ndarray, c_abs: np.ndarray, lo: np.ndarray,
                  hi: np.ndarray) -> float:
    """A sound upper bound of ``max_x min_d (a_d x + c_d)`` over the box: ``max_x sum_d lam_d
    (a_d x + c_d)`` for ``lam`` projected onto the simplex, widened for float64 rounding."""
    lam = np.clip(np.nan_to_num(lam, nan=0.0), 0.0, None)
    lam = lam / lam.sum() if lam.sum() > 0 else np.full(lam.size, 1.0 / lam.size)
    w = lam @ a
    val = float(lam @ c + np.maximum(w * lo, w * hi).sum())
    mag = float((lam @ np.abs(a)) @ np.maximum(np.abs(lo), np.abs(hi)) + lam @ (c_abs + np.abs(c)))
    return val + ROUND_REL * mag + ROUND_ABS


def _lp_multipliers(a: np.ndarray, c: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Duals of ``max t s.t. t - a_d x <= c_d, lo <= x <= hi`` (HiGHS) and its maximiser; for
    two rows, the best multiplier on a grid refined around its minimum (the bound is convex in
    ``lambda``) without an LP."""
    import highspy

    m, n = a.shape
    if m == 1:
        return np.ones(1), np.where(a[0] > 0, hi, lo)
    if m == 2:
        grid = np.linspace(0.0, 1.0, 33)
        for _ in range(3):
            w = grid[:, None] * a[0] + (1 - grid[:, None]) * a[1]
            val = grid * c[0] + (1 - grid) * c[1] + np.maximum(w * lo, w * hi).sum(1)
            k = int(np.argmin(val))
            step = grid[1] - grid[0]
            best = grid[k]
            grid = np.linspace(max(best - step, 0.0), min(best + step, 1.0), 17)
        lam = np.array([best, 1.0 - best])
        w = lam @ a
        return lam, np.where(w > 0, hi, lo)
    h = highs_solver(highspy, 1)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n + 1, m
    lp.col_cost_ = np.concatenate([np.zeros(n), [1.0]])
    lp.col_lower_ = np.concatenate([lo, [-highspy.kHighsInf]])
    lp.col_upper_ = np.concatenate([hi, [highspy.kHighsInf]])
    lp.row_lower_ = np.full(m, -highspy.kHighsInf)
    lp.row_upper_ = c.astype(np.float64)
    mat = np.concatenate([-a, np.ones((m, 1))], axis=1)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.arange(0, m * (n + 1) + 1, n + 1, dtype=np.int32)
    lp.a_matrix_.index_ = np.tile(np.arange(n + 1, dtype=np.int32), m)
    lp.a_matrix_.value_ = mat.reshape(-1)
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n + 1, m
    lp.sense_ = highspy.ObjSense.kMaximize
    h.passModel(lp)
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return np.full(m, 1.0 / m), None
    sol = h.getSolution()
    return np.abs(np.asarray(sol.row_dual, dtype=np.float64)), np.asarray(sol.col_value[:n], dtype=np.float64)
