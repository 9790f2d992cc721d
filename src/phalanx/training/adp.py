"""ADP: Adaptive Diversity Promoting (Pang et al. 2019), as summarised in the SMD paper sec. 2.2
and implemented in the reference ports (REFERENCE-FACTS 'ADP')."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from phalanx.ensembles import Ensemble
from phalanx.training.base import METHODS, Batch, LossOutput, StepContext, TrainingMethod
from phalanx.training.baseline import member_cross_entropy
from phalanx.training.common import check_nonneg, check_positive
from phalanx.training.regularizers import adp_log_det, ensemble_entropy


@METHODS.register("adp", "ADP: cross-entropy - alpha * ensemble entropy - beta * log-det diversity")
@dataclass
class ADP(TrainingMethod):
    """``L = sum_m CE_m - alpha * H(mean_m p_m) - beta * logdet(P~ P~^T + log_det_eps * I)``,
    each term averaged over the batch (SMD paper sec. 2.2: the ADP regularizer is subtracted from
    the loss; REFERENCE-FACTS: CE summed over members, P~ the L2-normalised non-true-class
    probabilities). The reference trains ADP with Adam, lr 1e-3 (DVERGE appendix A).
    """

    name: ClassVar[str] = "adp"

    alpha: float = 2.0  #: entropy weight (Pang et al. 2019; REFERENCE-FACTS)
    beta: float = 0.5  #: log-det weight (Pang et al. 2019; REFERENCE-FACTS)
    log_det_eps: float = 1e-6  #: offset on the Gram matrix's diagonal (REFERENCE-FACTS)
    entropy_eps: float = 1e-20  #: inside the entropy's log (REFERENCE-FACTS)

    def __post_init__(self) -> None:
        check_nonneg(alpha=self.alpha, beta=self.beta)
        check_positive(log_det_eps=self.log_det_eps, entropy_eps=self.entropy_eps)

    def loss(self, ensemble: Ensemble, batch: Batch, ctx: StepContext) -> LossOutput:
        logits = ensemble.member_logits(batch.x)
        ce = member_cross_entropy(logits, batch.y)
        probs = torch.softmax(logits, -1)
        ent = ensemble_entropy(probs, self.entropy_eps).mean()
        if len(ensemble) > 1:
            logdet = adp_log_det(probs, batch.y, self.log_det_eps).mean()
        else:
            logdet = probs.new_zeros(())
        loss = ce.sum() - self.alpha * ent - self.beta * logdet
        return LossOutput(loss, {"ce": ce.detach().mean(), "entropy": ent.detach(), "log_det": logdet.detach()})
