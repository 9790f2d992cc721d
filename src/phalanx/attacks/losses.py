"""Attack losses as pure functions of outputs and labels, all to be *maximised* per example
(except the margins of Amir et al., which are positive while a member is still correct)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from phalanx.errors import PhalanxError

#: losses of the ensemble's (or a single model's) combined output
LOSSES = ("ce", "cw", "dlr")
#: losses of every chosen member's logits, combined by the ELU regulator (Amir et al. app. D)
MEMBER_LOSSES = ("elu-joint",)
ALL_LOSSES = LOSSES + MEMBER_LOSSES


def check_loss(kind: str, accepted: tuple[str, ...] = ALL_LOSSES) -> str:
    if kind not in accepted:
        raise PhalanxError(f"unknown loss {kind!r}; accepted: {', '.join(accepted)}")
    return kind


def ce_loss(output: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy. ``output`` may be logits or log-probabilities (identical)."""
    return F.cross_entropy(output, y, reduction="none")


def other_max(output: Tensor, y: Tensor) -> Tensor:
    """max_{j != y} output_j per example."""
    mask = F.one_hot(y, output.shape[-1]).bool()
    return output.masked_fill(mask, float("-inf")).amax(-1)


def runner_up(output: Tensor) -> Tensor:
    """Index of the second-largest entry of each row ``(..., K) -> (...)``."""
    return output.topk(2, dim=-1).indices[..., 1]


def cw_margin_loss(output: Tensor, y: Tensor, confidence: float = 0.0) -> Tensor:
    """Carlini-Wagner margin ``min(max_{j!=y} z_j - z_y, confidence)`` per example (maximised;
    the attack stops gaining once the wrong class leads by ``confidence``)."""
    true = output.gather(-1, y[:, None]).squeeze(-1)
    return (other_max(output, y) - true).clamp_max(confidence)


def dlr_loss(output: Tensor, y: Tensor) -> Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020, eq. 6), maximised:
    ``-(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` with ``z_pi`` the sorted logits."""
    srt = output.sort(-1, descending=True).values
    true = output.gather(-1, y[:, None]).squeeze(-1)
    return -(true - other_max(output, y)) / (srt[:, 0] - srt[:, 2] + 1e-12)


def dlr_targeted_loss(output: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR (Croce & Hein 2020, eq. 7), maximised:
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``."""
    srt = output.sort(-1, descending=True).values
    true = output.gather(-1, y[:, None]).squeeze(-1)
    tgt = output.gather(-1, target[:, None]).squeeze(-1)
    return -(true - tgt) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)


def targeted_loss(output: Tensor, target: Tensor, kind: str, y: Tensor | None = None) -> Tensor:
    """Loss to maximise to reach ``target``: -CE(target), ``z_t - max_{j!=t} z_j``, or the
    targeted DLR (which needs the true labels ``y``)."""
    if kind == "ce":
        return -ce_loss(output, target)
    if kind == "cw":
        true = output.gather(-1, target[:, None]).squeeze(-1)
        return true - other_max(output, target)
    if kind == "dlr":
        if y is None:
            raise PhalanxError("the targeted DLR loss needs the true labels")
        return dlr_targeted_loss(output, y, target)
    raise PhalanxError(f"unknown loss {kind!r}; accepted: {', '.join(LOSSES)}")


def attack_loss(output: Tensor, y: Tensor, kind: str, confidence: float = 0.0) -> Tensor:
    if kind == "ce":
        return ce_loss(output, y)
    if kind == "cw":
        return cw_margin_loss(output, y, confidence)
    if kind == "dlr":
        return dlr_loss(output, y)
    raise PhalanxError(f"unknown loss {kind!r}; accepted: {', '.join(LOSSES)}")


def joint_margins(member_logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Per-member losses ``l_s(N_i, x)`` of Amir et al. (2022), appendix D.B, shape (M, B).

    Untargeted: ``N_i(x)_t - N_i(x)_{r_x}`` with ``r_x`` the runner-up (the best wrong class) at
    ``x``; targeted: ``N_i(x)_t - N_i(x)_{r_a}`` with ``target[i] = r_a`` fixed per member (the
    runner-up at the clean point). Positive while member ``i`` still predicts ``t``.
    """
    m = member_logits.shape[0]
    yy = y.expand(m, -1)
    true = member_logits.gather(-1, yy[..., None]).squeeze(-1)
    if target is None:
        mask = F.one_hot(yy, member_logits.shape[-1]).bool()
        return true - member_logits.masked_fill(mask, float("-inf")).amax(-1)
    return true - member_logits.gather(-1, target[..., None]).squeeze(-1)


def elu_regulator(margins: Tensor) -> Tensor:
    """Amir et al. (2022) app. D.B regulator ``l_r = sum_i ELU(l_s(N_i, x))`` over the member
    axis 0 of ``margins`` (M, B) -> (B,). Minimised by the joint attacks: members already fooled
    (negative margin) are discounted, not ignored."""
    return F.elu(margins).sum(0)


def is_adversarial(output: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    pred = output.argmax(-1)
    return pred == target if target is not None else pred != y


def all_members_fooled(member_logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """(B,) True where every member of (M, B, K) errs (hits its target when targeted)."""
    pred = member_logits.argmax(-1)
    ok = pred == target if target is not None else pred != y.expand_as(pred)
    return ok.all(0)


__all__ = ["ALL_LOSSES", "LOSSES", "MEMBER_LOSSES", "all_members_fooled", "attack_loss", "ce_loss",
           "check_loss", "cw_margin_loss", "dlr_loss", "dlr_targeted_loss", "elu_regulator",
           "is_adversarial", "joint_margins", "other_max", "runner_up", "targeted_loss"]
