"""Sound pre-activation bounds of a :class:`~phalanx.verification.ir.NetworkIR` on an L-inf box.

Two domains share one walk over the ops:

- ``interval_bounds``: interval arithmetic (IBP);
- ``linear_bounds``: every neuron carries a lower and an upper linear function of the input
  (``L x + l <= h <= U x + u``), propagated forward through affine ops exactly and through
  nonlinear ops by the standard linear relaxations: the triangle's upper chord and CROWN's
  adaptive lower slope for (leaky) ReLU (Zhang et al. 2018; DeepPoly, Singh et al. 2019), the
  best single input as lower bound of a max-pool. After every op the concrete bounds are the
  intersection with interval arithmetic on the previous concrete bounds, so the linear bounds are
  never looser than ``interval_bounds``.

All arithmetic is float64. Bounds set the big-M constants of the MILP, drop the binaries of
stable neurons, and prove easy queries without a solver (``DESIGN.md``, soundness first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phalanx.errors import PhalanxError
from phalanx.verification.ir import Affine, MaxPool, NetworkIR, Op, Relu, Residual


@dataclass(frozen=True, eq=False)
class NetworkBounds:
    """Pre-activation ``(lower, upper)`` per nonlinear op (depth-first order), and the output's."""

    pre: tuple[tuple[np.ndarray, np.ndarray], ...]
    output: tuple[np.ndarray, np.ndarray]

    @property
    def num_unstable(self) -> int:
        """Neurons whose pre-activation interval straddles zero (ReLU / leaky ReLU inputs)."""
        return int(sum(int(np.sum((lo < 0) & (hi > 0))) for lo, hi in self.pre))


@dataclass
class _State:
    lo: np.ndarray
    hi: np.ndarray
    # symbolic forms: lower = Lw @ x + lb, upper = Uw @ x + ub (None in the interval domain)
    lw: np.ndarray | None = None
    lb: np.ndarray | None = None
    uw: np.ndarray | None = None
    ub: np.ndarray | None = None


