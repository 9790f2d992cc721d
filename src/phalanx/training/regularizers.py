"""The mathematics of the diversity-training methods as pure functions of tensors.

Shape letters: M members, B batch, K classes, D flattened input dimension. Every function is
differentiable where training needs it and has no side effects; the methods in this package
only gather the tensors (member outputs, input gradients) and call these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from phalanx.errors import PhalanxError


def _check_members(t: Tensor, what: str, min_members: int = 2) -> None:
    if t.dim() < 2 or t.shape[0] < min_members:
        raise PhalanxError(f"{what} needs at least {min_members} members on dim 0, got shape {tuple(t.shape)}")


def pair_indices(m: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Indices (i, j) of the m(m-1)/2 unordered member pairs with i < j."""
    idx = torch.triu_indices(m, m, offset=1, device=device)
    return idx[0], idx[1]


def pairwise_cosine(vectors: Tensor, eps: float = 1e-8) -> Tensor:
    """(P, B) cosine similarities of every member pair i < j, per example.

    ``vectors`` is (M, B, ...) (e.g. input gradients); each example's vector is flattened.
    """
    _check_members(vectors, "pairwise_cosine")
    m, b = vectors.shape[:2]
    flat = vectors.reshape(m, b, -1)
    i, j = pair_indices(m, vectors.device)
    return F.cosine_similarity(flat[i], flat[j], dim=-1, eps=eps)


def log_sum_exp_cosine(vectors: Tensor, offset: float = 0.0) -> Tensor:
    """(B,) ``log sum_{i<j} exp(cos(v_i, v_j))`` per example.

    This is GAL's coherence term (Kariyappa & Qureshi 2019, as summarised in the SMD paper
    sec. 2.2) when ``vectors`` are loss gradients, and SMD's eq. (2) when they are saliency maps.
    ``offset`` is added inside the log (the DVERGE repository's GAL port uses a tiny one).
    """
    cos = pairwise_cosine(vectors)
    if offset:
        return torch.log(cos.exp().sum(0) + offset)
    return torch.logsumexp(cos, dim=0)


def smd_regularizer(saliencies: Tensor) -> Tensor:
    """(B,) SMD eq. (2): ``log sum_m sum_{l>m} exp(s_m.s_l / (|s_m| |s_l|))``.

    For M identical saliencies it equals ``log(M(M-1)/2) + 1``; for mutually orthogonal ones
    ``log(M(M-1)/2)``.
    """
    return log_sum_exp_cosine(saliencies)


def gal_regularizer(gradients: Tensor, offset: float = 1e-20) -> Tensor:
    """(B,) GAL's gradient-alignment term: log-sum-exp over pairs of the cosine between the
    members' input gradients of their cross-entropy (SMD paper sec. 2.2; offset as the DVERGE
    repository's port)."""
    return log_sum_exp_cosine(gradients, offset)


def ensemble_entropy(member_probs: Tensor, eps: float = 1e-20) -> Tensor:
    """(B,) ADP's ensemble entropy ``H(mean_m p_m)`` (SMD paper sec. 2.2; +1e-20 inside the log
    as REFERENCE-FACTS 'ADP')."""
    p = member_probs.mean(0)
    return -(p * torch.log(p + eps)).sum(-1)


