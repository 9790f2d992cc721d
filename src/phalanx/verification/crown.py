"""Back-substituted linear bounds (CROWN / DeepPoly backward mode) with optimised ReLU slopes.

For a linear objective ``c . h_t`` of any node ``t`` of a :class:`~phalanx.verification.ir.NetworkIR`,
the backward pass carries a coefficient matrix ``A`` from ``t`` down to the input, replacing each
op by its exact (affine, residual sum) or relaxed (ReLU, leaky ReLU, max-pool) linear form, and
concretises ``A x + b`` on the input box once (Zhang et al. 2018, "Efficient neural network
robustness certification with general activation functions", eq. 3-6; Singh et al. 2019,
DeepPoly, back-substitution). Pre-activation bounds are computed layer by layer the same way
(each layer's bounds from a backward pass to the input through the relaxations of the layers
below), intersected with interval arithmetic on the refined bounds.

- Affine ops with a known factor structure (``Affine.factors``) apply ``W^T`` as transposed
  convolutions (``torch.nn.functional.conv_transpose2d``) and diagonal scalings, never as dense
  matrices; other affine ops use their dense ``W``.
- Relaxations: the triangle's upper chord; the lower line ``alpha z`` with ``a <= alpha <= 1``
  (``a`` the leaky slope), chosen adaptively (CROWN) or optimised by projected gradient descent
  on the bound (alpha-CROWN: Xu et al. 2021, "Fast and complete", sec. 3.1; Adam on ``alpha``,
  projection onto ``[a, 1]``; every iterate's bound is sound, the best is kept). Max-pool:
  ``y >= z_k`` for the input with the best lower bound, ``y = z_k`` when ``k`` dominates its
  window, else the constant max of the upper bounds.
- Split constraints from branch and bound (``splits``) clamp a neuron's pre-activation interval
  to ``[max(l, 0), u]`` or ``[l, min(u, 0)]``; the bounds then hold on the part of the box where
  the splits hold (an empty interval proves that part empty).

Everything runs in torch float64 (on a GPU when ``device`` is one). Float64 rounding: every
concretised bound is widened by ``ROUND_REL`` times the magnitude of the terms that produced it
(``|A| |x| + sum |A_l| |b_l|``), which exceeds the accumulated rounding error of the sums and
products by orders of magnitude (``n u`` with ``u = 2^-53`` and ``n`` the number of terms), and
by ``ROUND_ABS``.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from phalanx.errors import PhalanxError
from phalanx.verification.bounds import NetworkBounds
from phalanx.verification.ir import Affine, Conv, Dense, Diag, MaxPool, NetworkIR, Op, Relu, Residual

#: relative widening of every concretised bound (float64 rounding; see module docstring)
ROUND_REL = 1e-11
#: absolute widening of every concretised bound
ROUND_ABS = 1e-12
#: widening of the forward linear bounds that back-substituted bounds are intersected with
FLOOR_TOL = 1e-10
#: most rows of one backward pass (intermediate bounds are computed in chunks of this size)
CHUNK = 2048


@dataclass
class _Node:
    kind: str  # input | affine | act | maxpool | add
    srcs: tuple[int, ...]
    dim: int
    op: Op | None = None
    act: int = -1  # index of a nonlinear node in depth-first order (NetworkBounds.pre)
    slope: float = 0.0  # leaky slope of an act node


@dataclass
class Graph:
    """A network as nodes in topological order, with its tensors on one device."""

    nodes: list[_Node]
    acts: list[int]  # node id of every nonlinear op, in depth-first order
    in_dim: int
    device: torch.device
    tensors: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def _build(net: NetworkIR, device: torch.device) -> Graph:
    g = Graph([_Node("input", (), net.in_dim)], [], net.in_dim, device)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64, device=device)

    def add(ops: tuple[Op, ...], src: int) -> int:
        for op in ops:
            d = g.nodes[src].dim
            if isinstance(op, Affine):
                g.nodes.append(_Node("affine", (src,), int(op.weight.shape[0]), op))
                tens = {"b": t(op.bias)}
                if op.factors is not None and any(isinstance(f, Conv) for f in op.factors):
                    for i, f in enumerate(op.factors):
                        tens[f"f{i}"] = t(f.weight if isinstance(f, (Conv, Dense)) else f.scale)
                else:
                    tens["W"] = t(op.weight)
                g.tensors[len(g.nodes) - 1] = tens
            elif isinstance(op, Residual):
                a = add(op.branch, src)
                b = add(op.shortcut, src)
                g.nodes.append(_Node("add", (a, b), g.nodes[a].dim))
            elif isinstance(op, MaxPool):
                g.nodes.append(_Node("maxpool", (src,), len(op.groups), op, act=len(g.acts)))
                width = max(len(gr) for gr in op.groups)
                idx = np.zeros((len(op.groups), width), dtype=np.int64)
                mask = np.zeros((len(op.groups), width), dtype=bool)
                for j, gr in enumerate(op.groups):
                    idx[j, :len(gr)], mask[j, :len(gr)] = gr, True
                    idx[j, len(gr):] = gr[0]
                g.tensors[len(g.nodes) - 1] = {"idx": torch.as_tensor(idx, device=device),
                                               "mask": torch.as_tensor(mask, device=device)}
                g.acts.append(len(g.nodes) - 1)
            else:
                slope = 0.0 if isinstance(op, Relu) else float(op.slope)
                g.nodes.append(_Node("act", (src,), d, op, act=len(g.acts), slope=slope))
                g.acts.append(len(g.nodes) - 1)
            src = len(g.nodes) - 1
        return src

    add(net.ops, 0)
    return g


_GRAPHS: weakref.WeakKeyDictionary[NetworkIR, dict[str, Graph]] = weakref.WeakKeyDictionary()


def graph(net: NetworkIR, device: str | torch.device | None = None) -> Graph:
    """The (cached) node graph of ``net`` on ``device`` (default: CUDA when available, else CPU)."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    per = _GRAPHS.setdefault(net, {})
    if str(dev) not in per:
        per[str(dev)] = _build(net, dev)
    return per[str(dev)]


