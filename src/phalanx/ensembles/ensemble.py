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
    VOTE = "vote"  # majority vote of hard labels; only where no tie can occur (see Ensemble)
    VOTE_PROB = "vote-prob"  # majority vote, ties broken by the larger mean member probability
    VOTE_INDEX = "vote-index"  # majority vote, ties broken by the smaller class index
    RANDOM = "random"  # one member drawn per query with fixed probabilities (Gross et al. 2022)

    @classmethod
    def parse(cls, value: str | Combiner) -> Combiner:
        return parse_enum(cls, value, "combiner")

    @property
    def voting(self) -> bool:
        return self in (Combiner.VOTE, Combiner.VOTE_PROB, Combiner.VOTE_INDEX)

    @property
    def randomized(self) -> bool:
        return self is Combiner.RANDOM


#: MORA's soft vote (models/ensemble_voting.py): each member's logits rescaled so that its
#: top-1/top-2 margin equals this value before the softmax
VOTE_SHARPNESS = 10.0


def soft_vote(member_logits: Tensor, sharpness: float = VOTE_SHARPNESS) -> Tensor:
    """Differentiable surrogate of a majority vote (Yu et al. 2022, MORA's voting ensemble):
    ``mean_m softmax(z_m * sharpness / gap_m)`` with ``gap_m`` member m's top-1 minus top-2
    logit, held constant (detached). Each member contributes an almost one-hot vote whose
    gradient still points across its decision boundary. Returns (B, K) probabilities."""
    top2 = member_logits.detach().topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).clamp_min(1e-12)[..., None]
    return torch.softmax(member_logits * (sharpness / gap), dim=-1).mean(0)


def vote_scores(member_logits: Tensor, combiner: Combiner | str) -> Tensor:
    """(B, K) vote counts of (M, B, K) logits plus terms below half a vote whose argmax is the
    vote's winner with the combiner's tie rule, and through which gradients flow:

    - ``vote-prob``: ``+ 0.5 * mean_m softmax(z_m)`` (ties go to the larger mean probability);
    - ``vote-index``: ``+ 0.5 (K - 1 - k) / K + 0.25 / K * soft_vote`` (the smaller index wins;
      the soft-vote term is below half the gap between two index terms);
    - ``vote``: ``+ 0.25 * soft_vote`` (use it only where no tie can occur).

    The counts themselves are piecewise constant; the added terms give gradient attacks the
    direction across the members' boundaries (:func:`soft_vote`, MORA's voting surrogate)."""
    comb = Combiner.parse(combiner)
    k = member_logits.shape[-1]
    counts = torch.nn.functional.one_hot(member_logits.argmax(-1), k).to(member_logits.dtype).sum(0)
    if comb is Combiner.VOTE_PROB:
        return counts + 0.5 * torch.softmax(member_logits, dim=-1).mean(0)
    if comb is Combiner.VOTE_INDEX:
        order = torch.arange(k - 1, -1, -1, device=counts.device, dtype=counts.dtype) / k
        return counts + 0.5 * order + (0.25 / k) * soft_vote(member_logits)
    return counts + 0.25 * soft_vote(member_logits)


def draw_probabilities(member_logits: Tensor, weights: Tensor) -> Tensor:
    """(B, K) probability that a randomized ensemble answers class k: ``sum_m w_m [argmax z_m = k]``
    (one member drawn with probabilities ``weights`` per query; Gross et al. 2022, Def. 1)."""
    k = member_logits.shape[-1]
    onehot = torch.nn.functional.one_hot(member_logits.argmax(-1), k).to(member_logits.dtype)
    return (weights.to(onehot.dtype)[:, None, None] * onehot).sum(0)


#: weight of the member-probability mixture added to a randomized ensemble's answer probabilities
MIXTURE_WEIGHT = 1e-3


