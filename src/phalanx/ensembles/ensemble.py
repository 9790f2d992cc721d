"""An ensemble of member classifiers with an explicit combination rule."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from phalanx.errors import PhalanxError
from phalanx.types import parse_enum

LOG_CLAMP = 1e-40  # DVERGE reference: log(mean softmax) clamped at 1e-40


class Combiner(str, enum.Enum):
    """How member outputs are combined into the ensemble's prediction."""

    MEAN_PROB = "mean-prob"  # DVERGE, SMD: log of the mean of member softmaxes
    MEAN_LOGITS = "mean-logits"  # softmax of the mean of member logits (piecewise linear)
    MAX_PROB = "max-prob"  # iGAT's Ensemble_max: per class, the largest member probability

    @classmethod
    def parse(cls, value: str | Combiner) -> Combiner:
        return parse_enum(cls, value, "combiner")


def combine(member_logits: Tensor, combiner: Combiner | str) -> Tensor:
    """Combine (M, B, K) member logits into (B, K) log-probabilities of the ensemble.

    - mean-prob: ``log(mean_m softmax(z_m))`` clamped at 1e-40;
    - mean-logits: ``log_softmax(mean_m z_m)``;
    - max-prob: ``log(q / sum_k q_k)`` with ``q_k = max_m softmax(z_m)_k`` (the argmax is the
      class that some member is most confident in, as iGAT's max ensemble).
    """
    comb = Combiner.parse(combiner)
    if member_logits.dim() != 3:
        raise PhalanxError(f"member logits must have shape (M, B, K), got {tuple(member_logits.shape)}")
    if comb is Combiner.MEAN_LOGITS:
        return torch.log_softmax(member_logits.mean(0), dim=-1)
    if comb is Combiner.MEAN_PROB:
        # logsumexp form of log(mean softmax): exact and stable
        lp = torch.log_softmax(member_logits, dim=-1)
        out = torch.logsumexp(lp, dim=0) - math.log(member_logits.shape[0])
        return out.clamp_min(math.log(LOG_CLAMP))
    lp = torch.log_softmax(member_logits, dim=-1).amax(0)
    return lp - torch.logsumexp(lp, dim=-1, keepdim=True)


class Ensemble(nn.Module):
    """Members in an ``nn.ModuleList``; ``forward`` returns (B, K) log-probabilities."""

    def __init__(self, members: Sequence[nn.Module], combiner: Combiner | str = Combiner.MEAN_PROB) -> None:
        super().__init__()
        if len(members) < 1:
            raise PhalanxError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.combiner = Combiner.parse(combiner)
        self._check_compatible()

    def _check_compatible(self) -> None:
        shapes = {tuple(getattr(m, "in_shape", ())) for m in self.members}
        classes = {getattr(m, "num_classes", None) for m in self.members}
        shapes.discard(())
        classes.discard(None)
        if len(shapes) > 1:
            raise PhalanxError(f"ensemble members disagree on input shape: {sorted(shapes)}")
        if len(classes) > 1:
            raise PhalanxError(f"ensemble members disagree on class count: {sorted(classes)}")  # type: ignore[type-var]

    def __len__(self) -> int:
        return len(self.members)

    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(getattr(self.members[0], "in_shape", ()))

    @property
    def num_classes(self) -> int:
        return int(getattr(self.members[0], "num_classes", 0))

    def member_logits(self, x: Tensor) -> Tensor:
        """(M, B, K) logits of every member."""
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: Tensor) -> Tensor:
        return combine(self.member_logits(x), self.combiner)

    def predict(self, x: Tensor) -> Tensor:
        return self.forward(x).argmax(-1)

    def subset(self, indices: Sequence[int]) -> Ensemble:
        """A view on the chosen members (shares their parameters)."""
        idx = list(indices)
        if not idx or any(not 0 <= i < len(self) for i in idx) or len(set(idx)) != len(idx):
            raise PhalanxError(f"member indices must be distinct and in 0..{len(self) - 1}, got {idx}")
        return Ensemble([self.members[i] for i in idx], self.combiner)