def non_true_normalized(member_probs: Tensor, y: Tensor) -> Tensor:
    """(M, B, K-1): each member's probability vector with the true class removed (order kept),
    L2-normalised per member and example (ADP's ``P~``, REFERENCE-FACTS 'ADP')."""
    m, b, k = member_probs.shape
    keep = ~F.one_hot(y, k).bool()  # (B, K)
    rest = member_probs[:, keep].view(m, b, k - 1)
    return rest / rest.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def adp_log_det(member_probs: Tensor, y: Tensor, eps: float = 1e-6) -> Tensor:
    """(B,) ADP's log ensemble diversity ``logdet(P~ P~^T + eps I)`` (M x M Gram matrix of the
    normalised non-maximal predictions). Orthogonal predictions give ``M log(1 + eps)``."""
    _check_members(member_probs, "adp_log_det")
    pt = non_true_normalized(member_probs, y).transpose(0, 1)  # (B, M, K-1)
    gram = pt @ pt.transpose(1, 2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.logdet(gram + eps * eye)


def trs_cosine_loss(gradients: Tensor) -> Tensor:
    """TRS's gradient-similarity term: mean over pairs of ``mean_batch |cos(g_i, g_j)|``
    (REFERENCE-FACTS 'TRS': absolute value; the reference hard-codes the 3 pairs of M = 3)."""
    return pairwise_cosine(gradients).abs().mean()


def trs_smoothness(gradients: Tensor) -> Tensor:
    """TRS's smoothness term: ``mean_m 2 * mean_batch ||g_m||_2^2`` (the reference sums the
    per-member magnitudes and divides by 3, i.e. by M for its 3 members)."""
    m, b = gradients.shape[:2]
    return 2 * gradients.reshape(m, b, -1).pow(2).sum(-1).mean()


# ---------------------------------------------------------------------------------------------
# iGAT (deng2023 sec. 5)


def igat_soft_probabilities(true_probs: Tensor) -> Tensor:
    """(B, M) iGAT eq. (14): member i with descending rank r_i (1 = highest true-class
    probability) is chosen with probability ``2^(M - r_i) / sum_k 2^(k-1)``.

    ``true_probs`` is (M, B), each member's probability of the true class. Ties are broken by
    member index (as ``argsort`` in the reference). REFERENCE-FACTS: ascending rank, weights 2^rank.
    """
    m = true_probs.shape[0]
    order = true_probs.detach().t().argsort(dim=-1, stable=True)  # ascending, (B, M)
    rank = torch.empty_like(order)
    ar = torch.arange(m, device=order.device).expand_as(order)
    rank.scatter_(1, order, ar)  # 0 = least correct ... M-1 = most correct
    weights = torch.pow(2.0, rank.to(true_probs.dtype))
    return weights / (2.0**m - 1)


def igat_assign(true_probs: Tensor, rule: str, generator: torch.Generator | None = None) -> Tensor:
    """(B,) the member each global adversarial example is given to.

    ``rule='soft'``: roulette wheel over :func:`igat_soft_probabilities` (eq. 14);
    ``rule='hard'``: the member with the highest true-class probability (eq. 13).
    """
    if rule == "hard":
        return true_probs.detach().argmax(0)
    if rule != "soft":
        raise PhalanxError(f"unknown iGAT distributing rule {rule!r}; accepted: soft, hard")
    p = igat_soft_probabilities(true_probs)
    return torch.multinomial(p.cpu(), 1, generator=generator).squeeze(1).to(true_probs.device)


def igat_misclassification_regularizer(member_probs: Tensor, y: Tensor, mask: Tensor, *,
                                       clip: float = 0.99, reduce: str = "per-member") -> Tensor:
    """(B,) iGAT eq. (15) on the examples where ``mask`` (ensemble misclassifies) is true.

    ``reduce='per-member'`` (REFERENCE-FACTS 'iGAT', reg_type 0): for each member its top
    non-true class c (chosen without gradient) and ``sum_m -log(1 - clip(p_{m,c}, 0, clip))``.
    ``reduce='global'`` (eq. 15 literally): only the largest non-true probability over all
    members and classes, ``-log(1 - clip(max, 0, clip))``.
    """
    m, b, k = member_probs.shape
    wrong = member_probs.masked_fill(F.one_hot(y, k).bool().unsqueeze(0), 0.0)
    if reduce == "per-member":
        c = wrong.detach().argmax(-1, keepdim=True)
        top = member_probs.gather(-1, c).squeeze(-1)  # (M, B)
        term = -torch.log1p(-top.clamp(0.0, clip)).sum(0)
    elif reduce == "global":
        flat = wrong.permute(1, 0, 2).reshape(b, m * k)
        idx = flat.detach().argmax(-1, keepdim=True)
        top = member_probs.permute(1, 0, 2).reshape(b, m * k).gather(-1, idx).squeeze(-1)
        term = -torch.log1p(-top.clamp(0.0, clip))
    else:
        raise PhalanxError(f"unknown iGAT regularizer reduction {reduce!r}; accepted: per-member, global")
    return term * mask.to(term.dtype)


def igat_assigned_cross_entropy(member_logits: Tensor, y: Tensor, assignment: Tensor, mask: Tensor) -> Tensor:
    """Scalar iGAT global adversarial loss (eq. 16, second term): ``sum_m sum_{x: sel(x)=m,
    mask(x)} CE(f_m(x), y) / B`` (REFERENCE-FACTS: only ensemble-misclassified examples count)."""
    _m, b, _ = member_logits.shape
    picked = member_logits[assignment, torch.arange(b, device=member_logits.device)]  # (B, K)
    ce = F.cross_entropy(picked, y, reduction="none")
    return (ce * mask.to(ce.dtype)).sum() / max(b, 1)


def log_pairs(m: int) -> float:
    """``log(m(m-1)/2)``: the minimum of the log-sum-exp-cosine terms up to the cosine range."""
    return math.log(m * (m - 1) / 2)
