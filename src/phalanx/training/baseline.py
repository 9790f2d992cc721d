"""Independent members: each trained with its own cross-entropy (the papers' baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from phalanx.ensembles import Ensemble
from phalanx.training.base import METHODS, Batch, LossOutput, StepContext, TrainingMethod


def member_cross_entropy(member_logits: Tensor, y: Tensor) -> Tensor:
    """(M,) mean cross-entropy of each member: ``CE(z_m, y)`` averaged over the batch."""
    m, b, k = member_logits.shape
    per = F.cross_entropy(member_logits.reshape(m * b, k), y.repeat(m), reduction="none")
    return per.view(m, b).mean(1)


@METHODS.register("baseline", "independent members, each with its own cross-entropy")
@dataclass
class Baseline(TrainingMethod):
    """Loss = sum over members of their mean cross-entropy (independent training)."""

    name: ClassVar[str] = "baseline"

    def loss(self, ensemble: Ensemble, batch: Batch, ctx: StepContext) -> LossOutput:
        logits = ensemble.member_logits(batch.x)
        ce = member_cross_entropy(logits, batch.y)
        with torch.no_grad():
            acc = (logits.argmax(-1) == batch.y).float().mean()
        return LossOutput(ce.sum(), {"ce": ce.detach().mean(), "member_acc": acc})
