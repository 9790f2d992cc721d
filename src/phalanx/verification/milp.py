"""Exact mixed-integer encodings of piecewise-linear networks, solved with HiGHS (highspy).

``MilpModel`` is a thin builder over ``highspy.Highs`` (columns and rows are collected in numpy
and passed as one ``HighsLp``). ``encode_network`` adds the big-M encoding of a
:class:`~phalanx.verification.ir.NetworkIR` whose big-M constants come from sound
pre-activation bounds (``bounds.py``); neurons whose bounds do not straddle zero get no binary
(Tjeng et al. 2019, "Evaluating robustness of neural networks with mixed integer programming").

Soundness (``DESIGN.md``): a MILP proves UNSAT only from an infeasible model or a dual bound past
zero with the gap closed; a solver's incumbent after a time limit is only ever a SAT *candidate*
that the caller re-checks in PyTorch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phalanx.errors import PhalanxError
from phalanx.verification.bounds import NetworkBounds
from phalanx.verification.ir import Affine, MaxPool, NetworkIR, Op, Relu, Residual

INF = float("inf")

#: HiGHS's MILP presolve does not look at the time limit, and its cost grows about quadratically
#: with the model's nonzeros (joint 784-w-10 pair queries on this project's CPU: 0.15 / 0.25 / 2.5 /
#: 11.5 s at w = 30 / 64 / 128 / 256, i.e. 48k-409k nonzeros). ``solve`` turns presolve off, unless
#: the caller set it, when the limit is below twice this estimate (seconds per nonzero squared), so
#: a time limit holds; above it, presolve's gain is kept.
PRESOLVE_S_PER_NZ2 = 7e-11


def presolve_fits(time_limit_s: float, nonzeros: int) -> bool:
    """Whether HiGHS's presolve is expected to take at most half of ``time_limit_s``."""
    return time_limit_s >= 2 * PRESOLVE_S_PER_NZ2 * float(nonzeros) ** 2


#: HiGHS looks at its time limit between LP solves and cut rounds, not inside them, so it ends a
#: while after the limit: up to 0.17 s for joint 784-128-10 pair MILPs (205k nonzeros) and 0.72 s
#: for 784-256-10 ones (409k; the root's cut separation, presolve off), measured with limits of 1-8 s
#: on this project's CPU: about quadratic in the nonzeros, like presolve. ``solve`` gives HiGHS the
#: limit less this estimate (seconds per nonzero squared; at most a quarter of the limit), so the
#: caller's limit holds.
HIGHS_OVERRUN_S_PER_NZ2 = 4.5e-12


def highs_time_limit(time_limit_s: float, nonzeros: int) -> float:
    """The time limit to give HiGHS so that it ends by ``time_limit_s`` (see ``HIGHS_OVERRUN_S_PER_NZ2``)."""
    limit = float(time_limit_s)
    return max(limit - min(HIGHS_OVERRUN_S_PER_NZ2 * float(nonzeros) ** 2, 0.25 * limit), 0.01)

#: the ``threads`` value HiGHS's scheduler was last started with, per calling thread
_HIGHS_THREADS = threading.local()


