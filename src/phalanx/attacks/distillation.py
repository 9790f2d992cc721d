"""DVERGE's feature distillation (Yang et al. 2020, eq. 1), as a function and as an attack.

``x' = argmin_{||x' - x_s||_inf <= eps} || f^l(x') - f^l(x_t) ||^2``: an input that looks like the
source ``x_s`` but whose layer-``l`` pre-activation features mimic those of the target ``x_t``.
REFERENCE-FACTS (``distillation.Linf_distillation``): 10 signed steps of 0.007 within eps 0.07,
no random start, MI-FGSM momentum (``g <- 1 * g + grad / ||grad||_1``), features before the ReLU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from phalanx.attacks.base import ATTACKS, Attack, prepare
from phalanx.attacks.gradient import ascend
from phalanx.errors import PhalanxError
from phalanx.models.inference import inference_view
from phalanx.types import Norm, ThreatModel, check_eps


class FeatureModel(Protocol):
    """Anything with DVERGE's feature taps (e.g. :class:`phalanx.models.FeatureNet`)."""

    def features(self, x: Tensor, layer: int) -> Tensor: ...


def feature_distillation(model: FeatureModel, x_source: Tensor, x_target: Tensor, layer: int, *,
                         eps: float = 0.07, steps: int = 10, step_size: float = 0.007,
                         momentum: float = 1.0, bounds: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """DVERGE eq. (1): distil the layer-``layer`` features of ``x_target`` into ``x_source``.

    Returns ``x'`` (detached, same shape/dtype/device as ``x_source``) in the L-inf ``eps``-ball
    of ``x_source`` and in ``bounds``, after ``steps`` signed steps of ``step_size`` (absolute)
    that decrease ``MSE(model.features(x', layer), model.features(x_target, layer))``, with
    MI-FGSM momentum and no random start. Gradients are taken w.r.t. the input only, so the
    model's parameters, their ``.grad`` and its train/eval mode are untouched (in train mode,
    BatchNorm running statistics are updated by the forward passes, as in the DVERGE reference;
    in eval mode the model's inference view is differentiated, :mod:`phalanx.models.inference`).
    """
    if x_source.shape != x_target.shape:
        raise PhalanxError(f"source and target batches must have the same shape, got "
                           f"{tuple(x_source.shape)} and {tuple(x_target.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PhalanxError(f"steps must be an integer >= 1, got {steps!r}")
    if not step_size > 0:
        raise PhalanxError(f"step_size must be > 0, got {step_size!r}")
    threat = ThreatModel(Norm.LINF, check_eps(eps, bounds[1] - bounds[0]), bounds)
    x_source = x_source.detach()
    model = inference_view(model)  # type: ignore[arg-type, assignment]  # taps keep their values
    with torch.no_grad():
        goal = model.features(x_target.detach(), layer).detach()

    def objective(adv: Tensor) -> tuple[Tensor, None]:
        feats = model.features(adv, layer)
        return -(feats - goal).pow(2).flatten(1).mean(1), None  # maximise -MSE

    return ascend(objective, x_source, x_source, threat, steps=steps, step_size=step_size, momentum=momentum)


def _feature_model(model: nn.Module, member: int) -> nn.Module:
    members = getattr(model, "members", None)
    if members is not None:
        if not 0 <= member < len(members):
            raise PhalanxError(f"member {member} out of range; accepted: 0..{len(members) - 1}")
        return members[member]  # type: ignore[no-any-return]
    return model


@dataclass(frozen=True)
class DistillationAttack(Attack):
    """Feature distillation used as an attack: each example's features at ``layer`` are pulled
    towards those of another example of the batch (a random permutation drawn from the
    generator; DVERGE pairs a second independent shuffle of the data). On an ensemble it
    attacks member ``member``. ``layer=None`` means the last feature layer (the logits); the
    step is ``step_size * eps`` (DVERGE: 0.007 = eps 0.07 / 10)."""

    name: str = "distill"
    layer: int | None = None
    member: int = 0
    steps: int = 10
    step_size: float = 0.1
    momentum: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise PhalanxError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not self.step_size > 0:
            raise PhalanxError(f"step_size must be > 0 (a fraction of eps), got {self.step_size!r}")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
                 generator: torch.Generator | None = None, target: Tensor | None = None) -> Tensor:
        model = prepare(model, x, y)
        if threat.norm is not Norm.LINF:
            raise PhalanxError(f"feature distillation is an L-inf attack, got norm {threat.norm.value!r}")
        net = _feature_model(model, self.member)
        if not hasattr(net, "features"):
            raise PhalanxError("feature distillation needs a model with feature taps (phalanx.models.FeatureNet)")
        layer = self.layer if self.layer is not None else int(getattr(net, "num_feature_layers"))  # noqa: B009
        if threat.eps == 0:
            return x.detach().clone()
        x_target = target if target is not None else x[torch.randperm(x.shape[0], generator=generator).to(x.device)]
        return feature_distillation(net, x, x_target, layer, eps=threat.eps, steps=self.steps,  # type: ignore[arg-type]
                                    step_size=self.step_size * threat.eps, momentum=self.momentum,
                                    bounds=threat.bounds)


@ATTACKS.register("distill", "DVERGE feature distillation (eq. 1) towards a shuffled batch, one member")
def distill(layer: int | None = None, member: int = 0, steps: int = 10, step_size: float = 0.1,
            momentum: float = 1.0) -> DistillationAttack:
    return DistillationAttack(layer=layer, member=member, steps=steps, step_size=step_size, momentum=momentum)


__all__ = ["DistillationAttack", "FeatureModel", "distill", "feature_distillation"]
