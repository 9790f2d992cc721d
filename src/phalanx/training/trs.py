"""TRS: Transferability Reduced Smooth ensembles (Yang et al. 2021), as summarised in the iGAT
paper and implemented in its reference code (REFERENCE-FACTS 'TRS')."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from phalanx.attacks import ascend, random_start
from phalanx.ensembles import Ensemble
from phalanx.training.base import METHODS, Batch, LossOutput, StepContext, TrainingMethod
from phalanx.training.baseline import member_cross_entropy
from phalanx.training.common import (
    GENERATION_MODES,
    check_choice,
    check_nonneg,
    check_positive,
    check_steps,
    generation_mode,
    member_input_gradients,
)
from phalanx.training.regularizers import trs_cosine_loss, trs_smoothness
from phalanx.types import Norm, ThreatModel


def trs_eps(epoch: int, epochs: int, init_eps: float, adv_eps: float) -> float:
    """The reference's linear ramp ``init_eps + (adv_eps - init_eps) * epoch / epochs`` (0-based epoch)."""
    return init_eps + (adv_eps - init_eps) * epoch / max(epochs, 1)


def smoothness_pgd(ensemble: Ensemble, x: Tensor, y: Tensor, eps: float, *, steps: int = 6,
                   step_size: float = 1.0 / 3, bounds: tuple[float, float] = (0.0, 1.0),
                   generator: torch.Generator | None = None) -> Tensor:
    """TRS's PGD: from a uniform random start, ``steps`` signed steps of ``step_size * eps`` that
    *increase* ``sum_m Magnitude(grad_x CE_m)``; the reference never zeroes ``adv.grad``, so each
    step follows the sign of the accumulated gradient (``ascend`` with un-normalised momentum 1).
    Runs through :func:`phalanx.attacks.ascend`, the one gradient loop; mode is left as is."""
    threat = ThreatModel(Norm.LINF, eps, bounds)
    if eps == 0:
        return x.detach().clone()

    def objective(adv: Tensor) -> tuple[Tensor, None]:
        grads, _ = member_input_gradients(ensemble.members, adv, y, kind="ce", create_graph=True)
        m, b = grads.shape[:2]
        # per-example share of sum_m 2 * mean_batch ||g||^2 (summing over the batch gives it back)
        return 2 * grads.reshape(m, b, -1).pow(2).sum(-1).sum(0) / b, None

    start = random_start(x.detach(), threat, generator)
    return ascend(objective, x.detach(), start, threat, steps=steps, step_size=step_size * eps,
                  momentum=1.0, normalize_momentum=False)


@METHODS.register("trs", "TRS: cross-entropy + scale * (coeff * |gradient cosine| + lamda * smoothness)")
@dataclass
class TRS(TrainingMethod):
    """``L = sum_m CE_m + scale * (coeff * cos + lamda * smooth)`` (REFERENCE-FACTS 'TRS').

    ``cos`` is the mean over member pairs of ``mean_batch |cos(g_i, g_j)|`` with
    ``g_m = grad_x CE_m`` (batch-mean CE, as the reference) on the clean batch; ``smooth`` is
    ``mean_m 2 * mean_batch ||g_m||^2``. With ``plus_adv`` the smoothness is evaluated on
    ``[first half clean; second half through smoothness_pgd]`` with eps ramped linearly from
    ``init_eps`` to ``adv_eps`` over the epochs; otherwise on the clean batch. Generation runs with
    members in train mode by default, as the reference (``generation='eval'`` to change it).
    The reference optimiser is Adam, lr 1e-3, StepLR(40, 0.1) for 120 epochs.
    """

    name: ClassVar[str] = "trs"
    generation_mode: ClassVar[str] = "train"

    coeff: float = 2.0  #: gradient-similarity weight (TRS train_trs.py default)
    lamda: float = 2.0  #: smoothness weight (TRS train_trs.py default)
    scale: float = 5.0  #: extra factor on both regularizers (TRS train_trs.py default)
    plus_adv: bool = True  #: smoothness on half-PGD'd data (the TRS README's runs use --plus-adv)
    init_eps: float = 0.1  #: first-epoch PGD eps (TRS default)
    adv_eps: float = 0.2  #: last-epoch PGD eps (TRS default)
    steps: int = 6  #: PGD steps (TRS trainer)
    step_size: float = 1.0 / 3  #: PGD step as a fraction of the current eps (TRS: eps / 3)
    bounds: tuple[float, float] = (0.0, 1.0)
    generation: str = "train"  #: members' mode during PGD (reference: train)

    def __post_init__(self) -> None:
        check_nonneg(coeff=self.coeff, lamda=self.lamda, scale=self.scale, init_eps=self.init_eps,
                     adv_eps=self.adv_eps)
        check_positive(step_size=self.step_size)
        check_steps(steps=self.steps)
        check_choice("generation", self.generation, GENERATION_MODES)
        self.bounds = (float(self.bounds[0]), float(self.bounds[1]))

    def loss(self, ensemble: Ensemble, batch: Batch, ctx: StepContext) -> LossOutput:
        x, y = batch.x, batch.y
        grads, logits = member_input_gradients(ensemble.members, x, y, kind="ce")
        ce = member_cross_entropy(logits, y)
        cos = trs_cosine_loss(grads) if len(ensemble) > 1 else logits.new_zeros(())
        metrics: dict[str, Tensor] = {"ce": ce.detach().mean(), "cos": cos.detach()}
        if self.plus_adv and x.shape[0] >= 2:
            half = x.shape[0] // 2
            eps = trs_eps(ctx.epoch, ctx.epochs, self.init_eps, self.adv_eps)
            with generation_mode(ensemble, self.generation):
                adv = smoothness_pgd(ensemble, x[half:], y[half:], eps, steps=self.steps,
                                     step_size=self.step_size, bounds=self.bounds, generator=ctx.generator)
            x_s = torch.cat([x[:half].detach(), adv])
            grads_s, _ = member_input_gradients(ensemble.members, x_s, y, kind="ce")
            smooth = trs_smoothness(grads_s)
            metrics["pgd_eps"] = torch.tensor(eps)
        else:
            smooth = trs_smoothness(grads)
        metrics["smooth"] = smooth.detach()
        loss = ce.sum() + self.scale * (self.coeff * cos + self.lamda * smooth)
        return LossOutput(loss, metrics)
