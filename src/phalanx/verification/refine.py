"""MILP refinement of intermediate bounds ("bab-refine"): exact per-neuron bounds where they matter.

Back-substituted bounds of deep layers grow loose because every relaxed ReLU below adds its
triangle's slack. Before branch and bound, each unstable neuron ``j`` of a chain network's act
``k`` (``k >= 1``; act 0 is exact from the box) can be bounded by the exact MILP of the
network's prefix (Tjeng et al. 2019 big-M encoding with the current bounds of acts ``< k``):
``max / min W_k[j] . h_{k-1} + b_k[j]``, solved by HiGHS within a small time limit. The MILP's
*dual* bound is an upper (lower) bound of the neuron whether or not the search finished, so a
time limit costs tightness, never soundness. Neurons are refined layer by layer, most
important first (the caller's scores, e.g. BaBSR-style impact on the objective), and after
each layer the layers above are recomputed by back-substitution from the refined bounds
(``crown.pre_bounds``), which shrinks their MILPs in turn. This is the refinement that
alpha-beta-CROWN runs before branch and bound on VNN-COMP's deeper ``mnist_fc`` networks
("bab-refine"; Wang et al. 2021, sec. 4; there with Gurobi, here with HiGHS).

Soundness: HiGHS works to its feasibility tolerances (1e-7), so each refined bound is widened
by ``REFINE_REL`` times the magnitude of its terms (``|W_k[j]| . max(|l|, |u|) + |b|``) plus
``REFINE_ABS``, far above what those tolerances can move a bound; the MILP backend trusts
HiGHS's infeasibility proofs to the same tolerances (``milp.py``). A refined bound is only ever
intersected with the existing one.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from phalanx.verification.crown import Graph, pre_bounds
from phalanx.verification.milp import highs_solver

#: relative widening of a refined bound (HiGHS tolerances; see the module docstring)
REFINE_REL = 1e-6
#: absolute widening of a refined bound
REFINE_ABS = 1e-6

#: HiGHS options of the per-neuron MILPs: the models are re-solved for one objective after
#: another, where presolve and the primal heuristics (which only look for incumbents; the dual
#: bound is what is read) cost more than the search (3x per neuron on mnist_fc 256x4, measured)
REFINE_HIGHS_OPTIONS: dict[str, bool | float | str] = {
    "presolve": "off", "mip_heuristic_effort": 0.0, "mip_heuristic_run_rins": False, "mip_heuristic_run_rens": False}

Bounds = list[tuple[torch.Tensor, torch.Tensor]]


def dense_layers(g: Graph) -> list[tuple[np.ndarray, np.ndarray, float]] | None:
    """``(W, b, slope)`` of each affine + act pair of a strictly alternating dense chain
    (slope of the act after it; the last affine has none), or None for any other network."""
    out: list[tuple[np.ndarray, np.ndarray, float]] = []
    nodes = g.nodes[1:]
    for i, node in enumerate(nodes):
        want = "affine" if i % 2 == 0 else "act"
        if node.kind != want:
            return None
        if node.kind == "affine":
            op = node.op
            w = getattr(op, "weight", None)
            if w is None:
                return None
            out.append((np.asarray(w, dtype=np.float64), np.asarray(op.bias, dtype=np.float64), 0.0))  # type: ignore[union-attr]
        else:
            w_, b_, _ = out[-1]
            out[-1] = (w_, b_, float(node.slope))
    return out if nodes and nodes[-1].kind == "affine" else None


def _prefix_model(highspy: object, layers: list[tuple[np.ndarray, np.ndarray, float]], k: int,
                  lo: list[np.ndarray], hi: list[np.ndarray], x_lo: np.ndarray, x_hi: np.ndarray,
                  threads: int) -> tuple[object, np.ndarray, bool]:
    """The big-M MILP of acts ``0..k-1`` (input box, each act's output ``h``); returns the HiGHS
    instance, the column indices of ``h_{k-1}`` and whether it has integer columns."""
    hp = highspy
    col_lo: list[np.ndarray] = [x_lo]
    col_hi: list[np.ndarray] = [x_hi]
    integer: list[np.ndarray] = [np.zeros(x_lo.size, dtype=bool)]
    rows_i: list[np.ndarray] = []
    rows_j: list[np.ndarray] = []
    rows_v: list[np.ndarray] = []
    r_lo: list[np.ndarray] = []
    r_hi: list[np.ndarray] = []
    n_cols = x_lo.size
    n_rows = 0
    prev = np.arange(x_lo.size)
    inf = np.inf

    def add_rows(coef_prev: np.ndarray, h_col: np.ndarray | None, h_coef: float, d_col: np.ndarray | None,
                 d_coef: np.ndarray | None, lo_r: np.ndarray, hi_r: np.ndarray) -> None:
        nonlocal n_rows
        m = coef_prev.shape[0]
        ii = np.repeat(np.arange(n_rows, n_rows + m), coef_prev.shape[1])
        rows_i.append(ii)
        rows_j.append(np.tile(prev, m))
        rows_v.append(coef_prev.reshape(-1))
        if h_col is not None:
            rows_i.append(np.arange(n_rows, n_rows + m))
            rows_j.append(h_col)
            rows_v.append(np.full(m, h_coef))
        if d_col is not None and d_coef is not None:
            rows_i.append(np.arange(n_rows, n_rows + m))
            rows_j.append(d_col)
            rows_v.append(d_coef)
        r_lo.append(lo_r)
        r_hi.append(hi_r)
        n_rows += m

    for layer in range(k):
        w, b, a = layers[layer]
        lo_l, hi_l = lo[layer], hi[layer]
        act, ina = lo_l >= 0, hi_l <= 0
        uns = ~(act | ina)
        n = w.shape[0]
        h_lo = np.where(act, lo_l, np.where(ina, a * lo_l, np.minimum(a * lo_l, 0.0)))
        h_hi = np.where(act, hi_l, np.where(ina, a * hi_l, hi_l))
        h = np.arange(n_cols, n_cols + n)
        col_lo.append(h_lo)
        col_hi.append(h_hi)
        integer.append(np.zeros(n, dtype=bool))
        n_cols += n
        # stable: h = s z with s = 1 (active) or a (inactive), z = W h_prev + b
        for mask, s in ((act, 1.0), (ina, a)):
            idx = np.nonzero(mask)[0]
            if idx.size:
                add_rows(-s * w[idx], h[idx], 1.0, None, None, s * b[idx], s * b[idx])
        idx = np.nonzero(uns)[0]
        if idx.size:
            d = np.arange(n_cols, n_cols + idx.size)
            col_lo.append(np.zeros(idx.size))
            col_hi.append(np.ones(idx.size))
            integer.append(np.ones(idx.size, dtype=bool))
            n_cols += idx.size
            l_u, u_u = lo_l[idx], hi_l[idx]
            wi, bi = w[idx], b[idx]
            # h >= z and h >= a z (leaky): h - W h_prev >= b ; h - a W h_prev >= a b
            add_rows(-wi, h[idx], 1.0, None, None, bi, np.full(idx.size, inf))
            if a != 0.0:
                add_rows(-a * wi, h[idx], 1.0, None, None, a * bi, np.full(idx.size, inf))
            # h <= z - (1 - a) l (1 - d):  h - W h_prev - (1-a) l d <= b - (1-a) l
            add_rows(-wi, h[idx], 1.0, d, -(1.0 - a) * l_u, np.full(idx.size, -inf), bi - (1.0 - a) * l_u)
            # h <= a z + (1 - a) u d:  h - a W h_prev - (1-a) u d <= a b
            add_rows(-a * wi, h[idx], 1.0, d, -(1.0 - a) * u_u, np.full(idx.size, -inf), a * bi)
        prev = h
    lp = hp.HighsLp()  # type: ignore[attr-defined]
    lp.num_col_, lp.num_row_ = n_cols, n_rows
    lp.col_cost_ = np.zeros(n_cols)
    lp.col_lower_ = np.concatenate(col_lo)
    lp.col_upper_ = np.concatenate(col_hi)
    lp.row_lower_ = np.concatenate(r_lo) if r_lo else np.zeros(0)
    lp.row_upper_ = np.concatenate(r_hi) if r_hi else np.zeros(0)
    ii, jj, vv = np.concatenate(rows_i), np.concatenate(rows_j), np.concatenate(rows_v)
    keep = vv != 0.0
    ii, jj, vv = ii[keep], jj[keep], vv[keep]
    order = np.lexsort((jj, ii))
    ii, jj, vv = ii[order], jj[order], vv[order]
    lp.a_matrix_.format_ = hp.MatrixFormat.kRowwise  # type: ignore[attr-defined]
    lp.a_matrix_.start_ = np.searchsorted(ii, np.arange(n_rows + 1)).astype(np.int32)
    lp.a_matrix_.index_ = jj.astype(np.int32)
    lp.a_matrix_.value_ = vv
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n_cols, n_rows
    ints = np.concatenate(integer)
    if ints.any():
        lp.integrality_ = [hp.HighsVarType.kInteger if v else hp.HighsVarType.kContinuous  # type: ignore[attr-defined]
                           for v in ints]
    h = highs_solver(hp, threads)
    for key, val in REFINE_HIGHS_OPTIONS.items():
        h.setOptionValue(key, val)  # type: ignore[attr-defined]
    h.passModel(lp)  # type: ignore[attr-defined]
    return h, prev, bool(ints.any())


def _solve_bound(h: object, highspy: object, cost_cols: np.ndarray, cost: np.ndarray, maximise: bool,
                 limit: float, mip: bool) -> float | None:
    """The MILP's dual bound of ``max`` / ``min`` of ``cost . h`` (None when HiGHS gives none)."""
    hp = highspy
    n = h.getNumCol()  # type: ignore[attr-defined]
    full = np.zeros(n)
    full[cost_cols] = cost
    h.changeColsCost(n, np.arange(n, dtype=np.int32), full)  # type: ignore[attr-defined]
    h.changeObjectiveSense(hp.ObjSense.kMaximize if maximise else hp.ObjSense.kMinimize)  # type: ignore[attr-defined]
    h.setOptionValue("time_limit", max(limit, 0.01))  # type: ignore[attr-defined]
    h.clearSolver()  # type: ignore[attr-defined]
    h.run()  # type: ignore[attr-defined]
    status = h.getModelStatus()  # type: ignore[attr-defined]
    if status == hp.HighsModelStatus.kInfeasible:  # type: ignore[attr-defined]
        return -np.inf if maximise else np.inf
    info = h.getInfo()  # type: ignore[attr-defined]
    if mip:
        v = float(info.mip_dual_bound)
        return v if np.isfinite(v) else None
    if status == hp.HighsModelStatus.kOptimal:  # type: ignore[attr-defined]
        return float(info.objective_function_value)
    return None


def refine_bounds(g: Graph, pre: Bounds, x_lo: torch.Tensor, x_hi: torch.Tensor, *, deadline: float,
                  scores: list[torch.Tensor] | None = None, per_neuron_s: float = 0.5, max_per_layer: int = 1 << 30,
                  threads: int = 1) -> tuple[Bounds, dict[str, int]]:
    """``pre`` with the unstable neurons of acts ``1..`` tightened by prefix MILPs, most important
    first (``scores``: per act, larger first; default the interval width), until ``deadline``
    (a ``time.perf_counter()`` value). Networks that are not dense chains come back unchanged."""
    stats = {"refined": 0, "stabilised": 0, "milps": 0}
    layers = dense_layers(g)
    if layers is None or len(pre) < 2:
        return pre, stats
    import highspy

    lo = [p[0].cpu().numpy().copy() for p in pre]
    hi = [p[1].cpu().numpy().copy() for p in pre]
    xl, xh = x_lo.cpu().numpy(), x_hi.cpu().numpy()
    cur = [(p[0].clone(), p[1].clone()) for p in pre]
    for k in range(1, len(pre)):
        if time.perf_counter() > deadline:
            break
        uns = np.nonzero((lo[k] < 0) & (hi[k] > 0))[0]
        if uns.size == 0:
            continue
        sc = (hi[k] - lo[k]) if scores is None else scores[k].cpu().numpy()
        order = uns[np.argsort(-sc[uns], kind="stable")][:max_per_layer]
        model, h_cols, mip = _prefix_model(highspy, layers, k, lo, hi, xl, xh, threads)
        w, b, _ = layers[k]
        mag_h = np.maximum(np.abs(lo[k - 1]), np.abs(hi[k - 1]))
        for j in order.tolist():
            if time.perf_counter() > deadline:
                break
            for maximise in (True, False):
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                if (maximise and hi[k][j] <= 0) or (not maximise and lo[k][j] >= 0):
                    continue
                v = _solve_bound(model, highspy, h_cols, w[j], maximise, min(per_neuron_s, left), mip)
                stats["milps"] += 1
                if v is None:
                    continue
                tol = REFINE_REL * (float(np.abs(w[j]) @ mag_h) + abs(float(b[j]))) + REFINE_ABS
                if maximise:
                    hi[k][j] = min(hi[k][j], v + b[j] + tol)
                else:
                    lo[k][j] = max(lo[k][j], v + b[j] - tol)
            stats["refined"] += 1
            stats["stabilised"] += int(lo[k][j] >= 0 or hi[k][j] <= 0)
        hi[k] = np.maximum(hi[k], lo[k])
        dev, dt = pre[k][0].device, pre[k][0].dtype
        cur[k] = (torch.as_tensor(lo[k], dtype=dt, device=dev), torch.as_tensor(hi[k], dtype=dt, device=dev))
        if k + 1 < len(pre):  # the layers above, back-substituted again from the refined bounds
            with torch.no_grad():
                nb = pre_bounds(g, x_lo, x_hi, floor=cur, start=k + 1).pre
            cur = [(a.clone(), z.clone()) for a, z in nb]
            lo = [a.cpu().numpy().copy() for a, _ in cur]
            hi = [z.cpu().numpy().copy() for _, z in cur]
    return cur, stats
