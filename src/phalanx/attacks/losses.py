"""Attack losses as pure functions of outputs and labels, all to be *maximised* per example."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from phalanx.errors import PhalanxError

LOSSES = ("ce", "cw")


def ce_loss(output: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy. ``output`` may be logits or log-probabilities (identical)."""
    return F.cross_entropy(output, y, reduction="none")


def other_max(output: Tensor, y: Tensor) -> Tensor:
    """max_{j != y} output_j per example."""
    mask = F.one_hot(y, output.shape[-1]).bool()
    return output.masked_fill(mask, float("-inf")).amax(-1)


def cw_margin_loss(output: Tensor, y: Tensor, confidence: float = 0.0) -> Tensor:
    """Carlini-Wagner margin ``min(max_{j!=y} z_j - z_y, confidence)`` per example (maximised;
    the attack stops gaining once the wrong class leads by ``confidence``)."""
    true = output.gather(-1, y[:, None]).squeeze(-1)
    return (other_max(output, y) - true).clamp_max(confidence)


def targeted_loss(output: Tensor, target: Tensor, kind: str) -> Tensor:
    """Loss to maximise to reach ``target``: -CE(target) or ``z_t - max_{j!=t} z_j``."""
    if kind == "ce":
        return -ce_loss(output, target)
    if kind == "cw":
        true = output.gather(-1, target[:, None]).squeeze(-1)
        return true - other_max(output, target)
    raise PhalanxError(f"unknown loss {kind!r}; accepted: {', '.join(LOSSES)}")


def attack_loss(output: Tensor, y: Tensor, kind: str, confidence: float = 0.0) -> Tensor:
    if kind == "ce":
        return ce_loss(output, y)
    if kind == "cw":
        return cw_margin_loss(output, y, confidence)
    raise PhalanxError(f"unknown loss {kind!r}; accepted: {', '.join(LOSSES)}")


def is_adversarial(output: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    pred = output.argmax(-1)
    return pred == target if target is not None else pred != y


__all__ = ["LOSSES", "attack_loss", "ce_loss", "cw_margin_loss", "is_adversarial", "other_max",
           "targeted_loss"]
