"""One gradient loop serving FGSM, R-FGSM, BIM/I-FGSM, PGD and MIM: variants are settings."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from phalanx.attacks.base import ATTACKS, Attack
from phalanx.attacks.losses import LOSSES, attack_loss, is_adversarial, targeted_loss
from phalanx.attacks.projection import ascent_direction, project, random_start
from phalanx.errors import PhalanxError
from phalanx.types import Norm, ThreatModel


@dataclass(frozen=True)
class GradientAttack(Attack):
    """Iterative gradient attack in an eps-ball.

    Each iteration takes a step of ``step_size * eps`` (relative, so one config serves many eps)
    along the steepest-ascent direction of the loss (sign for L-inf), optionally with MI-FGSM
    momentum (``g <- momentum * g + grad / ||grad||_1``), then projects onto the ball and the
    input bounds. ``random_start`` draws uniformly in the ball; ``rand_step`` is R-FGSM's random
    first step of ``rand_step * eps`` along a random sign. With ``restarts > 1`` an example counts
    as broken if *any* restart breaks it (the returned point is from the first one that did).
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

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise PhalanxError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.restarts, int) or self.restarts < 1:
            raise PhalanxError(f"restarts must be an integer >= 1, got {self.restarts!r}")
        if self.loss not in LOSSES:
            raise PhalanxError(f"unknown loss {self.loss!r}; accepted: {', '.join(LOSSES)}")
        if not self.step_size > 0:
            raise PhalanxError(f"step_size must be > 0 (a fraction of eps), got {self.step_size!r}")
        if not 0 <= self.rand_step < 1 or self.momentum < 0:
            raise PhalanxError("rand_step must be in [0, 1) and momentum >= 0")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
                 generator: torch.Generator | None = None, target: Tensor | None = None) -> Tensor:
        if self.targeted and target is None:
            raise PhalanxError(f"attack {self.name!r} is targeted: pass target labels")
        x = x.detach()
        if threat.eps == 0:
            return x.clone()
        best = x.clone()
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for r in range(self.restarts):
            adv = self._run(model, x, y, threat, generator, target)
            with torch.no_grad():
                ok = is_adversarial(model(adv), y, target if self.targeted else None)
            take = ok & ~found if r > 0 else torch.ones_like(ok)
            best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), adv, best)
            found |= ok
            if bool(found.all()):
                break
        return best

    def _objective(self, out: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        if self.targeted:
            assert target is not None
            return targeted_loss(out, target, self.loss)
        return attack_loss(out, y, self.loss, self.confidence)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
             generator: torch.Generator | None, target: Tensor | None) -> Tensor:
        eps = threat.eps
        if self.random_start:
            adv = random_start(x, threat, generator)
        elif self.rand_step > 0:
            s = torch.randint(0, 2, x.shape, generator=generator).to(x.device, x.dtype) * 2 - 1
            adv = project(x + self.rand_step * eps * s, x, threat)
        else:
            adv = x.clone()
        size = self.step_size * eps * (1 - self.rand_step if self.rand_step > 0 else 1)
        g = torch.zeros_like(x)
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            out = model(adv)
            obj = self._objective(out, y, target)
            grad, = torch.autograd.grad(obj.sum(), adv)
            adv = adv.detach()
            if self.momentum > 0:
                g = self.momentum * g + grad / grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
                direction = ascent_direction(g, threat.norm)
            else:
                direction = ascent_direction(grad, threat.norm)
            if self.early_stop:
                with torch.no_grad():
                    active = ~is_adversarial(out.detach(), y, target if self.targeted else None)
                direction = direction * active.view(-1, *([1] * (x.dim() - 1)))
            adv = project(adv + size * direction, x, threat)
        return adv.detach()

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
    return GradientAttack(name="bim", steps=steps, step_size=step_size or 1.0 / steps,
                          random_start=False, loss=loss, **kw)  # type: ignore[arg-type]


@ATTACKS.register("pgd", "PGD: random start, restarts; robust only if every restart fails")
def pgd(steps: int = 50, step_size: float = 0.2, restarts: int = 1, loss: str = "ce", **kw: object) -> GradientAttack:
    # DVERGE eval_wbox: 50 steps of eps/5 with random init
    return GradientAttack(name="pgd", steps=steps, step_size=step_size, random_start=True,
                          restarts=restarts, loss=loss, **kw)  # type: ignore[arg-type]


@ATTACKS.register("mim", "MIM / MI-FGSM: momentum 1.0 on L1-normalised gradients")
def mim(steps: int = 10, step_size: float | None = None, momentum: float = 1.0, loss: str = "ce",
        **kw: object) -> GradientAttack:
    return GradientAttack(name="mim", steps=steps, step_size=step_size or 1.0 / steps,
                          random_start=False, momentum=momentum, loss=loss, **kw)  # type: ignore[arg-type]


__all__ = ["GradientAttack", "Norm", "bim", "fgsm", "mim", "pgd", "rfgsm"]
