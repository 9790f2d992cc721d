"""GAL: Gradient Alignment Loss (Kariyappa & Qureshi 2019) as summarised in the SMD paper
sec. 2.2 and ported in the DVERGE repository (REFERENCE-FACTS 'GAL')."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from phalanx.ensembles import Ensemble
from phalanx.training.base import METHODS, Batch, LossOutput, StepContext, TrainingMethod
from phalanx.training.baseline import member_cross_entropy
from phalanx.training.common import check_nonneg, member_input_gradients, warn_if_relu
from phalanx.training.regularizers import gal_regularizer

log = logging.getLogger(__name__)


@METHODS.register("gal", "GAL: mean member cross-entropy + lambda * log-sum-exp of gradient cosines")
@dataclass
class GAL(TrainingMethod):
    """``L = mean_m CE_m + lam * mean_batch log sum_{i<j} exp(cos(grad_x CE_i, grad_x CE_j))``.

    The CE is averaged over members as in the DVERGE repository's port (``ce_loss / M``).
    Members should use leaky ReLU (DVERGE appendix A: "GAL requires the ReLU function to be
    replaced with leaky ReLU to avoid gradient vanishing"); with plain ReLU a warning is logged.
    ``noise_std > 0`` adds Gaussian-noise augmentation ``x + N(0, noise_std^2)`` (clamped to
    ``bounds``) drawn from the step's generator. The reference trains with Adam, lr 1e-3.
    """

    name: ClassVar[str] = "gal"

    lam: float = 0.5  #: coherence weight (Kariyappa & Qureshi 2019; DVERGE port's default)
    log_offset: float = 1e-20  #: inside the log-sum-exp (DVERGE port)
    noise_std: float = 0.0  #: Gaussian-noise augmentation std (0 = off)
    bounds: tuple[float, float] = (0.0, 1.0)  #: input range for the noise clamp

    def __post_init__(self) -> None:
        check_nonneg(lam=self.lam, log_offset=self.log_offset, noise_std=self.noise_std)
        self.bounds = (float(self.bounds[0]), float(self.bounds[1]))
        self._warned = False

    def start_epoch(self, ensemble: Ensemble, ctx: StepContext) -> None:
        if not self._warned:
            warn_if_relu(ensemble, "gal", log)
            self._warned = True

    def loss(self, ensemble: Ensemble, batch: Batch, ctx: StepContext) -> LossOutput:
        x = batch.x
        if self.noise_std > 0:
            noise = torch.randn(x.shape, generator=ctx.generator, dtype=x.dtype).to(x.device)
            x = (x + self.noise_std * noise).clamp(*self.bounds)
        grads, logits = member_input_gradients(ensemble.members, x, batch.y, kind="ce")
        ce = member_cross_entropy(logits, batch.y)
        coh = (gal_regularizer(grads, self.log_offset).mean() if len(ensemble) > 1
               else logits.new_zeros(()))
        loss = ce.mean() + self.lam * coh
        return LossOutput(loss, {"ce": ce.detach().mean(), "coherence": coh.detach()})
