"""MILP building blocks shared by the fooling-pattern queries and the monolithic MILP:
the eps-ball around a point (L1 with auxiliary ``|delta|`` variables, or L-inf) and the
"classifier c misclassifies x^j" constraint, optionally switched on by a 0-1 loss indicator.

Networks are encoded only by ``phalanx.verification.milp.encode_network`` (one encoder)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from phalanx.types import Norm
from phalanx.verification.bounds import NetworkBounds, linear_bounds
from phalanx.verification.ir import NetworkIR
from phalanx.verification.milp import MilpModel, encode_network


def ball_box(x0: np.ndarray, eps: float, bounds: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """The coordinate box containing the eps-ball (of either norm, since ``|delta_k| <= eps``)
    intersected with the input box."""
    x = np.asarray(x0, dtype=np.float64).reshape(-1)
    lo, hi = x - eps, x + eps
    if bounds is not None:
        lo, hi = np.clip(lo, bounds[0], bounds[1]), np.clip(hi, bounds[0], bounds[1])
    return lo, hi


def add_perturbed_point(model: MilpModel, x0: np.ndarray, eps: float, norm: Norm,
                        bounds: tuple[float, float] | None) -> np.ndarray:
    """Variables ``x' = x0 + delta`` with ``||delta|| <= eps`` and ``x'`` in the input box.

    L1 (Gross et al. eq. (5)): auxiliary ``u_k >= |delta_k|`` (``u_k >= x'_k - x0_k`` and
    ``u_k >= x0_k - x'_k``) and ``sum_k u_k <= eps``. L-inf: the box alone."""
    x = np.asarray(x0, dtype=np.float64).reshape(-1)
    lo, hi = ball_box(x, eps, bounds)
    xv = model.add_vars(lo, hi)
    if norm is Norm.L1 and eps < float(np.sum(hi - lo)):
        u = model.add_vars(np.zeros(x.size), np.maximum(x - lo, hi - x))
        for k in range(x.size):
            model.add_row([int(u[k]), int(xv[k])], [1.0, -1.0], -x[k], math.inf)
            model.add_row([int(u[k]), int(xv[k])], [1.0, 1.0], x[k], math.inf)
        model.add_row(list(u), [1.0] * x.size, -math.inf, float(eps))
    return xv


@dataclass
class EncodedPoint:
    """Bounds of one classifier on one point's ball: those of the logits (for the network
    encoding) and those of ``z_r - z_y`` for every wrong label r (for the loss big-M)."""

    bounds: NetworkBounds
    diff_lo: np.ndarray  # (K-1,) lower bounds of z_r - z_y over r != y
    diff_hi: np.ndarray
    wrong: np.ndarray  # the labels r != y


def point_bounds(net: NetworkIR, x0: np.ndarray, y: int, eps: float,
                 bounds: tuple[float, float] | None) -> EncodedPoint:
    lo, hi = ball_box(x0, eps, bounds)
    nb = linear_bounds(net, lo, hi)
    wrong = np.array([r for r in range(net.out_dim) if r != y], dtype=np.int64)
    spec = np.zeros((wrong.size, net.out_dim))
    spec[np.arange(wrong.size), wrong] = 1.0
    spec[:, y] = -1.0
    sb = linear_bounds(net, lo, hi, spec=spec)
    return EncodedPoint(nb, sb.output[0], sb.output[1], wrong)


def can_misclassify(enc: EncodedPoint, margin: float) -> bool:
    """False when bounds alone prove no wrong label can beat the true one by ``margin``."""
    return bool((enc.diff_hi >= margin).any())


def add_misclassified(model: MilpModel, net: NetworkIR, xv: np.ndarray, enc: EncodedPoint, y: int,
                      margin: float, indicator: int | None = None, margin_var: int | None = None) -> None:
    """Encode ``net`` on ``xv`` and require some wrong label r with ``z_r - z_y >= margin``.

    Without ``indicator`` the constraint always holds. With a binary ``indicator`` l (the 0-1
    loss ``l^c_{i,j}`` of eq. (8)) it holds when ``l = 1``: selectors ``s_r`` with
    ``sum_r s_r = l`` and ``z_r - z_y >= margin - M_r (1 - s_r)``, ``M_r = margin - lower(z_r - z_y)``.
    (The implication ``l = 1 => misclassified`` suffices: the attacker maximises, so ``l`` is 1
    whenever it can be; it makes optimal values and robustness proofs exact.)

    With ``margin_var`` (a variable ``m`` in ``[0, margin]``) the margin is ``m`` instead of the
    constant: ``z_r - z_y >= m``, so a model can maximise the smallest margin of several networks."""
    z = encode_network(model, net, xv, enc.bounds)
    need = 0.0 if margin_var is not None else margin  # m may be 0: only bounds < 0 rule a label out
    live = [k for k in range(enc.wrong.size) if enc.diff_hi[k] >= need]
    if not live:
        if indicator is None:
            v = model.add_var(0.0, 0.0)  # infeasible on purpose: the bounds proved it
            model.add_row([v], [1.0], 1.0, math.inf)
        else:
            model.tighten(np.array([indicator]), np.array([0.0]), np.array([0.0]))
        return
    mv = [] if margin_var is None else [int(margin_var)]
    mc = [] if margin_var is None else [-1.0]
    const = 0.0 if margin_var is not None else margin  # the margin as a constant or as -m in the row
    if indicator is None and len(live) == 1:
        r = int(enc.wrong[live[0]])
        model.add_row([int(z[r]), int(z[y]), *mv], [1.0, -1.0, *mc], const, math.inf)
        return
    sel = model.add_vars(np.zeros(len(live)), np.ones(len(live)), integer=True)
    if indicator is None:
        model.add_row(list(sel), [1.0] * len(live), 1.0, 1.0)
    else:
        model.add_row([*sel, indicator], [1.0] * len(live) + [-1.0], 0.0, 0.0)
    for s, k in zip(sel, live, strict=True):
        r = int(enc.wrong[k])
        big = max(0.0, margin - float(enc.diff_lo[k]))
        # z_r - z_y [- m] - big * s >= margin - big   (margin: the constant, or m's upper bound)
        model.add_row([int(z[r]), int(z[y]), int(s), *mv], [1.0, -1.0, -big, *mc], const - big, math.inf)
