"""AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"): APGD-CE, APGD-T (targeted DLR), FAB-T and Square,
with the published "standard" defaults (100 iterations, 9 target classes, 1 restart, 5000
Square queries, p_init 0.8, momentum 0.75, rho 0.75).

APGD's step-size schedule (halving at checkpoints, restarts from the best point, heavy-ball
momentum between the projected step and the previous point) is an algorithm of its own, not a
setting of :func:`phalanx.attacks.gradient.ascend`, so it has its own loop here.

phalanx ensembles output log-probabilities; on a mean-prob or max-prob ensemble the CE, DLR and
margin losses are computed on the *logarithm of the combined probabilities* (see
:func:`output_kind`), which is what the DVERGE reference attacks too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from phalanx.attacks.base import ATTACKS, Attack, prepare
from phalanx.attacks.losses import ce_loss, dlr_loss, dlr_targeted_loss
from phalanx.attacks.projection import apgd_start
from phalanx.attacks.query import square_attack
from phalanx.errors import PhalanxError
from phalanx.types import Norm, ThreatModel

log = logging.getLogger(__name__)


def output_kind(model: nn.Module) -> str:
    """What the attack's losses see: ``"logits"`` or the log of combined probabilities."""
    comb = getattr(model, "combiner", None)
    if comb is None:
        return "logits"
    value = getattr(comb, "value", str(comb))
    return "log-softmax of mean logits" if value == "mean-logits" else f"log of {value} ensemble probabilities"


