"""DVERGE (yang2020, eqs. 1-5, Algorithm 1, appendix C.4) and its settings DVERGE+AdvT and SMD+
(bogun2022: DVERGE with the SMD regularizer added)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from phalanx.attacks import GradientAttack, feature_distillation
from phalanx.ensembles import Ensemble
from phalanx.errors import PhalanxError
from phalanx.training.base import METHODS, Batch, LossOutput, StepContext, TrainingMethod
from phalanx.training.common import (
    GENERATION_MODES,
    SALIENCY_OUTPUTS,
    check_choice,
    check_nonneg,
    check_positive,
    check_steps,
    generation_mode,
    register_variant,
)
from phalanx.training.smd import smd_term
from phalanx.types import Norm, ThreatModel


def feature_depth(member: nn.Module) -> int:
    depth = getattr(member, "num_feature_layers", None)
    if depth is None or not hasattr(member, "features"):
        raise PhalanxError(f"DVERGE needs members with feature taps (phalanx.models.FeatureNet), got "
                           f"{type(member).__name__}")
    return int(depth)


def epoch_layers(depths: list[int], generator: torch.Generator) -> list[int]:
    """One random distillation layer per member for an epoch.

    One uniform draw ``u`` maps to ``floor(u * depth_m) + 1`` for each member: with equal depths
    this is the reference's single ``random.randint(1, depth)`` for all members (REFERENCE-FACTS),
    and heterogeneous members get the same relative depth."""
    u = float(torch.rand((), generator=generator))
    return [min(d, int(u * d) + 1) for d in depths]


def _has_batchnorm(m: nn.Module) -> bool:
    return any(isinstance(mod, _BatchNorm) for mod in m.modules())


def cross_member_loss(members: list[nn.Module] | nn.ModuleList, distilled: list[Tensor], y: Tensor) -> Tensor:
    """(M,) DVERGE eq. (5) per member: ``sum_{j != i} CE(f_i(x'_j), y_s)`` (a sum over the other
    members, each CE a batch mean; REFERENCE-FACTS). Members without BatchNorm see the other
    members' distilled batches in one forward pass (identical result); with BatchNorm, one pass per
    batch, so batch statistics are those of the reference. (Concatenating would normalise with
    pooled statistics and update the running statistics once; the exact alternative, per-chunk
    BatchNorm on a concatenated batch, does the same FLOPs and measured slower on CPU:
    BENCHMARKS.md, "DVERGE cross-member term".)"""
    out = []
    for i, m in enumerate(members):
        others = [d for j, d in enumerate(distilled) if j != i]
        if _has_batchnorm(m):
            out.append(sum(nn.functional.cross_entropy(m(d), y) for d in others))
        else:
            z = m(torch.cat(others))
            out.append(nn.functional.cross_entropy(z, y.repeat(len(others))) * len(others))
    return torch.stack(out)  # type: ignore[arg-type]


@METHODS.register("dverge", "DVERGE: round-robin training on the other members' distilled features (eq. 5)")
@dataclass
class DVERGE(TrainingMethod):
    """DVERGE eq. (5): member i minimises ``sum_{j != i} CE(f_i(x'_j), y_s)`` where
    ``x'_j = feature_distillation(f_j, x_s, x_t, l)`` (eq. 1) distils the layer-l features of an
    independently shuffled target batch ``x_t`` into the source batch ``(x_s, y_s)``.

    - The layer is drawn once per epoch (uniform over 1..depth, the last being the logits) from
      the epoch's generator, unless ``layer`` fixes it (appendix C.5's ablation).
    - All distilled batches are computed before any update (Algorithm 1 lines 12-13), so each
      member's loss depends on that member only; one optimizer step over the summed losses is the
      reference's round-robin of per-member SGD steps.
    - ``plus_adv`` (DVERGE+AdvT, appendix C.4 eq. 6 as the reference code): member i's loss is
      ``lam * sum_{j != i} CE(f_i(x'_j), y_s) + CE(f_i(PGD_i(x_s)), y_s)`` where PGD attacks member
      i alone (random start, 10 steps of 2/255 in 8/255; appendix A).
    - ``smd_lambda > 0`` is SMD+ (bogun2022 sec. 4.2): adds ``smd_lambda * L_SMD`` (SMD eq. 2) on
      the clean source batch.
    - Distillation and PGD run with members in train mode by default, as the reference (BatchNorm
      uses batch statistics and updates its running statistics); ``generation='eval'`` changes it.
    - Start from a pre-trained baseline ensemble (the paper) or from scratch (appendix C.6); the
      paper's schedule is SGD lr 0.1, x0.1 at 50% and 75% of 200 epochs.
    """

    name: ClassVar[str] = "dverge"
    needs_target_batch: ClassVar[bool] = True
    generation_mode: ClassVar[str] = "train"

    eps: float = 0.07  #: distillation L-inf radius (DVERGE sec. 4.1 / REFERENCE-FACTS)
    steps: int = 10  #: distillation steps (REFERENCE-FACTS)
    step_size: float = 0.007  #: absolute distillation step (REFERENCE-FACTS)
    momentum: float = 1.0  #: MI-FGSM momentum in distillation (REFERENCE-FACTS)
    layer: int | None = None  #: fixed feature layer; None draws one per epoch (sec. 3.3)
    lam: float = 1.0  #: weight of the DVERGE term (appendix C.4 eq. 6's balance lambda = 1.0)
    plus_adv: bool = False  #: DVERGE+AdvT (appendix C.4)
    adv_eps: float = 8 / 255  #: PGD radius of the AdvT term (appendix A)
    adv_steps: int = 10  #: PGD steps of the AdvT term (appendix A)
    adv_step_size: float = 2 / 255  #: absolute PGD step of the AdvT term (appendix A)
    smd_lambda: float = 0.0  #: SMD weight; > 0 makes this SMD+ (bogun2022: lambda = 1)
    saliency: str = "prob"  #: SMD saliency output (see phalanx.training.smd.SMD)
    bounds: tuple[float, float] = (0.0, 1.0)
    generation: str = "train"  #: members' mode while distilling / attacking (reference: train)

    def __post_init__(self) -> None:
        check_positive(eps=self.eps, step_size=self.step_size)
        check_nonneg(momentum=self.momentum, lam=self.lam, smd_lambda=self.smd_lambda, adv_eps=self.adv_eps)
        check_steps(steps=self.steps, adv_steps=self.adv_steps)
        check_positive(adv_step_size=self.adv_step_size)
        check_choice("generation", self.generation, GENERATION_MODES)
        check_choice("saliency", self.saliency, SALIENCY_OUTPUTS)
        if self.layer is not None:
            check_steps(layer=self.layer)
        self.bounds = (float(self.bounds[0]), float(self.bounds[1]))
        self._layers: list[int] = []

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["variant"] = "smd+" if self.smd_lambda > 0 else ("dverge+advt" if self.plus_adv else "dverge")
        return d

    def start_epoch(self, ensemble: Ensemble, ctx: StepContext) -> None:
        depths = [feature_depth(m) for m in ensemble.members]
        if self.layer is not None:
            bad = [d for d in depths if self.layer > d]
            if bad:
                raise PhalanxError(f"DVERGE layer {self.layer} out of range; accepted: 1..{min(depths)}")
            self._layers = [self.layer] * len(depths)
        else:
            self._layers = epoch_layers(depths, ctx.generator)
        ctx.epoch_state["dverge_layers"] = list(self._layers)

    def distill(self, ensemble: Ensemble, x_source: Tensor, x_target: Tensor) -> list[Tensor]:
        """Every member's distilled batch (eq. 1) at this epoch's layers."""
        return [feature_distillation(m, x_source, x_target, layer, eps=self.eps, steps=self.steps,  # type: ignore[arg-type]
                                     step_size=self.step_size, momentum=self.momentum, bounds=self.bounds)
                for m, layer in zip(ensemble.members, self._layers)]

    def loss(self, ensemble: Ensemble, batch: Batch, ctx: StepContext) -> LossOutput:
        if len(ensemble) < 2:
            raise PhalanxError(f"DVERGE needs at least 2 members, got {len(ensemble)}")
        if batch.x_target is None:
            raise PhalanxError("DVERGE needs a target batch (batch.x_target); train it with phalanx.training.fit")
        if len(self._layers) != len(ensemble):
            self.start_epoch(ensemble, ctx)
        xs, ys = batch.x, batch.y
        with generation_mode(ensemble, self.generation):
            distilled = self.distill(ensemble, xs, batch.x_target[: xs.shape[0]])
            advs = self._member_pgd(ensemble, xs, ys, ctx) if self.plus_adv else []
        div = cross_member_loss(ensemble.members, distilled, ys)
        loss = self.lam * div.sum()
        metrics: dict[str, Tensor] = {"dverge": div.detach().mean()}
        if advs:
            adv_ce = torch.stack([nn.functional.cross_entropy(m(a), ys) for m, a in zip(ensemble.members, advs)])
            loss = loss + adv_ce.sum()
            metrics["adv_ce"] = adv_ce.detach().mean()
        if self.smd_lambda > 0:
            smd, _ = smd_term(ensemble.members, xs, ys, self.saliency)
            loss = loss + self.smd_lambda * smd
            metrics["smd"] = smd.detach()
        return LossOutput(loss, metrics)

    def _member_pgd(self, ensemble: Ensemble, x: Tensor, y: Tensor, ctx: StepContext) -> list[Tensor]:
        """PGD against each member alone (reference: plus_adv attacks member i, not the ensemble)."""
        if self.adv_eps == 0:
            return [x.detach() for _ in ensemble.members]
        attack = GradientAttack(name="pgd", steps=self.adv_steps, step_size=self.adv_step_size / self.adv_eps,
                                random_start=True)
        threat = ThreatModel(Norm.LINF, self.adv_eps, self.bounds)
        return [attack(m, x, y, threat, generator=ctx.generator) for m in ensemble.members]


register_variant("dverge+advt", DVERGE, "DVERGE + adversarial training (DVERGE appendix C.4, lambda = 1)",
                 plus_adv=True)
register_variant("smd+", DVERGE, "SMD+: DVERGE with the SMD regularizer added (bogun2022, lambda = 1)",
                 smd_lambda=1.0)