def combine(member_logits: Tensor, combiner: Combiner | str, weights: Tensor | None = None) -> Tensor:
    """Combine (M, B, K) member logits into (B, K) log-probabilities of the ensemble.

    - mean-prob: ``log(mean_m softmax(z_m))`` clamped at 1e-40;
    - mean-logits: ``log_softmax(mean_m z_m)``;
    - max-prob: ``log(q / sum_k q_k)`` with ``q_k = max_m softmax(z_m)_k`` (the argmax is the
      class that some member is most confident in, as iGAT's max ensemble);
    - vote, vote-prob, vote-index: ``log`` of the normalised :func:`vote_scores` (argmax = the
      majority vote with the stated tie rule; gradients through its differentiable terms);
    - random: ``log((d + c q) / (1 + c))`` with ``d`` :func:`draw_probabilities` (uniform
      ``weights`` if None), ``q = sum_m w_m softmax(z_m)`` the mixture and ``c`` =
      :data:`MIXTURE_WEIGHT`: ``exp(output)[y]`` is the expected correctness up to ``c`` (exactly:
      :func:`expected_correct`), ties between equally likely answers go to the larger mixture
      probability, and gradient attacks on the output follow the mixture.
    """
    comb = Combiner.parse(combiner)
    if member_logits.dim() != 3:
        raise PhalanxError(f"member logits must have shape (M, B, K), got {tuple(member_logits.shape)}")
    if comb.voting:
        scores = vote_scores(member_logits, comb)
        return torch.log((scores / scores.sum(-1, keepdim=True)).clamp_min(LOG_CLAMP))
    if comb.randomized:
        m = member_logits.shape[0]
        w = weights if weights is not None else torch.full((m,), 1.0 / m, device=member_logits.device)
        w = w.to(member_logits.device, member_logits.dtype)
        mixture = (w[:, None, None] * torch.softmax(member_logits, dim=-1)).sum(0)
        d = draw_probabilities(member_logits, w)
        return torch.log(((d + MIXTURE_WEIGHT * mixture) / (1 + MIXTURE_WEIGHT)).clamp_min(LOG_CLAMP))
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
    """Members in an ``nn.ModuleList``; ``forward`` returns (B, K) log-probabilities. ``weights``
    are the member probabilities of the ``random`` combiner (uniform if None)."""

    weights: Tensor

    def __init__(self, members: Sequence[nn.Module], combiner: Combiner | str = Combiner.MEAN_PROB,
                 weights: Sequence[float] | Tensor | None = None) -> None:
        super().__init__()
        if len(members) < 1:
            raise PhalanxError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self._check_compatible()
        self.combiner = combiner  # validated by the setter
        self.register_buffer("weights", check_weights(weights, len(members), self.combiner), persistent=False)

    @property
    def combiner(self) -> Combiner:
        """How member outputs are combined. Assigning it (also after construction, e.g. when a
        loaded ensemble is fine-tuned with another combiner) validates it: a plain ``vote`` that
        can tie is refused."""
        return self._combiner

    @combiner.setter
    def combiner(self, value: Combiner | str) -> None:
        comb = Combiner.parse(value)
        if comb is Combiner.VOTE and vote_can_tie(len(self.members), self.num_classes):
            raise PhalanxError(
                f"combiner 'vote' with {len(self.members)} members and {self.num_classes or 'unknown'} classes can "
                "tie; give a tie rule: 'vote-prob' (the larger mean member probability wins) or 'vote-index' "
                "(the smaller class index wins)")
        self._combiner = comb

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

    @property
    def randomized(self) -> bool:
        """True for a randomized ensemble (one member drawn per query)."""
        return self.combiner.randomized

    def member_logits(self, x: Tensor) -> Tensor:
        """(M, B, K) logits of every member."""
        return torch.stack([m(x) for m in self.members])

    def combine(self, member_logits: Tensor) -> Tensor:
        """:func:`combine` with this ensemble's combiner and member probabilities."""
        return combine(member_logits, self.combiner, self.weights if self.randomized else None)

    def forward(self, x: Tensor) -> Tensor:
        return self.combine(self.member_logits(x))

    def correct_probability(self, member_logits: Tensor, y: Tensor) -> Tensor:
        """(B,) probability that the ensemble answers ``y`` from (M, B, K) member logits: exactly
        ``sum_m w_m [argmax z_m = y]`` for a randomized ensemble (the expectation over the draw,
        not one sample), else 0 or 1 for the combined output's argmax."""
        if self.randomized:
            return draw_probabilities(member_logits, self.weights).gather(-1, y[:, None]).squeeze(-1)
        return (self.combine(member_logits).argmax(-1) == y).to(member_logits.dtype)

    def predict(self, x: Tensor) -> Tensor:
        return self.forward(x).argmax(-1)

    def subset(self, indices: Sequence[int]) -> Ensemble:
        """A view on the chosen members (shares their parameters)."""
        idx = list(indices)
        if not idx or any(not 0 <= i < len(self) for i in idx) or len(set(idx)) != len(idx):
            raise PhalanxError(f"member indices must be distinct and in 0..{len(self) - 1}, got {idx}")
        w = None
        if self.randomized:
            w = self.weights[idx]
            if float(w.sum()) <= 0:
                raise PhalanxError(f"members {idx} have probability 0 in this randomized ensemble")
            w = w / w.sum()
        return Ensemble([self.members[i] for i in idx], self.combiner, w)


def vote_can_tie(members: int, classes: int) -> bool:
    """Whether a plain majority vote of ``members`` hard labels over ``classes`` can tie."""
    return members > 1 and not (members % 2 == 1 and classes == 2)


def check_weights(weights: Sequence[float] | Tensor | None, members: int, combiner: Combiner) -> Tensor:
    """Validated member probabilities (uniform if None) of a randomized ensemble."""
    if weights is None:
        return torch.full((members,), 1.0 / members)
    if not combiner.randomized:
        raise PhalanxError(f"member weights are only used by the 'random' combiner, got combiner {combiner.value!r}")
    w = torch.as_tensor(weights, dtype=torch.float32).detach().flatten().cpu()
    if w.numel() != members or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) \
            or abs(float(w.sum()) - 1.0) > 1e-5:
        raise PhalanxError(f"member probabilities must be {members} non-negative numbers summing to 1, "
                           f"got {[round(float(v), 6) for v in w]}")
    return w / w.sum()


def expected_correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(B,) probability that ``model`` answers ``y`` (:meth:`Ensemble.correct_probability`; 0 or 1
    for any other model)."""
    with torch.no_grad():
        if isinstance(model, Ensemble):
            return model.correct_probability(model.member_logits(x), y)
        return (model(x).argmax(-1) == y).to(torch.float32)
