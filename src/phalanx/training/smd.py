"""SMD: Saliency Map Diversification (bogun2022, eqs. 1-3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from phalanx.ensembles import Ensemble
from phalanx.training.base import METHODS, Batch, LossOutput, StepContext, TrainingMethod
from phalanx.training.baseline import member_cross_entropy
from phalanx.training.common import SALIENCY_OUTPUTS, check_choice, check_nonneg, member_input_gradients
from phalanx.training.regularizers import smd_regularizer


def smd_term(members: list[nn.Module] | nn.ModuleList, x: Tensor, y: Tensor,
             saliency: str = "prob") -> tuple[Tensor, Tensor]:
    """(mean over the batch of SMD eq. (2), member logits (M, B, K)) on clean ``x``."""
    sal, logits = member_input_gradients(members, x, y, kind=saliency)
    if sal.shape[0] < 2:
        return logits.new_zeros(()), logits
    return smd_regularizer(sal).mean(), logits


@METHODS.register("smd", "SMD: member cross-entropy + lambda * saliency-map diversity (bogun2022 eq. 3)")
@dataclass
class SMD(TrainingMethod):
    """``L = sum_m CE_m + lam * L_SMD`` (SMD eq. 3; both terms averaged over the batch, as eq. 3
    sums both over x). ``L_SMD`` is eq. (2), the log-sum-exp over member pairs of the cosine
    similarity of the saliencies ``s_m = d f_m(x)[y] / dx`` (eq. 1).

    The paper calls ``f_m(x)`` the member's *prediction* and uses the same word for the class
    probabilities in its ADP summary, so the default saliency is that of the softmax probability
    of the true class (``saliency='prob'``); ``saliency='logit'`` uses the true-class logit.
    The paper trains with Adam, lr 1e-3, weight decay 1e-4, batch 128, 50 epochs on MNIST.
    """

    name: ClassVar[str] = "smd"

    lam: float = 1.0  #: SMD weight lambda (bogun2022 sec. 4.2: lambda = 1 in all experiments)
    saliency: str = "prob"  #: 'prob' (softmax of the true class) or 'logit'

    def __post_init__(self) -> None:
        check_nonneg(lam=self.lam)
        check_choice("saliency", self.saliency, SALIENCY_OUTPUTS)

    def loss(self, ensemble: Ensemble, batch: Batch, ctx: StepContext) -> LossOutput:
        smd, logits = smd_term(ensemble.members, batch.x, batch.y, self.saliency)
        ce = member_cross_entropy(logits, batch.y)
        return LossOutput(ce.sum() + self.lam * smd, {"ce": ce.detach().mean(), "smd": smd.detach()})
