"""Falsification: APGD on the property's margin inside the query's input box (SAT only).

Every query's property is a quorum over groups of disjuncts ``c . Y >= 0``
(:meth:`~phalanx.verification.query.Query.groups`). The *margin* of a group is its largest
``c . Y``; the property holds where the ``quorum``-th largest group margin is ``>= 0``, so that
value is the loss to maximise (the CW / DLR-style margin loss, Carlini & Wagner 2017; for one
member and "not label" it is ``max_{r != l} y_r - y_l``). It is maximised by APGD's
step-size-controlled loop (Croce & Hein 2020, alg. 1; :func:`phalanx.attacks.parameter_free.apgd_box`)
on the box itself, with the step ``hi - lo`` per coordinate (APGD's ``2 eps``).

Networks whose ReLUs are mostly inactive on the box (VNN-COMP's ``mnist_fc``: about 2% of
the first layer's units are active at an image) give PGD almost no gradient towards the units a
counterexample needs; every other round therefore first ascends a *surrogate* whose ReLUs are
leaky (slope 0.05, then 0.01, 0.1, ...: gradients through inactive units, the idea of
backward-pass approximation, Athalye et al. 2018) and then polishes the surrogate's best points
on the exact network. Only the exact network's value ever decides a candidate.

Restarts are batched: one start at the box centre (the clean point of a robustness query),
the rest uniform in the box; with a single group, starts are spread over targeted margins
(one disjunct each, most promising at the centre first, as APGD-T) and the untargeted one.
Rounds of restarts run until a witness is found, ``rounds`` is reached or the time budget is
spent. A candidate counts only after :func:`~phalanx.verification.query.recheck` confirms it
in a float64 PyTorch forward pass (the attack itself runs in float32 for speed).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from phalanx.attacks.parameter_free import apgd_box
from phalanx.errors import PhalanxError
from phalanx.verification.query import Query, recheck


@dataclass(frozen=True)
class FalsifyConfig:
    """``steps`` APGD iterations per run, ``restarts`` batched starts per round, at most
    ``rounds`` rounds and ``time_limit_s`` seconds (0: no limit besides the rounds)."""

    steps: int = 50
    restarts: int = 8
    rounds: int = 2
    time_limit_s: float = 0.0
    seed: int = 0
    rho: float = 0.75
    momentum: float = 0.75

    def __post_init__(self) -> None:
        if self.steps < 1 or self.restarts < 1 or self.rounds < 1:
            raise PhalanxError(f"falsification needs steps, restarts and rounds >= 1, got {self.steps}, "
                               f"{self.restarts}, {self.rounds}")


@dataclass
class FalsifyOutcome:
    """A re-checked witness (or None), the best margin the attack saw (float32) and statistics."""

    witness: np.ndarray | None
    best_margin: float
    rounds: int
    seconds: float
    details: dict[str, Any]


class _Objective:
    """``x (B, n) -> (quorum-th largest group margin, margin > 0)`` with per-example target masks."""

    def __init__(self, query: Query, dtype: torch.dtype) -> None:
        self.exact = [_attack_copy(m, dtype) for m in query.models]
        self.models = self.exact
        self.shape = query.nets[0].in_shape
        groups = query.groups()
        self.coef = torch.as_tensor(np.concatenate([np.stack(g) for g in groups]), dtype=dtype)  # (D, total)
        self.ranges: list[tuple[int, int]] = []
        k = 0
        for g in groups:
            self.ranges.append((k, k + len(g)))
            k += len(g)
        self.q = query.required
        self.mask: Tensor | None = None

    def outputs(self, x: Tensor) -> Tensor:
        xs = x.reshape(x.shape[0], *self.shape)
        return torch.cat([m(xs).reshape(x.shape[0], -1) for m in self.models], dim=1)

    def disjuncts(self, x: Tensor) -> Tensor:
        return self.outputs(x) @ self.coef.T  # (B, D)

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        d = self.disjuncts(x)
        if self.mask is not None:
            d = d.masked_fill(~self.mask, float("-inf"))
        gm = torch.stack([d[:, s:e].amax(1) for s, e in self.ranges], dim=1)
        value = torch.topk(gm, self.q, dim=1).values[:, -1]
        return value, value > 0


#: leaky slopes of the surrogate rounds, in turn
SURROGATE_SLOPES = (0.05, 0.01, 0.1, 0.2)


def _surrogate(model: nn.Module, slope: float) -> nn.Module:
    """A copy of ``model`` with every ``nn.ReLU`` replaced by ``LeakyReLU(slope)``."""
    m = copy.deepcopy(model)
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.LeakyReLU(slope))
    return m


def _attack_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    m = copy.deepcopy(model).to(dtype).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def falsify(query: Query, config: FalsifyConfig | None = None) -> FalsifyOutcome:
    """Search the query's box for a witness of its property (see the module docstring)."""
    cfg = config or FalsifyConfig()
    t0 = time.perf_counter()
    dtype = torch.float32
    obj = _Objective(query, dtype)
    lo_np, hi_np = query.box()
    lo = torch.as_tensor(lo_np, dtype=dtype)[None]
    hi = torch.as_tensor(hi_np, dtype=dtype)[None]
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    center = torch.as_tensor(np.clip(query.x0, lo_np, hi_np), dtype=dtype)[None]
    gen = torch.Generator().manual_seed(cfg.seed)
    b = cfg.restarts
    best, rounds, rechecks = float("-inf"), 0, 0
    details: dict[str, Any] = {}
    for r in range(cfg.rounds):
        if cfg.time_limit_s and r > 0 and time.perf_counter() - t0 > cfg.time_limit_s:
            break
        rounds += 1
        u = torch.rand((b, lo.shape[1]), generator=gen, dtype=dtype)
        start = lo + u * (hi - lo)
        if r == 0:
            start[0] = center[0]
        obj.mask = _target_masks(obj, center, b, r * b)
        box = (lo.expand(b, -1), hi.expand(b, -1))
        with torch.enable_grad():
            if r % 2 == 1:  # surrogate round: ascend the leaky network, then polish on the exact one
                slope = SURROGATE_SLOPES[(r // 2) % len(SURROGATE_SLOPES)]
                obj.models = [_surrogate(m, slope) for m in obj.exact]
                sur = apgd_box(obj, start, *box, (hi - lo).expand(b, -1).clone(), n_iter=cfg.steps, rho=cfg.rho,
                               alpha=cfg.momentum)
                obj.models = obj.exact
                start = sur.x_best
            run = apgd_box(obj, start, *box, (hi - lo).expand(b, -1).clone(), n_iter=cfg.steps, rho=cfg.rho,
                           alpha=cfg.momentum, stop_on_success=True)
        obj.mask = None
        with torch.no_grad():
            cands = torch.where(run.found[:, None], run.x_found, run.x_best)
            vals, _ = obj(cands)
        best = max(best, float(vals.max()))
        for i in torch.argsort(vals, descending=True).tolist():
            if float(vals[i]) < 0 and not run.found[i]:
                break
            rechecks += 1
            w, msg, det = recheck(query, cands[i].to(torch.float64).numpy())
            if w is not None:
                details.update(det)
                details.update({"round": r, "rechecks": rechecks})
                return FalsifyOutcome(w, best, rounds, time.perf_counter() - t0, details)
            details["last_rejection"] = msg
    details["rechecks"] = rechecks
    return FalsifyOutcome(None, best, rounds, time.perf_counter() - t0, details)


def _target_masks(obj: _Objective, center: Tensor, b: int, offset: int) -> Tensor | None:
    """With one group of several disjuncts: per start, one targeted disjunct (most promising at
    the centre first) or all (every ``len + 1``-th start); otherwise no masks."""
    if len(obj.ranges) != 1 or obj.ranges[0][1] < 2:
        return None
    n = obj.ranges[0][1]
    with torch.no_grad():
        order = torch.argsort(obj.disjuncts(center)[0], descending=True).tolist()
    mask = torch.zeros((b, n), dtype=torch.bool)
    for i in range(b):
        t = (i + offset) % (n + 1)
        if t == 0:
            mask[i] = True
        else:
            mask[i, order[t - 1]] = True
    return mask


__all__ = ["FalsifyConfig", "FalsifyOutcome", "falsify"]