# ---------------------------------------------------------------------------------------------
# the backward pass


def _affine_t(g: Graph, i: int, a: torch.Tensor) -> torch.Tensor:
    """``A W`` for the rows of ``a`` (S, out): transposed convolutions where the structure is known."""
    node, tens = g.nodes[i], g.tensors[i]
    if "W" in tens:
        return a @ tens["W"]
    op = node.op
    assert isinstance(op, Affine) and op.factors is not None
    s = a.shape[0]
    for k in range(len(op.factors) - 1, -1, -1):
        f, w = op.factors[k], tens[f"f{k}"]
        if isinstance(f, Conv):
            oh, ow = f.out_shape[1:]
            ih, iw = f.in_shape[1:]
            kh, kw = f.weight.shape[2:]
            pad = tuple(int(n - ((o - 1) * st - 2 * p + dl * (kk - 1) + 1)) for n, o, st, p, dl, kk in
                        zip((ih, iw), (oh, ow), f.stride, f.padding, f.dilation, (kh, kw), strict=True))
            a = F.conv_transpose2d(a.reshape(s, *f.out_shape), w, None, f.stride, f.padding, pad, f.groups,
                                   f.dilation).reshape(s, -1)
        elif isinstance(f, Diag):
            a = a * w
        else:
            a = a @ w
    return a


@dataclass
class Relax:
    """Linear relaxations of the nonlinear nodes given their pre-activation bounds."""

    pre: list[tuple[torch.Tensor, torch.Tensor]]
    #: optional optimised lower slopes: act index -> (S, n) tensor (rows of the current pass)
    alpha: dict[int, torch.Tensor] = field(default_factory=dict)
    #: split signs (act index -> (n,) in {-1, 0, 1}) and their multipliers ``beta >= 0`` ((S, n))
    signs: dict[int, torch.Tensor] = field(default_factory=dict)
    beta: dict[int, torch.Tensor] = field(default_factory=dict)