def check_threads(threads: object) -> int:
    """A HiGHS thread count: an integer >= 0 (0: HiGHS's default, half the cores)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise PhalanxError(f"HiGHS threads must be an integer >= 0 (0: HiGHS default), got {threads!r}")
    return threads


def highs_solver(highspy: Any, threads: int) -> Any:
    """A ``highspy.Highs`` instance that runs with ``threads`` threads (0: HiGHS's default).

    HiGHS keeps one task scheduler per calling thread, started by the first ``run()`` with that
    run's ``threads`` option; a later run with another value fails with model status "Not Set".
    Every solver phalanx creates comes from here, which shuts the scheduler down
    (``Highs.resetGlobalScheduler``) whenever the requested count differs from the one it was
    started with, or is unknown (someone else in the process may have started it)."""
    check_threads(threads)
    if getattr(_HIGHS_THREADS, "value", None) != threads:
        highspy.Highs.resetGlobalScheduler(True)
        _HIGHS_THREADS.value = threads
    h = quiet_highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", threads)
    return h


@dataclass
class MilpOutcome:
    """``status``: 'optimal' | 'infeasible' | 'timeout' | 'target' | 'error'."""

    status: str
    values: np.ndarray | None = None
    objective: float | None = None
    dual_bound: float | None = None
    mip_gap: float | None = None
    message: str = ""
    nodes: int = 0


@dataclass
class MilpModel:
    """Columns, rows and an objective, collected in numpy and solved by HiGHS."""

    lb: list[float] = field(default_factory=list)
    ub: list[float] = field(default_factory=list)
    integer: list[bool] = field(default_factory=list)
    _rows_idx: list[np.ndarray] = field(default_factory=list)
    _rows_coef: list[np.ndarray] = field(default_factory=list)
    _rows_lo: list[float] = field(default_factory=list)
    _rows_hi: list[float] = field(default_factory=list)
    _obj: dict[int, float] = field(default_factory=dict)
    sense: str = "min"
    objective_target: float | None = None
    #: extra HiGHS options (name -> value), e.g. ``{"presolve": "off"}``
    options: dict[str, bool | int | float | str] = field(default_factory=dict)

    @property
    def num_vars(self) -> int:
        return len(self.lb)

    @property
    def num_binaries(self) -> int:
        return sum(self.integer)

    @property
    def num_rows(self) -> int:
        return len(self._rows_lo)

    def add_var(self, lb: float, ub: float, integer: bool = False) -> int:
        self.lb.append(float(lb))
        self.ub.append(float(ub))
        self.integer.append(bool(integer))
        return len(self.lb) - 1

    def add_vars(self, lb: np.ndarray, ub: np.ndarray, integer: bool = False) -> np.ndarray:
        lo = np.asarray(lb, dtype=np.float64).reshape(-1)
        hi = np.asarray(ub, dtype=np.float64).reshape(-1)
        start = len(self.lb)
        self.lb += lo.tolist()
        self.ub += hi.tolist()
        self.integer += [bool(integer)] * lo.size
        return np.arange(start, start + lo.size, dtype=np.int64)

    def tighten(self, idx: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Intersect the bounds of variables ``idx`` with ``[lo, hi]``."""
        for i, a, b in zip(np.asarray(idx).tolist(), np.asarray(lo).tolist(), np.asarray(hi).tolist(), strict=True):
            self.lb[i] = max(self.lb[i], a)
            self.ub[i] = max(min(self.ub[i], b), self.lb[i])

    def add_row(self, idx: Sequence[int] | np.ndarray, coef: Sequence[float] | np.ndarray, lo: float, hi: float) -> None:
        i = np.asarray(idx, dtype=np.int64).reshape(-1)
        c = np.asarray(coef, dtype=np.float64).reshape(-1)
        if np.unique(i).size != i.size:  # a variable used twice (e.g. a max-pool output shared by windows)
            i, inv = np.unique(i, return_inverse=True)
            c = np.bincount(inv, weights=c, minlength=i.size).astype(np.float64)
        keep = c != 0.0
        self._rows_idx.append(i[keep])
        self._rows_coef.append(c[keep])
        self._rows_lo.append(float(lo))
        self._rows_hi.append(float(hi))

    def set_objective(self, idx: Sequence[int] | np.ndarray, coef: Sequence[float] | np.ndarray, sense: str = "min") -> None:
        if sense not in ("min", "max"):
            raise PhalanxError(f"objective sense {sense!r} unknown; accepted: min, max")
        self.sense = sense
        self._obj = {int(i): float(c) for i, c in zip(np.asarray(idx).tolist(), np.asarray(coef).tolist(), strict=True)}

    def solve(self, time_limit_s: float, *, threads: int = 1) -> MilpOutcome:
        """Solve with gap 0 (``mip_rel_gap = mip_abs_gap = 0``) within ``time_limit_s`` seconds.

        With ``objective_target`` set, HiGHS stops at the first incumbent reaching it (status
        'target'): a feasibility question needs one solution, not the optimum. ``options`` are
        passed to HiGHS as they are (a rejected name or value raises ``PhalanxError``)."""
        import highspy

        h = highs_solver(highspy, threads)
        h.setOptionValue("mip_rel_gap", 0.0)
        h.setOptionValue("mip_abs_gap", 0.0)
        if self.objective_target is not None:
            h.setOptionValue("objective_target", float(self.objective_target))
        for k, v in self.options.items():
            if k == "threads":
                raise PhalanxError("give HiGHS's thread count as the verifier's threads setting, not as a HiGHS "
                                   "option (HiGHS needs its scheduler restarted when it changes)")
            if h.setOptionValue(k, v) != highspy.HighsStatus.kOk:
                raise PhalanxError(f"HiGHS rejected option {k}={v!r}; accepted: the options of HiGHS "
                                   f"{h.version()} with values of their type")
        lp = highspy.HighsLp()
        n, m = self.num_vars, self.num_rows
        lp.num_col_, lp.num_row_ = n, m
        cost = np.zeros(n)
        for i, c in self._obj.items():
            cost[i] = c
        lp.col_cost_ = cost
        lp.col_lower_ = np.asarray(self.lb, dtype=np.float64)
        lp.col_upper_ = np.asarray(self.ub, dtype=np.float64)
        lp.row_lower_ = np.asarray(self._rows_lo, dtype=np.float64)
        lp.row_upper_ = np.asarray(self._rows_hi, dtype=np.float64)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lens = np.array([r.size for r in self._rows_idx], dtype=np.int64)
        if "time_limit" not in self.options:  # so that HiGHS ends by the caller's limit
            h.setOptionValue("time_limit", highs_time_limit(time_limit_s, int(lens.sum())))
        if "presolve" not in self.options and not presolve_fits(time_limit_s, int(lens.sum())):
            h.setOptionValue("presolve", "off")  # it would overrun the limit (PRESOLVE_S_PER_NZ2)
        lp.a_matrix_.start_ = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        lp.a_matrix_.index_ = (np.concatenate(self._rows_idx) if m else np.zeros(0)).astype(np.int32)
        lp.a_matrix_.value_ = np.concatenate(self._rows_coef) if m else np.zeros(0)
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n, m
        lp.sense_ = highspy.ObjSense.kMaximize if self.sense == "max" else highspy.ObjSense.kMinimize
        if any(self.integer):
            lp.integrality_ = [highspy.HighsVarType.kInteger if b else highspy.HighsVarType.kContinuous
                               for b in self.integer]
        if h.passModel(lp) == highspy.HighsStatus.kError:
            return MilpOutcome("error", message="HiGHS rejected the model")
        h.run()
        status = h.getModelStatus()
        info = h.getInfo()
        S = highspy.HighsModelStatus
        has_sol = info.primal_solution_status == 2  # kSolutionStatusFeasible
        values = np.asarray(h.getSolution().col_value, dtype=np.float64) if has_sol else None
        objective = float(info.objective_function_value) if has_sol else None
        dual = float(info.mip_dual_bound) if any(self.integer) else objective
        kind = {S.kOptimal: "optimal", S.kInfeasible: "infeasible", S.kTimeLimit: "timeout",
                S.kObjectiveTarget: "target"}.get(status, "error")
        return MilpOutcome(kind, values, objective, dual, float(info.mip_gap) if any(self.integer) else 0.0,
                           message=h.modelStatusToString(status), nodes=int(info.mip_node_count))


class _Encoder:
    def __init__(self, model: MilpModel, bounds: NetworkBounds) -> None:
        self.m = model
        self.pre = iter(bounds.pre)
        self.bounds = bounds

    def run(self, ops: tuple[Op, ...], h: np.ndarray) -> np.ndarray:
        for op in ops:
            h = self.step(op, h)
        return h

    def step(self, op: Op, h: np.ndarray) -> np.ndarray:
        m = self.m
        if isinstance(op, Affine):
            y = m.add_vars(np.full(op.bias.size, -INF), np.full(op.bias.size, INF))
            for j in range(op.bias.size):
                row = op.weight[j]
                nz = np.nonzero(row)[0]
                m.add_row(np.concatenate([[y[j]], h[nz]]), np.concatenate([[1.0], -row[nz]]),
                          float(op.bias[j]), float(op.bias[j]))
            return y
        if isinstance(op, Residual):
            a = self.run(op.branch, h)
            b = self.run(op.shortcut, h)
            s = m.add_vars(np.full(a.size, -INF), np.full(a.size, INF))
            for j in range(a.size):
                m.add_row([s[j], a[j], b[j]], [1.0, -1.0, -1.0], 0.0, 0.0)
            return s
        try:
            lo, hi = next(self.pre)
        except StopIteration:
            raise PhalanxError("bounds do not match the network (too few nonlinear ops)") from None
        if lo.size != h.size and not isinstance(op, MaxPool):
            raise PhalanxError("bounds do not match the network (wrong layer width)")
        m.tighten(h, lo, hi)
        if isinstance(op, MaxPool):
            return self.maxpool(op, h, lo, hi)
        return self.leaky(0.0 if isinstance(op, Relu) else float(op.slope), h, lo, hi)

    def leaky(self, a: float, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """``y = max(x, a x)``. Unstable neurons (``l < 0 < u``), binary ``z`` (1 = active):
        ``y >= x``, ``y >= a x``, ``y - x <= (a - 1) l (1 - z)``, ``y - a x <= (1 - a) u z``."""
        m = self.m
        out = np.empty(x.size, dtype=np.int64)
        for j in range(x.size):
            lb, u, xj = float(lo[j]), float(hi[j]), int(x[j])
            if lb >= 0.0 or a == 1.0:
                out[j] = xj  # active (or identity): y = x
            elif u <= 0.0:
                if a == 0.0:
                    out[j] = m.add_var(0.0, 0.0)
                else:
                    out[j] = m.add_var(a * lb, a * u)
                    m.add_row([out[j], xj], [1.0, -a], 0.0, 0.0)
            else:
                y = m.add_var(0.0 if a == 0.0 else a * lb, u)
                z = m.add_var(0.0, 1.0, integer=True)
                m.add_row([y, xj], [1.0, -1.0], 0.0, INF)
                if a > 0.0:
                    m.add_row([y, xj], [1.0, -a], 0.0, INF)
                m.add_row([y, xj, z], [1.0, -1.0, (a - 1.0) * lb], -INF, (a - 1.0) * lb)
                m.add_row([y, xj, z], [1.0, -a, -(1.0 - a) * u], -INF, 0.0)
                out[j] = y
        return out

    def maxpool(self, op: MaxPool, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """``y = max_j x_j``: ``y >= x_j`` for all j; ``y <= x_j + (u_max - l_j)(1 - z_j)`` and
        ``sum z_j = 1`` over the inputs that can be the maximum (``u_j >= max_i l_i``)."""
        m = self.m
        out = np.empty(len(op.groups), dtype=np.int64)
        for g_i, g in enumerate(op.groups):
            lmax = float(lo[g].max())
            cand = [int(j) for j in g if hi[j] >= lmax]
            if len(cand) == 1:
                out[g_i] = int(x[cand[0]])
                continue
            umax = float(hi[g].max())
            y = m.add_var(lmax, umax)
            zs = []
            for j in g:
                m.add_row([y, int(x[j])], [1.0, -1.0], 0.0, INF)
            for j in cand:
                z = m.add_var(0.0, 1.0, integer=True)
                zs.append(z)
                big = umax - float(lo[j])
                m.add_row([y, int(x[j]), z], [1.0, -1.0, big], -INF, big)
            m.add_row(zs, [1.0] * len(zs), 1.0, 1.0)
            out[g_i] = y
        return out


def encode_network(model: MilpModel, net: NetworkIR, input_vars: np.ndarray, bounds: NetworkBounds) -> np.ndarray:
    """Add the exact big-M encoding of ``net`` on ``input_vars`` (already boxed); return the ids
    of the output (logit) variables. ``bounds`` must be sound for the inputs' box."""
    iv = np.asarray(input_vars, dtype=np.int64).reshape(-1)
    if iv.size != net.in_dim:
        raise PhalanxError(f"network expects {net.in_dim} input variables, got {iv.size}")
    enc = _Encoder(model, bounds)
    out = enc.run(net.ops, iv)
    model.tighten(out, bounds.output[0], bounds.output[1])
    return out


def quiet_highs() -> Any:
    """A ``highspy.Highs()``; the first one in a process prints HiGHS's copyright banner on the
    C-level stdout before any option can switch output off, so that one is made with fd 1 sent
    to /dev/null (the banner would otherwise land in results piped from the CLI and in logs)."""
    import highspy

    global _HIGHS_BANNER_SHOWN
    if _HIGHS_BANNER_SHOWN:
        return highspy.Highs()
    import sys

    sys.stdout.flush()
    try:
        saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no stdout to protect
        return highspy.Highs()
    try:
        os.dup2(devnull, 1)
        h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    _HIGHS_BANNER_SHOWN = True
    return h


_HIGHS_BANNER_SHOWN = False