def _pos_neg(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(w, 0.0), np.minimum(w, 0.0)


class _Walker:
    def __init__(self, x_lo: np.ndarray, x_hi: np.ndarray, symbolic: bool) -> None:
        self.x_lo, self.x_hi, self.symbolic = x_lo, x_hi, symbolic
        self.pre: list[tuple[np.ndarray, np.ndarray]] = []

    def concretize(self, w: np.ndarray, b: np.ndarray, upper: bool) -> np.ndarray:
        wp, wn = _pos_neg(w)
        if upper:
            return wp @ self.x_hi + wn @ self.x_lo + b  # type: ignore[no-any-return]
        return wp @ self.x_lo + wn @ self.x_hi + b  # type: ignore[no-any-return]

    def tighten(self, s: _State, lo: np.ndarray, hi: np.ndarray) -> _State:
        """Intersect the interval-arithmetic bounds with the concretized symbolic ones."""
        if s.lw is not None:
            assert s.lb is not None and s.uw is not None and s.ub is not None
            lo = np.maximum(lo, self.concretize(s.lw, s.lb, upper=False))
            hi = np.minimum(hi, self.concretize(s.uw, s.ub, upper=True))
        s.lo, s.hi = lo, np.maximum(hi, lo)
        return s

    def run(self, ops: tuple[Op, ...], s: _State) -> _State:
        for op in ops:
            s = self.step(op, s)
        return s

    def step(self, op: Op, s: _State) -> _State:
        if isinstance(op, Affine):
            wp, wn = _pos_neg(op.weight)
            lo = wp @ s.lo + wn @ s.hi + op.bias
            hi = wp @ s.hi + wn @ s.lo + op.bias
            out = _State(lo, hi)
            if s.lw is not None:
                assert s.lb is not None and s.uw is not None and s.ub is not None
                out.lw = wp @ s.lw + wn @ s.uw
                out.lb = wp @ s.lb + wn @ s.ub + op.bias
                out.uw = wp @ s.uw + wn @ s.lw
                out.ub = wp @ s.ub + wn @ s.lb + op.bias
            return self.tighten(out, lo, hi)
        if isinstance(op, Residual):
            a = self.run(op.branch, _State(s.lo, s.hi, s.lw, s.lb, s.uw, s.ub))
            b = self.run(op.shortcut, _State(s.lo, s.hi, s.lw, s.lb, s.uw, s.ub))
            out = _State(a.lo + b.lo, a.hi + b.hi)
            if a.lw is not None and b.lw is not None:
                out.lw, out.lb = a.lw + b.lw, a.lb + b.lb  # type: ignore[operator]
                out.uw, out.ub = a.uw + b.uw, a.ub + b.ub  # type: ignore[operator]
            return self.tighten(out, out.lo, out.hi)
        self.pre.append((s.lo.copy(), s.hi.copy()))
        if isinstance(op, MaxPool):
            return self.maxpool(op, s)
        slope = 0.0 if isinstance(op, Relu) else float(op.slope)
        return self.leaky(slope, s)

    def leaky(self, a: float, s: _State) -> _State:
        """``f(h) = max(h, a h)``, ``0 <= a <= 1`` (ReLU is ``a = 0``): convex, so the chord is an
        upper bound and any line ``alpha h`` with ``a <= alpha <= 1`` is a lower bound."""
        lo, hi = s.lo, s.hi
        lo_out = np.where(lo >= 0, lo, a * lo)
        hi_out = np.where(hi >= 0, hi, a * hi)
        out = _State(lo_out, hi_out)
        if s.lw is None:
            return out
        assert s.lb is not None and s.uw is not None and s.ub is not None
        active, inactive = lo >= 0, hi <= 0
        unstable = ~(active | inactive)
        # lower: slope alpha (CROWN's adaptive choice), applied to the lower form
        alpha = np.where(active, 1.0, np.where(inactive, a, np.where(hi > -lo, 1.0, a)))
        # upper: identity / a*h on stable neurons, the chord through (l, a l) and (u, u) otherwise
        denom = np.where(unstable, hi - lo, 1.0)
        chord = np.where(unstable, (hi - a * lo) / denom, 0.0)
        up_slope = np.where(active, 1.0, np.where(inactive, a, chord))
        up_shift = np.where(unstable, a * lo - chord * lo, 0.0)
        out.lw, out.lb = alpha[:, None] * s.lw, alpha * s.lb
        out.uw, out.ub = up_slope[:, None] * s.uw, up_slope * s.ub + up_shift
        return self.tighten(out, lo_out, hi_out)

    def maxpool(self, op: MaxPool, s: _State) -> _State:
        n = len(op.groups)
        lo_out, hi_out = np.empty(n), np.empty(n)
        best = np.empty(n, dtype=np.int64)
        stable = np.zeros(n, dtype=bool)
        for j, g in enumerate(op.groups):
            k = int(g[np.argmax(s.lo[g])])
            best[j] = k
            lo_out[j], hi_out[j] = s.lo[k], s.hi[g].max()
            others = g[g != k]
            stable[j] = others.size == 0 or s.lo[k] >= s.hi[others].max()
        out = _State(lo_out, hi_out)
        if s.lw is None:
            return out
        assert s.lb is not None and s.uw is not None and s.ub is not None
        # lower: y >= h_k for the input with the best lower bound; upper: y = h_k when k
        # dominates its group, otherwise the constant max of the upper bounds
        out.lw, out.lb = s.lw[best], s.lb[best]
        out.uw = np.where(stable[:, None], s.uw[best], 0.0)
        out.ub = np.where(stable, s.ub[best], hi_out)
        return self.tighten(out, lo_out, hi_out)


def _check_box(net: NetworkIR, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = np.asarray(lo, dtype=np.float64).reshape(-1)
    hi = np.asarray(hi, dtype=np.float64).reshape(-1)
    if lo.shape != (net.in_dim,) or hi.shape != (net.in_dim,):
        raise PhalanxError(f"input box must have {net.in_dim} entries, got {lo.shape} and {hi.shape}")
    if np.any(lo > hi):
        raise PhalanxError("input box has lo > hi")
    return lo, hi


def _with_spec(net: NetworkIR, spec: np.ndarray | None) -> tuple[Op, ...]:
    """Fold a linear output specification ``C y`` into the last affine op (tighter than bounding
    ``y`` first, since correlated logits cancel)."""
    if spec is None:
        return net.ops
    c = np.asarray(spec, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != net.out_dim:
        raise PhalanxError(f"spec must have shape (s, {net.out_dim}), got {c.shape}")
    last = net.ops[-1] if net.ops else None
    if isinstance(last, Affine):
        return (*net.ops[:-1], Affine(c @ last.weight, c @ last.bias))
    return (*net.ops, Affine(c, np.zeros(c.shape[0])))


def _bounds(net: NetworkIR, lo: np.ndarray, hi: np.ndarray, spec: np.ndarray | None,
            symbolic: bool) -> NetworkBounds:
    lo, hi = _check_box(net, lo, hi)
    w = _Walker(lo, hi, symbolic)
    s = _State(lo.copy(), hi.copy())
    ops = _with_spec(net, spec)
    if symbolic:
        s, ops = _exact_prefix(w, s, ops, net.in_dim)
    out = w.run(ops, s)
    return NetworkBounds(tuple(w.pre), (out.lo, out.hi))


def _exact_prefix(w: _Walker, s: _State, ops: tuple[Op, ...], in_dim: int) -> tuple[_State, tuple[Op, ...]]:
    """The state after the leading affine ops, whose lower and upper forms are both the exact
    composed map ``W x + b`` (what pushing identity forms through them gives, without the
    products with an ``in_dim x in_dim`` identity, which made the pass on a 784-input MLP with
    an input normalisation ten times slower); the remaining ops."""
    k, wt, b = 0, None, None
    while k < len(ops) and isinstance(ops[k], Affine):
        op = ops[k]
        assert isinstance(op, Affine)
        wt = op.weight if wt is None else op.weight @ wt
        b = op.bias if b is None else op.weight @ b + op.bias
        wp, wn = _pos_neg(op.weight)
        lo, hi = wp @ s.lo + wn @ s.hi + op.bias, wp @ s.hi + wn @ s.lo + op.bias
        if k == 0:  # the form is the op itself on the input box: concretizing it is this very interval
            s = _State(lo, np.maximum(hi, lo), wt, b, wt, b)
        else:
            s = w.tighten(_State(lo, hi, wt, b, wt, b), lo, hi)
        k += 1
    if wt is None:
        s.lw, s.uw = np.eye(in_dim), np.eye(in_dim)
        s.lb, s.ub = np.zeros(in_dim), np.zeros(in_dim)
    return s, ops[k:]


def interval_bounds(net: NetworkIR, lo: np.ndarray, hi: np.ndarray, spec: np.ndarray | None = None) -> NetworkBounds:
    """Interval bounds; with ``spec`` (s, out_dim), the output bounds are those of ``spec @ y``."""
    return _bounds(net, lo, hi, spec, symbolic=False)


def linear_bounds(net: NetworkIR, lo: np.ndarray, hi: np.ndarray, spec: np.ndarray | None = None) -> NetworkBounds:
    """Symbolic linear-relaxation bounds (DeepPoly/CROWN style), never looser than interval."""
    return _bounds(net, lo, hi, spec, symbolic=True)


def ball(x0: np.ndarray, eps: float, bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """The L-inf ball of radius ``eps`` around ``x0`` intersected with the input box."""
    x = np.asarray(x0, dtype=np.float64).reshape(-1)
    return np.clip(x - eps, bounds[0], bounds[1]), np.clip(x + eps, bounds[0], bounds[1])