def _act_relax(lo: torch.Tensor, hi: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    """(upper slope, upper intercept, adaptive lower slope, unstable mask) of ``max(z, a z)``."""
    active, inactive = lo >= 0, hi <= 0
    unstable = ~(active | inactive)
    denom = torch.where(unstable, hi - lo, torch.ones_like(lo))
    chord = (hi - a * lo) / denom
    su = torch.where(active, torch.ones_like(lo), torch.where(inactive, torch.full_like(lo, a), chord))
    tu = torch.where(unstable, (a - chord) * lo, torch.zeros_like(lo))
    sl = torch.where(active | (unstable & (hi > -lo)), torch.ones_like(lo), torch.full_like(lo, a))
    return su, tu, sl, unstable


def backward(g: Graph, target: int, a: torch.Tensor, relax: Relax, x_lo: torch.Tensor, x_hi: torch.Tensor,
             record: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Upper bounds of the rows of ``a . h_target`` as linear forms of the input.

    Returns ``(A_in, c, c_abs, recorded)`` with ``a . h_target <= A_in x + c`` for every ``x`` in
    the box (where the splits hold); ``c_abs`` is the magnitude of the constant's terms (for
    the rounding widening), ``recorded`` the coefficients reaching each act node's output
    (act index -> (S, n)) when ``record``."""
    s = a.shape[0]
    acc: dict[int, torch.Tensor] = {target: a}
    c = torch.zeros(s, dtype=a.dtype, device=a.device)
    c_abs = torch.zeros_like(c)
    rec: dict[int, torch.Tensor] = {}

    def push(i: int, v: torch.Tensor) -> None:
        acc[i] = acc[i] + v if i in acc else v

    for i in range(target, 0, -1):
        cur = acc.pop(i, None)
        if cur is None:
            continue
        node = g.nodes[i]
        if node.kind == "affine":
            b = g.tensors[i]["b"]
            c = c + cur @ b
            c_abs = c_abs + cur.abs() @ b.abs()
            push(node.srcs[0], _affine_t(g, i, cur))
        elif node.kind == "add":
            push(node.srcs[0], cur)
            push(node.srcs[1], cur)
        elif node.kind == "act":
            lo, hi = relax.pre[node.act]
            su, tu, sl, unstable = _act_relax(lo, hi, node.slope)
            if node.act in relax.alpha:
                sl = torch.where(unstable, relax.alpha[node.act], sl)
            if record:
                rec[node.act] = cur
            pos, neg = cur.clamp(min=0.0), cur.clamp(max=0.0)
            c = c + pos @ tu
            c_abs = c_abs + pos @ tu.abs()
            lin = pos * su + neg * sl
            if node.act in relax.beta:  # Lagrangian term beta * s * z >= 0 of the splits s z >= 0
                lin = lin + relax.beta[node.act] * relax.signs[node.act].to(lin.dtype)
            push(node.srcs[0], lin)
        elif node.kind == "maxpool":
            lo, hi = relax.pre[node.act]
            idx, mask = g.tensors[i]["idx"], g.tensors[i]["mask"]
            glo = torch.where(mask, lo[idx], torch.full_like(idx, -np.inf, dtype=lo.dtype))
            best_pos = glo.argmax(dim=1)
            best = idx.gather(1, best_pos[:, None])[:, 0]
            best_lo = lo[best]
            ghi = torch.where(mask, hi[idx], torch.full_like(idx, -np.inf, dtype=hi.dtype))
            others = ghi.scatter(1, best_pos[:, None], -np.inf).max(dim=1).values
            stable = best_lo >= others
            hmax = ghi.max(dim=1).values
            if record:
                rec[node.act] = cur
            pos, neg = cur.clamp(min=0.0), cur.clamp(max=0.0)
            coef = neg + pos * stable
            const = pos * (~stable) * hmax
            c = c + const.sum(1)
            c_abs = c_abs + const.abs().sum(1)
            out = torch.zeros(s, g.nodes[node.srcs[0]].dim, dtype=cur.dtype, device=cur.device)
            push(node.srcs[0], out.index_add(1, best, coef))
        else:  # pragma: no cover - the graph has no other kinds
            raise PhalanxError(f"unknown node kind {node.kind}")
    a_in = acc.pop(0, torch.zeros(s, g.in_dim, dtype=a.dtype, device=a.device))
    return a_in, c, c_abs, rec


def concretize_upper(a_in: torch.Tensor, c: torch.Tensor, c_abs: torch.Tensor, x_lo: torch.Tensor,
                     x_hi: torch.Tensor) -> torch.Tensor:
    """``max over the box of A x + c``, widened for float64 rounding (``ROUND_REL``, ``ROUND_ABS``)."""
    val = a_in.clamp(min=0.0) @ x_hi + a_in.clamp(max=0.0) @ x_lo + c
    mag = a_in.abs() @ torch.maximum(x_lo.abs(), x_hi.abs()) + c_abs + c.abs()
    return val + ROUND_REL * mag + ROUND_ABS


def _upper(g: Graph, target: int, a: torch.Tensor, relax: Relax, x_lo: torch.Tensor,
           x_hi: torch.Tensor) -> torch.Tensor:
    a_in, c, c_abs, _ = backward(g, target, a, relax, x_lo, x_hi)
    return concretize_upper(a_in, c, c_abs, x_lo, x_hi)


# ---------------------------------------------------------------------------------------------
# intermediate bounds, layer by layer


def _interval(g: Graph, i: int, b: dict[int, tuple[torch.Tensor, torch.Tensor]],
              relax: Relax) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval arithmetic for node ``i`` from the (refined) bounds of its sources."""
    node = g.nodes[i]
    if node.kind == "affine":
        lo, hi = b[node.srcs[0]]
        mid, rad = (lo + hi) / 2, (hi - lo) / 2
        op = node.op
        assert isinstance(op, Affine)
        tens = g.tensors[i]
        if "W" in tens:
            w = tens["W"]
            cm, cr, mag = mid @ w.T + tens["b"], rad @ w.abs().T, mid.abs() @ w.abs().T
        else:
            cm = _apply(g, i, mid[None], absolute=False)[0] + tens["b"]
            cr = _apply(g, i, rad[None], absolute=True)[0]
            mag = _apply(g, i, mid.abs()[None], absolute=True)[0]
        cr = cr + ROUND_REL * (mag + tens["b"].abs() + cr) + ROUND_ABS
        return cm - cr, cm + cr
    if node.kind == "add":
        (l1, h1), (l2, h2) = b[node.srcs[0]], b[node.srcs[1]]
        return l1 + l2, h1 + h2
    lo, hi = relax.pre[node.act]
    if node.kind == "act":
        a = node.slope
        return torch.where(lo >= 0, lo, a * lo), torch.where(hi >= 0, hi, a * hi)
    idx, mask = g.tensors[i]["idx"], g.tensors[i]["mask"]
    neg = torch.full_like(idx, -np.inf, dtype=lo.dtype)
    return torch.where(mask, lo[idx], neg).max(1).values, torch.where(mask, hi[idx], neg).max(1).values


def _apply(g: Graph, i: int, h: torch.Tensor, absolute: bool) -> torch.Tensor:
    """``h W^T`` (or ``h |W|^T``) through the factors of affine node ``i``."""
    op = g.nodes[i].op
    assert isinstance(op, Affine) and op.factors is not None
    tens = g.tensors[i]
    for k, f in enumerate(op.factors):
        w = tens[f"f{k}"].abs() if absolute else tens[f"f{k}"]
        if isinstance(f, Conv):
            h = F.conv2d(h.reshape(-1, *f.in_shape), w, None, f.stride, f.padding, f.dilation,
                         f.groups).reshape(h.shape[0], -1)
        elif isinstance(f, Diag):
            h = h * w
        else:
            h = h @ w.T
    return h


def _refine(g: Graph, i: int, lo: torch.Tensor, hi: torch.Tensor, relax: Relax, x_lo: torch.Tensor,
            x_hi: torch.Tensor, only: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersect node ``i``'s bounds with back-substitution for the rows ``only`` (all when None);
    a first affine layer (or the input) is exact by interval arithmetic already."""
    node = g.nodes[i]
    if i == 0 or (node.kind == "affine" and node.srcs[0] == 0):
        return lo, hi
    rows = torch.arange(node.dim, device=lo.device) if only is None else torch.nonzero(only)[:, 0]
    lo, hi = lo.clone(), hi.clone()
    for start in range(0, rows.numel(), CHUNK // 2):
        r = rows[start:start + CHUNK // 2]
        n = r.numel()
        a = torch.zeros(2 * n, node.dim, dtype=lo.dtype, device=lo.device)
        a[torch.arange(n), r] = 1.0
        a[torch.arange(n, 2 * n), r] = -1.0
        up = _upper(g, i, a, relax, x_lo, x_hi)
        hi[r] = torch.minimum(hi[r], up[:n])
        lo[r] = torch.maximum(lo[r], -up[n:])
    return lo, hi


@dataclass
class PreBounds:
    """Pre-activation bounds per nonlinear node (depth-first order), whether the split domain
    can be non-empty, and interval bounds of the output."""

    pre: list[tuple[torch.Tensor, torch.Tensor]]
    feasible: bool
    out: tuple[torch.Tensor, torch.Tensor]
    #: interval bounds of the last affine node's input (None when the network does not end affine)
    last_in: tuple[torch.Tensor, torch.Tensor] | None = None


def pre_bounds(g: Graph, x_lo: torch.Tensor, x_hi: torch.Tensor, splits: dict[int, torch.Tensor] | None = None,
               floor: list[tuple[torch.Tensor, torch.Tensor]] | None = None, start: int = 0) -> PreBounds:
    """Pre-activation bounds of every nonlinear node, layer by layer (back-substitution to the
    input, intersected with interval arithmetic on the refined bounds).

    ``floor``: sound bounds to intersect with (e.g. forward linear bounds, or a branch-and-bound
    parent's bounds, which hold on a superset of the domain); nonlinear nodes before ``start``
    take ``floor``'s bounds as they are. ``splits``: act index -> (n,) signs (+1 active, -1
    inactive, 0 free). ``feasible`` is False when a split contradicts the bounds (that part of
    the box is empty)."""
    relax = Relax([])
    b: dict[int, tuple[torch.Tensor, torch.Tensor]] = {0: (x_lo, x_hi)}
    feasible = True
    for i in range(1, len(g.nodes)):
        node = g.nodes[i]
        if node.kind in ("act", "maxpool"):
            k = node.act
            if floor is not None and k < start:
                lo, hi = floor[k]
            else:
                plo, phi = b[node.srcs[0]]
                src = g.nodes[node.srcs[0]]
                # an activation's output bounds are exact from its input's (monotone, elementwise);
                # a ReLU needs tight bounds only where interval arithmetic leaves it unstable
                only = None if node.kind == "maxpool" else (plo < 0) & (phi > 0)
                if src.kind != "act":
                    lo, hi = _refine(g, node.srcs[0], plo, phi, relax, x_lo, x_hi, only)
                else:
                    lo, hi = plo, phi
                if floor is not None:
                    lo, hi = torch.maximum(lo, floor[k][0]), torch.minimum(hi, floor[k][1])
            if splits is not None and k in splits:
                sg = splits[k]
                lo = torch.where(sg > 0, lo.clamp(min=0.0), lo)
                hi = torch.where(sg < 0, hi.clamp(max=0.0), hi)
            if bool((lo > hi).any()):
                feasible = False
                hi = torch.maximum(hi, lo)
            relax.pre.append((lo, hi))
            b[node.srcs[0]] = (lo, hi)
        b[i] = _interval(g, i, b, relax)
    last = g.nodes[-1]
    return PreBounds(relax.pre, feasible, b[len(g.nodes) - 1], b[last.srcs[0]] if last.kind == "affine" else None)


def spec_interval(g: Graph, pb: PreBounds, spec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval bounds of ``spec @ y`` with the spec folded into the last affine layer (correlated
    logits cancel), widened for rounding like every concretised bound."""
    if pb.last_in is None:
        lo, hi = pb.out
        w, b = spec, torch.zeros(spec.shape[0], dtype=spec.dtype, device=spec.device)
    else:
        lo, hi = pb.last_in
        w = _affine_t(g, len(g.nodes) - 1, spec)
        b = spec @ g.tensors[len(g.nodes) - 1]["b"]
        b_abs = spec.abs() @ g.tensors[len(g.nodes) - 1]["b"].abs()
    up = concretize_upper(w, b, spec.abs() @ pb.out[1].abs() if pb.last_in is None else b_abs, lo, hi)
    down = -concretize_upper(-w, -b, spec.abs() @ pb.out[1].abs() if pb.last_in is None else b_abs, lo, hi)
    return down, up


# ---------------------------------------------------------------------------------------------
# objectives: spec rows at the output, optionally with optimised slopes


@dataclass
class Part:
    """One network's share of a joint objective: ``spec`` rows on its output, its relaxations."""

    g: Graph
    spec: torch.Tensor
    relax: Relax
    splits: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Forms:
    """Upper linear forms ``A x + c`` of the joint objective rows, valid on the (split) box."""

    a: torch.Tensor
    c: torch.Tensor
    c_abs: torch.Tensor
    #: per part: coefficients reaching each act node's output (act index -> (S, n)), if recorded
    rec: list[dict[int, torch.Tensor]]

    def upper(self, x_lo: torch.Tensor, x_hi: torch.Tensor) -> torch.Tensor:
        return concretize_upper(self.a, self.c, self.c_abs, x_lo, x_hi)


def _joint(parts: list[Part], x_lo: torch.Tensor, x_hi: torch.Tensor, alphas: list[dict[int, torch.Tensor]],
           record: bool, betas: list[dict[int, torch.Tensor]] | None = None) -> Forms:
    s = parts[0].spec.shape[0]
    a = torch.zeros(s, x_lo.numel(), dtype=x_lo.dtype, device=x_lo.device)
    c, c_abs = torch.zeros(s, dtype=a.dtype, device=a.device), torch.zeros(s, dtype=a.dtype, device=a.device)
    recs = []
    for n, (p, al) in enumerate(zip(parts, alphas, strict=True)):
        relax = Relax(p.relax.pre, al, p.splits, {} if betas is None else betas[n])
        pa, pc, pabs, rec = backward(p.g, len(p.g.nodes) - 1, p.spec, relax, x_lo, x_hi, record)
        a, c, c_abs = a + pa, c + pc, c_abs + pabs
        recs.append(rec)
    return Forms(a, c, c_abs, recs)


def joint_forms(parts: list[Part], x_lo: torch.Tensor, x_hi: torch.Tensor, alpha_steps: int = 0, lr: float = 0.1,
                record: bool = False, deadline: float | None = None) -> Forms:
    """Upper linear forms of ``sum_p spec_p @ y_p`` over networks sharing one input: each part
    is back-substituted through its own network and the forms are added *before* concretising
    (the block-diagonal wide network with a shared input; tighter than adding bounds).

    With ``alpha_steps > 0`` the lower slopes of unstable (leaky) ReLUs of every part are
    optimised per row by Adam on the concretised joint upper bound, projected onto ``[a, 1]``
    (alpha-CROWN; stopped early at ``deadline``, a ``time.perf_counter()`` value), together with one multiplier ``beta >= 0`` per split neuron and row: the
    split ``s z >= 0`` holds on the domain, so ``f <= f + beta s z`` there and the backward pass
    may add ``beta s`` to ``z``'s coefficient (beta-CROWN, Wang et al. 2021, eq. 6). The form
    with the best bound of each row is kept (every iterate is sound)."""
    with torch.no_grad():
        best = _joint(parts, x_lo, x_hi, [{} for _ in parts], record and alpha_steps <= 0)
    if alpha_steps <= 0:
        return best
    params: list[dict[int, torch.Tensor]] = []
    for p in parts:
        ps: dict[int, torch.Tensor] = {}
        for i in p.g.acts:
            node = p.g.nodes[i]
            if node.kind != "act":
                continue
            lo, hi = p.relax.pre[node.act]
            _, _, sl, unstable = _act_relax(lo, hi, node.slope)
            if bool(unstable.any()):
                ps[node.act] = sl.expand(p.spec.shape[0], -1).clone().requires_grad_(True)
        params.append(ps)
    betas = [{k: torch.zeros(p.spec.shape[0], sg.numel(), dtype=p.spec.dtype, device=p.spec.device,
                             requires_grad=True) for k, sg in p.splits.items()} for p in parts]
    flat = [t for ps in params for t in ps.values()]
    flat_beta = [t for bs in betas for t in bs.values()]
    if not flat and not flat_beta:
        return _joint(parts, x_lo, x_hi, [{} for _ in parts], record) if record else best
    best_up = best.upper(x_lo, x_hi)
    groups = [{"params": flat, "lr": lr}] if flat else []
    if flat_beta:
        groups.append({"params": flat_beta, "lr": lr / 2})
    opt = torch.optim.Adam(groups)
    for _ in range(alpha_steps):
        if deadline is not None and time.perf_counter() > deadline:
            break  # the best iterate so far is sound
        opt.zero_grad()
        f = _joint(parts, x_lo, x_hi, params, False, betas)
        up = f.upper(x_lo, x_hi)
        with torch.no_grad():
            better = up < best_up
            best_up = torch.where(better, up, best_up)
            best.a[better], best.c[better], best.c_abs[better] = f.a[better], f.c[better], f.c_abs[better]
        up.sum().backward()
        opt.step()
        with torch.no_grad():
            for p, ps in zip(parts, params, strict=True):
                for k, t in ps.items():
                    t.clamp_(min=p.g.nodes[p.g.acts[k]].slope, max=1.0)
            for t in flat_beta:
                t.clamp_(min=0.0)
    if record:  # coefficients for branching scores, with the optimised slopes
        with torch.no_grad():
            best.rec = _joint(parts, x_lo, x_hi, [{k: t.detach() for k, t in ps.items()} for ps in params], True,
                              [{k: t.detach() for k, t in bs.items()} for bs in betas]).rec
    return Forms(best.a.detach(), best.c.detach(), best.c_abs.detach(), best.rec)


def _tensor(a: np.ndarray, g: Graph) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64), device=g.device)


