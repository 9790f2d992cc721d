"""The one gradient loop (:func:`ascend`) and :class:`GradientAttack`, whose settings give FGSM,
R-FGSM, BIM/I-FGSM, PGD, MIM, M-DI2-FGSM, SGM and the joint attacks G.A. 1-3 of Amir et al.
(2022). Feature distillation (DVERGE eq. 1) reuses the same loop with its own objective."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from phalanx.attacks.base import ATTACKS, Attack, prepare
from phalanx.attacks.losses import (
    ALL_LOSSES,
    MEMBER_LOSSES,
    all_members_fooled,
    attack_loss,
    check_loss,
    elu_regulator,
    is_adversarial,
    joint_margins,
    runner_up,
    targeted_loss,
)
from phalanx.attacks.projection import ascent_direction, project, project_, random_start
from phalanx.attacks.transforms import input_diversity, skip_gradient
from phalanx.errors import PhalanxError
from phalanx.types import Norm, ThreatModel

#: ``objective(x_adv) -> (value to maximise per example (B,), done mask (B,) or None)``
Objective = Callable[[Tensor], tuple[Tensor, Tensor | None]]


def _bview(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def ascend(objective: Objective, x: Tensor, start: Tensor, threat: ThreatModel, *, steps: int,
           step_size: float, momentum: float = 0.0, normalize_momentum: bool = True,
           schedule: Callable[[int], float] | None = None, heavy_ball: float = 0.0) -> Tensor:
    """The gradient loop shared by every gradient attack in phalanx.

    ``steps`` times: take the gradient of ``objective`` w.r.t. the input only
    (``torch.autograd.grad``, so parameters' ``.grad`` are never touched), optionally accumulate
    MI-FGSM momentum ``g <- momentum * g + grad / ||grad||_1`` (Dong et al. 2018, per-example L1
    norm), step ``step_size`` (absolute) along the steepest-ascent direction of ``threat.norm``
    (the sign for L-inf), freeze the examples the objective reports as done, and project onto the
    ``threat`` ball around ``x`` intersected with the input bounds.
    ``normalize_momentum=False`` accumulates raw gradients instead (TRS's PGD never zeroes
    ``adv.grad``, so it steps along the sign of the plain running sum; REFERENCE-FACTS 'TRS').
    ``schedule(i)`` replaces ``step_size`` at step ``i`` (e.g. MORA's cosine decay). With
    ``heavy_ball = a > 0`` the projected step ``z`` is mixed with the previous displacement as in
    APGD and MORA: ``x <- P(x + a (z - x) + (1 - a) (x - x_prev))`` (``a = 1`` at the first step),
    and examples reported done are frozen entirely.
    """
    adv = start.detach()
    g = torch.zeros_like(x) if momentum > 0 else x  # the momentum buffer, owned by this loop
    prev = adv
    for i in range(steps):
        adv.requires_grad_(True)
        obj, done = objective(adv)
        grad, = torch.autograd.grad(obj.sum(), adv)
        adv = adv.detach()
        if momentum > 0:
            if normalize_momentum:
                grad = grad / _bview(grad.abs().flatten(1).sum(1).clamp_min(1e-12), grad)
            if momentum != 1:
                g.mul_(momentum)
            g.add_(grad)  # g <- momentum * g + grad, in place (same rounding as out of place)
            direction = ascent_direction(g, threat.norm)
        else:
            direction = ascent_direction(grad, threat.norm)
        size = schedule(i) if schedule is not None else step_size
        if heavy_ball > 0:
            a = heavy_ball if i > 0 else 1.0
            z = project(adv + size * direction, x, threat)
            new = project(adv + a * (z - adv) + (1 - a) * (adv - prev.detach()), x, threat)
            prev, adv = adv, new if done is None else torch.where(_bview(done, new), adv, new)
            continue
        if done is not None:
            direction = direction * _bview((~done).to(direction.dtype), direction)
        if threat.norm is Norm.LINF:
            # direction is in {-1, 0, 1}, so size * direction is exact and the fused add (and the
            # in-place projection of the fresh sum) round exactly as adv + size * direction would
            adv = project_(torch.add(adv, direction, alpha=size), x, threat)
        else:
            adv = project(adv + size * direction, x, threat)
    return adv.detach()


def member_logits_of(model: nn.Module, x: Tensor, members: tuple[int, ...] | None = None) -> Tensor:
    """(M, B, K) logits of an ensemble's chosen members; a single model counts as one member."""
    fn = getattr(model, "member_logits", None)
    z = fn(x) if callable(fn) else model(x)[None]
    if members is None:
        return z  # type: ignore[no-any-return]
    bad = [i for i in members if not 0 <= i < z.shape[0]]
    if bad:
        raise PhalanxError(f"member indices {bad} out of range; accepted: 0..{z.shape[0] - 1}")
    return z[list(members)]  # type: ignore[no-any-return]


def restrict_members(model: nn.Module, members: tuple[int, ...]) -> nn.Module:
    """The sub-ensemble of ``members`` (same combiner) that a non-joint attack targets; a single
    model is its own member 0."""
    subset = getattr(model, "subset", None)
    if callable(subset):
        return subset(members)  # type: ignore[no-any-return]
    if tuple(members) != (0,):
        raise PhalanxError(f"member indices {list(members)} do not fit a single model; accepted: [0]")
    return model


@dataclass(frozen=True)
class GradientAttack(Attack):
    """Iterative gradient attack in an eps-ball; every variant is a setting.

    Each iteration steps ``step_size * eps`` (relative, so one config serves many eps) along the
    steepest-ascent direction of the loss, optionally with MI-FGSM ``momentum``, then projects.
    ``random_start`` draws uniformly in the ball; ``rand_step`` is R-FGSM's random first step of
    ``rand_step * eps`` along a random sign (Tramer et al. 2018). ``diversity_prob`` applies
    DI2-FGSM's random resize-and-pad before every gradient (Xie et al. 2019); ``skip_gamma < 1``
    is SGM (Wu et al. 2020) on residual models. With ``restarts > 1`` an example counts as broken
    if *any* restart breaks it (the returned point is from the first one that did), i.e. it is
    robust only if it survives every restart (DVERGE eval_wbox, REFERENCE-FACTS).

    ``loss="elu-joint"`` is the joint attack of Amir et al. (2022), app. D: the per-member margins
    of the chosen ``members`` (default all) combined by the ELU regulator, minimised; targeted, the
    target of each member is its runner-up at the clean point (G.A. 1, 2), untargeted the
    runner-up at the current point (G.A. 3). Success means every chosen member errs. With any
    other loss, ``members`` restricts the attacked model to that sub-ensemble (same combiner).
    """

    name: str = "pgd"
    steps: int = 10
    step_size: float = 0.25
    random_start: bool = True
    restarts: int = 1
    momentum: float = 0.0
    loss: str = "ce"
    confidence: float = 0.0
    rand_step: float = 0.0
    targeted: bool = False
    early_stop: bool = False
    diversity_prob: float = 0.0
    skip_gamma: float = 1.0
    members: tuple[int, ...] | None = None
    eot: bool = False
    eot_samples: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise PhalanxError(f"steps must be an integer >= 1, got {self.steps!r}")
        if isinstance(self.restarts, bool) or not isinstance(self.restarts, int) or self.restarts < 1:
            raise PhalanxError(f"restarts must be an integer >= 1, got {self.restarts!r}")
        check_loss(self.loss, ALL_LOSSES)
        if not self.step_size > 0:
            raise PhalanxError(f"step_size must be > 0 (a fraction of eps), got {self.step_size!r}")
        if not 0 <= self.rand_step < 1:
            raise PhalanxError(f"rand_step must be in [0, 1), got {self.rand_step!r}")
        if not self.momentum >= 0:
            raise PhalanxError(f"momentum must be >= 0, got {self.momentum!r}")
        if not 0 <= self.diversity_prob <= 1:
            raise PhalanxError(f"diversity_prob must be in [0, 1], got {self.diversity_prob!r}")
        if not 0 < self.skip_gamma <= 1:
            raise PhalanxError(f"skip_gamma must be in (0, 1], got {self.skip_gamma!r}")
        if self.members is not None:
            object.__setattr__(self, "members", tuple(int(i) for i in self.members))
            if not self.members:
                raise PhalanxError("members must name at least one member index")
        if self.eot:
            from phalanx.attacks.randomized import check_samples

            check_samples(self.eot_samples)
            if self.joint or self.targeted:
                raise PhalanxError("EOT averages the untargeted ce/cw/dlr loss over the draw; "
                                   f"got loss {self.loss!r}{' (targeted)' if self.targeted else ''}")

    @property
    def joint(self) -> bool:
        return self.loss in MEMBER_LOSSES

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
                 generator: torch.Generator | None = None, target: Tensor | None = None) -> Tensor:
        model = prepare(model, x, y)
        x = x.detach()
        if self.members is not None and not self.joint:
            model = restrict_members(model, self.members)
        if self.joint and self.targeted and target is None:
            with torch.no_grad():  # G.A. 1/2: each member's runner-up at the clean point
                target = runner_up(member_logits_of(model, x, self.members))
        if self.targeted and target is None:
            raise PhalanxError(f"attack {self.name!r} is targeted: pass target labels")
        if threat.eps == 0:
            return x.clone()
        if self.restarts == 1:
            # one restart returns its point whether or not it succeeded: no checking forward pass
            # and no best-iterate bookkeeping (the loop's last objective is that of the iterate
            # before the final step)
            return self._run(model, x, y, threat, generator, target)
        best = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for r in range(self.restarts):
            adv = self._run(model, x, y, threat, generator, target)
            with torch.no_grad():
                ok = self.success(model, adv, y, target)
            take = ok & ~found if r > 0 else torch.ones_like(ok)
            best = torch.where(_bview(take, x), adv, best)
            found |= ok
            if bool(found.all()):
                break
        return best

    def success(self, model: nn.Module, adv: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
        """(B,) whether ``adv`` reaches the attack's goal."""
        if self.joint:
            return all_members_fooled(member_logits_of(model, adv, self.members), y)
        return is_adversarial(model(adv), y, target if self.targeted else None)

    def _objective(self, out: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        if self.targeted:
            assert target is not None
            return targeted_loss(out, target, self.loss, y)
        return attack_loss(out, y, self.loss, self.confidence)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
             generator: torch.Generator | None, target: Tensor | None) -> Tensor:
        eps = threat.eps
        if self.random_start:
            start = random_start(x, threat, generator)
        elif self.rand_step > 0:
            s = torch.randint(0, 2, x.shape, generator=generator).to(x.device, x.dtype) * 2 - 1
            start = project(x + self.rand_step * eps * s, x, threat)
        else:
            start = x.clone()
        size = self.step_size * eps * (1 - self.rand_step if self.rand_step > 0 else 1)
        joint_target = target if (self.joint and self.targeted) else None

        def objective(adv: Tensor) -> tuple[Tensor, Tensor | None]:
            inp = input_diversity(adv, self.diversity_prob, generator) if self.diversity_prob > 0 else adv
            if self.joint:
                z = member_logits_of(model, inp, self.members)
                obj = -elu_regulator(joint_margins(z, y, joint_target))
                done = all_members_fooled(z.detach(), y) if self.early_stop else None
                return obj, done
            if self.eot:  # expectation over a randomized ensemble's draw (attacks/randomized.py)
                from phalanx.attacks.randomized import expected_loss

                val, out = expected_loss(model, inp, y, self.loss, samples=self.eot_samples, generator=generator,
                                         need_output=self.early_stop)
                return val, is_adversarial(out.detach(), y) if self.early_stop and out is not None else None
            out = model(inp)
            done = is_adversarial(out.detach(), y, target if self.targeted else None) if self.early_stop else None
            return self._objective(out, y, target), done

        with skip_gradient(model, self.skip_gamma):
            return ascend(objective, x, start, threat, steps=self.steps, step_size=size, momentum=self.momentum)

    def with_(self, **changes: object) -> GradientAttack:
        return replace(self, **changes)  # type: ignore[arg-type]


@ATTACKS.register("fgsm", "FGSM: one signed-gradient step of size eps")
def fgsm(loss: str = "ce", **kw: object) -> GradientAttack:
    return GradientAttack(name="fgsm", steps=1, step_size=1.0, random_start=False, loss=loss, **kw)  # type: ignore[arg-type]


@ATTACKS.register("rfgsm", "R-FGSM: random step alpha = eps/2, then a gradient step of eps - alpha")
def rfgsm(loss: str = "ce", alpha: float = 0.5, **kw: object) -> GradientAttack:
    return GradientAttack(name="rfgsm", steps=1, step_size=1.0, random_start=False, rand_step=alpha,
                          loss=loss, **kw)  # type: ignore[arg-type]


@ATTACKS.register("bim", "BIM / I-FGSM: iterative FGSM without random start")
def bim(steps: int = 10, step_size: float | None = None, loss: str = "ce", **kw: object) -> GradientAttack:
    return GradientAttack(name="bim", steps=steps, step_size=step_size or 1.0 / _steps(steps),
                          random_start=False, loss=loss, **kw)  # type: ignore[arg-type]


@ATTACKS.register("pgd", "PGD: random start, restarts; robust only if every restart fails")
def pgd(steps: int = 50, step_size: float = 0.2, restarts: int = 1, loss: str = "ce", **kw: object) -> GradientAttack:
    # DVERGE eval_wbox: 50 steps of eps/5 with random init
    return GradientAttack(name="pgd", steps=steps, step_size=step_size, random_start=True,
                          restarts=restarts, loss=loss, **kw)  # type: ignore[arg-type]


@ATTACKS.register("eot-pgd", "EOT-PGD: PGD on the loss expected over a randomized ensemble's draw (exact or sampled)")
def eot_pgd(steps: int = 50, step_size: float = 0.2, restarts: int = 1, loss: str = "ce", samples: int | None = None,
            random_start: bool = True, **kw: object) -> GradientAttack:
    # samples None: exact expectation sum_m w_m L(z_m); samples = 1: single-sample PGD
    return GradientAttack(name="eot-pgd", steps=steps, step_size=step_size, random_start=random_start, restarts=restarts,
                          loss=loss, eot=True, eot_samples=samples, **kw)  # type: ignore[arg-type]


@ATTACKS.register("mim", "MIM / MI-FGSM: momentum 1.0 on L1-normalised gradients")
def mim(steps: int = 10, step_size: float | None = None, momentum: float = 1.0, loss: str = "ce",
        **kw: object) -> GradientAttack:
    return GradientAttack(name="mim", steps=steps, step_size=step_size or 1.0 / _steps(steps),
                          random_start=False, momentum=momentum, loss=loss, **kw)  # type: ignore[arg-type]


@ATTACKS.register("mpgd", "momentum PGD (DVERGE's transfer 'mpgd'): random start + MI-FGSM momentum")
def mpgd(steps: int = 100, step_size: float | None = None, momentum: float = 1.0, restarts: int = 1,
         loss: str = "ce", **kw: object) -> GradientAttack:
    return GradientAttack(name="mpgd", steps=steps, step_size=step_size or 2.0 / _steps(steps), random_start=True,
                          restarts=restarts, momentum=momentum, loss=loss, **kw)  # type: ignore[arg-type]


@ATTACKS.register("mdi2fgsm", "M-DI2-FGSM: momentum + input diversity (p = 0.5), transfer attack")
def mdi2fgsm(steps: int = 10, step_size: float | None = None, prob: float = 0.5, momentum: float = 1.0,
             loss: str = "ce", **kw: object) -> GradientAttack:
    # Xie et al. 2019: p = 0.5, decay factor mu = 1.0, step eps / steps, no random start
    return GradientAttack(name="mdi2fgsm", steps=steps, step_size=step_size or 1.0 / _steps(steps),
                          random_start=False, momentum=momentum, diversity_prob=prob, loss=loss, **kw)  # type: ignore[arg-type]


@ATTACKS.register("sgm", "SGM: skip-gradient (gamma = 0.2) I-FGSM for residual models")
def sgm(steps: int = 10, step_size: float | None = None, gamma: float = 0.2, loss: str = "ce",
        **kw: object) -> GradientAttack:
    return GradientAttack(name="sgm", steps=steps, step_size=step_size or 1.0 / _steps(steps),
                          random_start=False, skip_gamma=gamma, loss=loss, **kw)  # type: ignore[arg-type]


@ATTACKS.register("ga1", "Amir et al. G.A. 1: targeted runner-up FGSM on the ELU regulator (joint error)")
def ga1(members: tuple[int, ...] | None = None, **kw: object) -> GradientAttack:
    return GradientAttack(name="ga1", steps=1, step_size=1.0, random_start=False, loss="elu-joint",
                          targeted=True, members=members, **kw)  # type: ignore[arg-type]


@ATTACKS.register("ga2", "Amir et al. G.A. 2: targeted runner-up I-FGSM on the ELU regulator")
def ga2(steps: int = 20, step_size: float = 0.1, members: tuple[int, ...] | None = None,
        **kw: object) -> GradientAttack:
    return GradientAttack(name="ga2", steps=steps, step_size=step_size, random_start=False, loss="elu-joint",
                          targeted=True, members=members, **kw)  # type: ignore[arg-type]


@ATTACKS.register("ga3", "Amir et al. G.A. 3: untargeted I-FGSM on the ELU regulator")
def ga3(steps: int = 20, step_size: float = 0.1, members: tuple[int, ...] | None = None,
        **kw: object) -> GradientAttack:
    return GradientAttack(name="ga3", steps=steps, step_size=step_size, random_start=False, loss="elu-joint",
                          targeted=False, members=members, **kw)  # type: ignore[arg-type]


def _steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PhalanxError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


__all__ = ["GradientAttack", "Norm", "Objective", "ascend", "bim", "eot_pgd", "fgsm", "ga1", "ga2", "ga3", "mdi2fgsm",
           "member_logits_of", "mim", "mpgd", "pgd", "rfgsm", "sgm"]