def _bv(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def apgd(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, loss: str = "ce",
         target: Tensor | None = None, n_iter: int = 100, rho: float = 0.75, alpha: float = 0.75,
         generator: torch.Generator | None = None, eot: bool = False,
         eot_samples: int | None = None) -> tuple[Tensor, Tensor]:
    """One run of APGD (Croce & Hein 2020, alg. 1) in the L-inf ball; returns
    ``(x_adv, fooled)``: the first misclassified iterate where one was found, else the point of
    highest loss. ``loss`` is ``"ce"`` or ``"dlr"``; with ``target`` it is the targeted DLR.

    Schedule as the reference: start ``x + eps * t / ||t||_inf`` (t uniform), step ``2 eps``;
    the loop is :func:`apgd_box` on the box ``[x - eps, x + eps]`` clipped to the input bounds.
    With ``eot`` (untargeted only) the loss is averaged over a randomized ensemble's draw
    (:func:`phalanx.attacks.randomized.expected_loss`; exact when ``eot_samples`` is None).
    """
    if threat.norm is not Norm.LINF:
        raise PhalanxError(f"phalanx's APGD is implemented for L-inf, got {threat.norm.value!r}")
    eps, bounds = threat.eps, threat.bounds

    def objective(a: Tensor) -> tuple[Tensor, Tensor]:
        if eot and target is None:
            from phalanx.attacks.randomized import expected_loss

            li, out_ = expected_loss(model, a, y, loss, samples=eot_samples, generator=generator)
            assert out_ is not None
            out = out_
        else:
            out = model(a)
            if target is not None:
                li = dlr_targeted_loss(out, y, target)
            else:
                li = ce_loss(out, y) if loss == "ce" else dlr_loss(out, y)
        return li, out.argmax(-1) != y

    x_adv = apgd_start(x, threat, generator)
    lo, hi = (x - eps).clamp_min(bounds[0]), (x + eps).clamp_max(bounds[1])
    step = _bv(torch.full((x.shape[0],), 2.0 * eps, device=x.device, dtype=x.dtype), x)
    run = apgd_box(objective, x_adv, lo, hi, step, n_iter=n_iter, rho=rho, alpha=alpha)
    return torch.where(_bv(run.found, x), run.x_found, run.x_best).detach(), run.found


@dataclass(frozen=True)
class ApgdRun:
    """What :func:`apgd_box` returns: per example, the first successful iterate (where
    ``found``), the iterate of highest objective and that objective."""

    x_found: Tensor
    found: Tensor
    x_best: Tensor
    best: Tensor


def apgd_box(objective: Callable[[Tensor], tuple[Tensor, Tensor]], x_start: Tensor, lo: Tensor, hi: Tensor,
             step: Tensor, *, n_iter: int = 100, rho: float = 0.75, alpha: float = 0.75,
             stop_on_success: bool = False) -> ApgdRun:
    """APGD's loop (Croce & Hein 2020, alg. 1) maximising ``objective`` over the box ``[lo, hi]``.

    ``objective(a)`` returns ``(value, success)`` per example (the value differentiable in
    ``a``); ``step`` is the initial step (broadcast against the batch, first dimension per
    example; ``2 eps`` in the L-inf ball). Checkpoints every ``k`` iterations starting at
    ``0.22 n_iter`` and shrinking by ``0.03 n_iter`` to at least ``0.06 n_iter``; at a
    checkpoint the step is halved (and the iterate reset to the best point) if the objective
    increased in at most ``rho * k`` of the last ``k`` steps, or if the step was not reduced at
    the previous checkpoint and the best objective did not improve. Heavy-ball momentum
    ``alpha`` between the projected step and the previous point. ``stop_on_success`` ends the
    run as soon as any example succeeds (restarts of one problem batched together). The final
    iterate is evaluated without a backward pass: its value and success are used, its gradient
    never is (``n_iter`` gradients and ``n_iter + 1`` objective values in all).
    """
    def grad_at(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = a.detach().requires_grad_(True)
        li, ok = objective(a)
        g, = torch.autograd.grad(li.sum(), a)
        return li.detach(), g.detach(), ok.detach()

    def value_at(a: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            li, ok = objective(a.detach())
        return li, ok

    def clip(a: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(a, lo), hi)

    n_iter2 = max(int(0.22 * n_iter), 1)
    n_iter_min = max(int(0.06 * n_iter), 1)
    size_decr = max(int(0.03 * n_iter), 1)
    x_adv = x_start.clone()
    step = step.expand_as(x_adv).clone() if step.shape != x_adv.shape else step.clone()
    loss_cur, grad, fooled = grad_at(x_adv)
    x_best_adv = x_adv.clone()
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss_cur.clone()
    x_old = x_adv.clone()
    k, counter, increases = n_iter2, 0, torch.zeros_like(loss_cur)
    loss_best_last = loss_best.clone()
    reduced_last = torch.ones_like(loss_best, dtype=torch.bool)
    loss_prev = loss_cur.clone()
    for i in range(n_iter):
        if stop_on_success and bool(fooled.any()):
            break
        with torch.no_grad():
            a = alpha if i > 0 else 1.0
            z = clip(x_adv + step * grad.sign())
            x_new = clip(x_adv + (z - x_adv) * a + (x_adv - x_old) * (1 - a))
            x_old, x_adv = x_adv, x_new
        last = i == n_iter - 1
        if last:  # the final iterate's value and success count, its gradient is never used
            loss_cur, ok = value_at(x_adv)
        else:
            loss_cur, grad, ok = grad_at(x_adv)
        with torch.no_grad():
            newly = ok & ~fooled
            x_best_adv[newly] = x_adv[newly]
            fooled |= newly
            increases += (loss_cur > loss_prev).to(increases.dtype)
            loss_prev = loss_cur
            better = loss_cur > loss_best
            x_best[better], loss_best[better] = x_adv[better], loss_cur[better]
            if not last:
                grad_best[better] = grad[better]
            counter += 1
            if counter == k:
                osc = increases <= k * rho
                no_impr = ~reduced_last & (loss_best_last >= loss_best)
                reduce = osc | no_impr
                reduced_last = reduce.clone()
                loss_best_last = loss_best.clone()
                if bool(reduce.any()):
                    step[reduce] /= 2.0
                    x_adv[reduce] = x_best[reduce]
                    grad[reduce] = grad_best[reduce]
                k = max(k - size_decr, n_iter_min)
                counter = 0
                increases = torch.zeros_like(increases)
    return ApgdRun(x_best_adv.detach(), fooled, x_best.detach(), loss_best)


def _project_hyperplane_linf(p: Tensor, w: Tensor, b: Tensor, bounds: tuple[float, float]) -> Tensor:
    """Smallest-L-inf ``d`` with ``w . (p + d) = b`` and ``p + d`` in the box (rows of (N, D)),
    by bisection on the radius: moving every coordinate by ``min(r, room_i)`` towards
    ``sign(c) sign(w_i)`` changes ``w . p`` by a nondecreasing function of ``r``. Where the
    hyperplane is out of reach the largest move in the box is returned (as FAB's projection)."""
    lo_b, hi_b = bounds
    c = b - (w * p).sum(1)
    s = torch.sign(c)[:, None] * torch.sign(w)
    room = torch.where(s > 0, hi_b - p, p - lo_b).clamp_min(0)
    aw = w.abs()
    need = c.abs()
    lo = torch.zeros_like(need)
    hi = torch.full_like(need, hi_b - lo_b)
    for _ in range(40):
        mid = (lo + hi) / 2
        reach = (aw * torch.minimum(room, mid[:, None])).sum(1)
        ok = reach >= need
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    return s * torch.minimum(room, hi[:, None])


def fab_targeted(model: nn.Module, x: Tensor, y: Tensor, target: Tensor, threat: ThreatModel, *,
                 n_iter: int = 100, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9) -> tuple[Tensor, Tensor]:
    """FAB-T (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast adaptive
    boundary attack", alg. 1) in L-inf, towards the decision boundary between ``y`` and
    ``target``; no random start (first restart of the reference). Returns ``(x_adv, fooled)``
    where ``fooled`` requires the minimal adversarial found to lie within ``threat.eps``."""
    if threat.norm is not Norm.LINF:
        raise PhalanxError(f"phalanx's FAB is implemented for L-inf, got {threat.norm.value!r}")
    bs = x.shape[0]
    flat0 = x.flatten(1)
    x1 = x.clone()
    best = x.clone()
    best_norm = torch.full((bs,), float("inf"), device=x.device, dtype=x.dtype)
    for _ in range(n_iter):
        a = x1.detach().requires_grad_(True)
        out = model(a)
        u = torch.arange(bs, device=x.device)
        df = out[u, target] - out[u, y]  # > 0 once the target beats the true class
        dg, = torch.autograd.grad(df.sum(), a)
        with torch.no_grad():
            w = dg.flatten(1)
            p1 = x1.flatten(1)
            b = (w * p1).sum(1) - df.detach()
            d = _project_hyperplane_linf(torch.cat([p1, flat0]), torch.cat([w, w]), torch.cat([b, b]), threat.bounds)
            d1, d2 = d[:bs], d[bs:]
            a1, a2 = d1.abs().amax(1), d2.abs().amax(1)
            al = (a1 / (a1 + a2 + 1e-12)).clamp(0.0, alpha_max)[:, None]
            nxt = ((p1 + eta * d1) * (1 - al) + (flat0 + eta * d2) * al).clamp(*threat.bounds)
            x1 = nxt.view_as(x)
            adv = model(x1).argmax(-1) != y
            if bool(adv.any()):
                nrm = (x1 - x).flatten(1).abs().amax(1)
                take = adv & (nrm < best_norm)
                best[take] = x1[take]
                best_norm = torch.where(take, nrm, best_norm)
                x1 = torch.where(_bv(adv, x), x + (x1 - x) * beta, x1)
    fooled = best_norm <= threat.eps
    return torch.where(_bv(fooled, x), best, x).detach(), fooled


def _targets(model: nn.Module, x: Tensor, n_target_classes: int) -> list[Tensor]:
    with torch.no_grad():
        order = model(x).sort(-1, descending=True).indices
    n = min(n_target_classes, order.shape[-1] - 1)
    return [order[:, i] for i in range(1, n + 1)]  # the 2nd..(n+1)-th most likely classes


@dataclass(frozen=True)
class AutoAttack(Attack):
    """AutoAttack's composition: each component attacks only the examples that survived the
    previous ones; an example is robust only if it survives all. ``components`` picks a subset
    of ``("apgd-ce", "apgd-t", "fab-t", "square")``; the defaults are the published ones."""

    name: str = "autoattack"
    components: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
    n_iter: int = 100
    n_target_classes: int = 9
    n_restarts: int = 1
    n_queries: int = 5000
    p_init: float = 0.8
    fab_iter: int = 100
    eot: bool = False
    eot_samples: int | None = None

    def __post_init__(self) -> None:
        known = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
        object.__setattr__(self, "components", tuple(self.components))
        bad = [c for c in self.components if c not in known]
        if bad or not self.components:
            raise PhalanxError(f"unknown AutoAttack component(s) {bad}; accepted: {', '.join(known)}")
        for key in ("n_iter", "n_target_classes", "n_restarts", "n_queries", "fab_iter"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PhalanxError(f"{key} must be an integer >= 1, got {v!r}")
        if self.eot:
            from phalanx.attacks.randomized import check_samples

            check_samples(self.eot_samples)
        if not 0 < self.p_init <= 1:
            raise PhalanxError(f"p_init must be in (0, 1], got {self.p_init!r}")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
                 generator: torch.Generator | None = None, target: Tensor | None = None) -> Tensor:
        model = prepare(model, x, y)
        x = x.detach()
        if threat.eps == 0:
            return x.clone()
        log.info("%s attacks the %s", self.name, output_kind(model))
        best = x.clone()
        with torch.no_grad():
            robust = model(x).argmax(-1) == y
        for comp in self.components:
            for _ in range(self.n_restarts if comp != "square" else 1):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return best
                xs, ys = x[idx], y[idx]
                if comp in ("apgd-ce", "apgd-dlr"):
                    adv, ok = apgd(model, xs, ys, threat, loss=comp[5:], n_iter=self.n_iter, generator=generator,
                                   eot=self.eot, eot_samples=self.eot_samples)
                    self._merge(best, robust, idx, adv, ok)
                elif comp == "square":
                    adv, ok = square_attack(model, xs, ys, threat, n_queries=self.n_queries, p_init=self.p_init,
                                            generator=generator)
                    self._merge(best, robust, idx, adv, ok)
                else:
                    for tgt in _targets(model, xs, self.n_target_classes):
                        sub = robust[idx].nonzero().squeeze(1)
                        if sub.numel() == 0:
                            break
                        if comp == "apgd-t":
                            adv, ok = apgd(model, xs[sub], ys[sub], threat, target=tgt[sub], n_iter=self.n_iter,
                                           generator=generator)
                        else:
                            adv, ok = fab_targeted(model, xs[sub], ys[sub], tgt[sub], threat, n_iter=self.fab_iter)
                        self._merge(best, robust, idx[sub], adv, ok)
            log.info("%s: after %s, %d of %d examples robust", self.name, comp, int(robust.sum()), len(y))
        return best

    @staticmethod
    def _merge(best: Tensor, robust: Tensor, idx: Tensor, adv: Tensor, ok: Tensor) -> None:
        hit = idx[ok]
        best[hit] = adv[ok]
        robust[hit] = False


@ATTACKS.register("autoattack", "AutoAttack standard: APGD-CE, APGD-T (DLR), FAB-T, Square (Croce & Hein 2020)")
def autoattack(n_iter: int = 100, n_target_classes: int = 9, n_queries: int = 5000, n_restarts: int = 1,
               fab_iter: int = 100, components: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")) -> AutoAttack:
    return AutoAttack(components=tuple(components), n_iter=n_iter, n_target_classes=n_target_classes,
                      n_queries=n_queries, n_restarts=n_restarts, fab_iter=fab_iter)


@ATTACKS.register("apgd-ce", "APGD on cross-entropy (100 iterations, momentum 0.75)")
def apgd_ce(n_iter: int = 100, n_restarts: int = 1) -> AutoAttack:
    return AutoAttack(name="apgd-ce", components=("apgd-ce",), n_iter=n_iter, n_restarts=n_restarts)


@ATTACKS.register("eot-apgd", "EOT-APGD: APGD-CE and APGD-DLR on the loss expected over a randomized ensemble's draw")
def eot_apgd(n_iter: int = 100, n_restarts: int = 1, samples: int | None = None) -> AutoAttack:
    return AutoAttack(name="eot-apgd", components=("apgd-ce", "apgd-dlr"), n_iter=n_iter, n_restarts=n_restarts,
                      eot=True, eot_samples=samples)


@ATTACKS.register("apgd-t", "APGD-T on the targeted DLR loss, 9 target classes")
def apgd_t(n_iter: int = 100, n_target_classes: int = 9, n_restarts: int = 1) -> AutoAttack:
    return AutoAttack(name="apgd-t", components=("apgd-t",), n_iter=n_iter, n_target_classes=n_target_classes,
                      n_restarts=n_restarts)


@ATTACKS.register("fab-t", "FAB-T: targeted fast adaptive boundary attack, 9 target classes")
def fab_t(n_iter: int = 100, n_target_classes: int = 9) -> AutoAttack:
    return AutoAttack(name="fab-t", components=("fab-t",), fab_iter=n_iter, n_target_classes=n_target_classes)


@ATTACKS.register("square", "Square attack: score-based black box, 5000 queries, p_init 0.8")
def square(n_queries: int = 5000, p_init: float = 0.8) -> AutoAttack:
    return AutoAttack(name="square", components=("square",), n_queries=n_queries, p_init=p_init)


__all__ = ["ApgdRun", "AutoAttack", "apgd", "apgd_box", "apgd_ce", "apgd_t", "autoattack", "eot_apgd", "fab_t", "fab_targeted", "output_kind", "square"]