def forward_floor(net: NetworkIR, lo: np.ndarray, hi: np.ndarray, g: Graph) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The forward linear bounds (``bounds.linear_bounds``) of every nonlinear node, as tensors,
    widened by ``FLOOR_TOL`` relative (plus absolute): ``bounds.py`` does not widen for rounding,
    and its bounds are attained at box vertices up to the last bit."""
    from phalanx.verification.bounds import linear_bounds

    def widen(v: np.ndarray, sign: float) -> torch.Tensor:
        return _tensor(v + sign * FLOOR_TOL * (1.0 + np.abs(v)), g)

    return [(widen(a, -1.0), widen(b, 1.0)) for a, b in linear_bounds(net, lo, hi).pre]


def crown_bounds(net: NetworkIR, lo: np.ndarray, hi: np.ndarray, spec: np.ndarray | None = None, *,
                 alpha_steps: int = 0, forward: bool = True,
                 device: str | torch.device | None = None) -> NetworkBounds:
    """CROWN bounds (alpha-CROWN on the output rows with ``alpha_steps > 0``); with ``spec``
    (s, out_dim) the output bounds are those of ``spec @ y``. Same result type as
    :func:`~phalanx.verification.bounds.linear_bounds`. With ``forward`` the intermediate bounds
    are also intersected with the forward linear bounds, so they are never looser than those
    (back-substitution alone can be looser on single neurons, e.g. behind residual blocks)."""
    from phalanx.verification.bounds import _check_box

    lo, hi = _check_box(net, lo, hi)
    g = graph(net, device)
    x_lo, x_hi = _tensor(lo, g), _tensor(hi, g)
    with torch.no_grad():
        pb = pre_bounds(g, x_lo, x_hi, floor=forward_floor(net, lo, hi, g) if forward else None)
    pre = pb.pre
    c = np.eye(net.out_dim) if spec is None else np.asarray(spec, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != net.out_dim:
        raise PhalanxError(f"spec must have shape (s, {net.out_dim}), got {c.shape}")
    ct = _tensor(np.concatenate([c, -c]), g)
    forms = joint_forms([Part(g, ct, Relax(pre))], x_lo, x_hi, alpha_steps)
    with torch.no_grad():
        up = forms.upper(x_lo, x_hi).cpu().numpy()
    s = c.shape[0]
    out_lo, out_hi = -up[s:], up[:s]
    with torch.no_grad():  # intersect with interval arithmetic on the refined bounds
        ilo, ihi = spec_interval(g, pb, ct[:s])
    out_lo, out_hi = np.maximum(out_lo, ilo.cpu().numpy()), np.minimum(out_hi, ihi.cpu().numpy())
    return NetworkBounds(tuple((a.cpu().numpy(), b.cpu().numpy()) for a, b in pre), (out_lo, np.maximum(out_hi, out_lo)))
