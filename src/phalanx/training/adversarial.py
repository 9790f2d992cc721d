"""Adversarial training of the whole ensemble (Madry et al. 2018 as ported in the DVERGE
repository) and Tramer et al.'s ensemble adversarial training with static held-out sources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from phalanx.attacks import GradientAttack
from phalanx.ensembles import Ensemble, load_ensemble
from phalanx.errors import PhalanxError
from phalanx.training.base import METHODS, Batch, LossOutput, StepContext, TrainingMethod
from phalanx.training.baseline import member_cross_entropy
from phalanx.training.common import (
    GENERATION_MODES,
    check_choice,
    check_nonneg,
    check_positive,
    check_steps,
    generation_mode,
)
from phalanx.types import Norm, ThreatModel


def pgd_attack(eps: float, steps: int, step_size: float) -> GradientAttack:
    """L-inf PGD with random start and an *absolute* step (converted to GradientAttack's relative one)."""
    return GradientAttack(name="pgd", steps=steps, step_size=step_size / eps if eps > 0 else 1.0, random_start=True)


@METHODS.register("advt", "AdvT: PGD adversarial training against the whole ensemble")
@dataclass
class AdversarialTraining(TrainingMethod):
    """``L = sum_m CE(f_m(x_adv), y)`` with ``x_adv = PGD(ensemble, x, y)`` against the combined
    output (DVERGE appendix A: 10 steps of 2/255 in 8/255, adversarial examples w.r.t. the whole
    ensemble; the repository's ``train_adv.py`` trains on the adversarial batch only).
    ``clean_weight > 0`` adds ``clean_weight * sum_m CE(f_m(x), y)``. Generation runs in train
    mode by default, as the reference. The examples are generated once per batch before the
    update, so each member's loss depends on that member only and the loop's single optimizer
    step equals the reference's per-member optimizers.
    """

    name: ClassVar[str] = "advt"
    generation_mode: ClassVar[str] = "train"

    eps: float = 8 / 255  #: PGD radius (DVERGE appendix A; use 0.3 or 0.1 on MNIST)
    steps: int = 10  #: PGD steps (DVERGE appendix A)
    step_size: float = 2 / 255  #: absolute PGD step (DVERGE appendix A)
    clean_weight: float = 0.0  #: weight of an added clean cross-entropy (reference: 0)
    bounds: tuple[float, float] = (0.0, 1.0)
    generation: str = "train"  #: members' mode during PGD (reference: train)

    def __post_init__(self) -> None:
        check_nonneg(eps=self.eps, clean_weight=self.clean_weight)
        check_positive(step_size=self.step_size)
        check_steps(steps=self.steps)
        check_choice("generation", self.generation, GENERATION_MODES)
        self.bounds = (float(self.bounds[0]), float(self.bounds[1]))

    def loss(self, ensemble: Ensemble, batch: Batch, ctx: StepContext) -> LossOutput:
        threat = ThreatModel(Norm.LINF, self.eps, self.bounds)
        with generation_mode(ensemble, self.generation):
            adv = pgd_attack(self.eps, self.steps, self.step_size)(ensemble, batch.x, batch.y, threat,
                                                                    generator=ctx.generator)
        ce = member_cross_entropy(ensemble.member_logits(adv), batch.y)
        loss = ce.sum()
        metrics = {"adv_ce": ce.detach().mean()}
        if self.clean_weight > 0:
            clean = member_cross_entropy(ensemble.member_logits(batch.x), batch.y)
            loss = loss + self.clean_weight * clean.sum()
            metrics["ce"] = clean.detach().mean()
        return LossOutput(loss, metrics)


@METHODS.register("eat", "EAT: Tramer's ensemble adversarial training with static held-out sources")
@dataclass
class EnsembleAdversarialTraining(TrainingMethod):
    """Tramer et al. (2018) ensemble adversarial training, as used by bogun2022 sec. 4.2: the
    adversarial examples come from *static* pre-trained ensembles (``sources``: checkpoint paths of
    held-out ensembles of the same size and architecture) by PGD-L-inf with 10 steps, eps 0.1.
    The source of each batch cycles through the static models and, with ``include_self``, the
    ensemble being trained (Tramer et al. alternate the two). Each member minimises
    ``(1 - adv_weight) * CE(f_m(x), y) + adv_weight * CE(f_m(x_adv), y)`` (half clean, half
    adversarial as Tramer et al.).
    """

    name: ClassVar[str] = "eat"
    generation_mode: ClassVar[str] = "eval"  # static sources are fixed, pre-trained models

    sources: tuple[str, ...] = ()  #: checkpoint paths of held-out pre-trained ensembles
    eps: float = 0.1  #: PGD radius (bogun2022 sec. 4.2)
    steps: int = 10  #: PGD steps (bogun2022 sec. 4.2)
    step_size: float = 0.01  #: absolute PGD step (eps / steps, as bogun2022's attacks)
    include_self: bool = False  #: also use the current ensemble as a source (Tramer et al.'s variant)
    adv_weight: float = 0.5  #: weight of the adversarial cross-entropy (Tramer et al.: half/half)
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.sources = tuple(str(s) for s in self.sources)
        if not self.sources and not self.include_self:
            raise PhalanxError("eat needs at least one static source: sources = ['held_out/ensemble.pt', ...]")
        check_nonneg(eps=self.eps)
        check_positive(step_size=self.step_size)
        check_steps(steps=self.steps)
        if not 0 <= self.adv_weight <= 1:
            raise PhalanxError(f"adv_weight must be in [0, 1], got {self.adv_weight!r}")
        self.bounds = (float(self.bounds[0]), float(self.bounds[1]))
        self._static: list[nn.Module] = []

    def _sources(self, ensemble: Ensemble, device: torch.device) -> list[nn.Module]:
        if len(self._static) != len(self.sources):
            self._static = []
            for path in self.sources:
                src = load_ensemble(path, map_location=device).eval()
                if tuple(src.in_shape) != tuple(ensemble.in_shape) or src.num_classes != ensemble.num_classes:
                    raise PhalanxError(f"eat source {path} expects inputs {src.in_shape} with {src.num_classes} "
                                       f"classes; the ensemble has {ensemble.in_shape}, {ensemble.num_classes}")
                for p in src.parameters():
                    p.requires_grad_(False)
                self._static.append(src)
        return [*self._static, *([ensemble] if self.include_self else [])]

    def loss(self, ensemble: Ensemble, batch: Batch, ctx: StepContext) -> LossOutput:
        sources = self._sources(ensemble, batch.x.device)
        source = sources[ctx.global_step % len(sources)]
        threat = ThreatModel(Norm.LINF, self.eps, self.bounds)
        with generation_mode(source, "eval" if source is not ensemble else "train"):
            adv = pgd_attack(self.eps, self.steps, self.step_size)(source, batch.x, batch.y, threat,
                                                                    generator=ctx.generator)
        x = torch.cat([batch.x, adv])
        z = ensemble.member_logits(x)
        b = batch.x.shape[0]
        clean = member_cross_entropy(z[:, :b], batch.y)
        adv_ce = member_cross_entropy(z[:, b:], batch.y)
        loss = ((1 - self.adv_weight) * clean + self.adv_weight * adv_ce).sum()
        metrics: dict[str, Tensor] = {"ce": clean.detach().mean(), "adv_ce": adv_ce.detach().mean()}
        return LossOutput(loss, metrics)
