"""Transfer-attack ingredients: input diversity (DI2-FGSM) and skip gradients (SGM).

Both are *settings* of :class:`phalanx.attacks.GradientAttack`, not attacks of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phalanx.errors import PhalanxError

log = logging.getLogger(__name__)


def diversity_size(h: int) -> int:
    """Padded size of DI2-FGSM: 330/299 of the input side (Xie et al. 2019 use 299 -> 330),
    at least one pixel more so that small inputs (8x8 digits) are transformed too."""
    return max(h + 1, (h * 330) // 299)


def input_diversity(x: Tensor, prob: float, generator: torch.Generator | None = None) -> Tensor:
    """DI2-FGSM's random transform (Xie et al. 2019, "Improving transferability of adversarial
    examples with input diversity", sec. 3.1): with probability ``prob`` resize the batch to a
    random side ``rnd`` in ``[H, H')`` (nearest neighbour) and zero-pad it at a random offset to
    ``H' x H'``; phalanx's models need a fixed input size, so the result is resized back to
    ``H x H`` bilinearly (the reference feeds the larger image to an Inception net instead).
    One draw per batch, as in the reference. Differentiable in ``x``."""
    if not 0.0 <= prob <= 1.0:
        raise PhalanxError(f"diversity probability must be in [0, 1], got {prob!r}")
    if x.dim() != 4 or prob == 0.0:
        return x
    if float(torch.rand((), generator=generator)) >= prob:
        return x
    h, w = x.shape[-2:]
    big = diversity_size(h)
    rnd = int(torch.randint(h, big, (), generator=generator))
    rw = max(1, round(rnd * w / h))
    bigw = max(w + 1, (w * 330) // 299)
    small = F.interpolate(x, size=(rnd, rw), mode="nearest")
    top = int(torch.randint(0, big - rnd + 1, (), generator=generator))
    left = int(torch.randint(0, max(bigw - rw, 0) + 1, (), generator=generator))
    padded = F.pad(small, (left, max(bigw - rw - left, 0), top, big - rnd - top))
    return F.interpolate(padded, size=(h, w), mode="bilinear", align_corners=False)


@contextmanager
def skip_gradient(model: nn.Module, gamma: float) -> Iterator[int]:
    """SGM (Wu et al. 2020, "Skip connections matter", eq. 6): scale the gradient flowing back
    through every residual branch by ``gamma`` (the skip connection keeps gradient 1).

    Implemented with forward hooks on the last module of each residual branch
    (:class:`phalanx.models.base.ResidualBlock`'s ``bn2``) that return
    ``gamma * out + (1 - gamma) * out.detach()``: the same value, a gradient scaled by gamma.
    The hooks exist only inside the ``with`` block. Yields the number of residual blocks found
    (0: the model has no skip connections and SGM reduces to its base attack)."""
    from phalanx.models.base import ResidualBlock

    if not 0.0 < gamma <= 1.0:
        raise PhalanxError(f"SGM gamma must be in (0, 1], got {gamma!r}")
    handles = []
    if gamma < 1.0:
        def hook(_m: nn.Module, _inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
            return gamma * out + (1.0 - gamma) * out.detach()

        for m in model.modules():
            if isinstance(m, ResidualBlock):
                handles.append(m.bn2.register_forward_hook(hook))
        if not handles:
            log.info("SGM: the model has no residual blocks; gradients are not rescaled")
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


__all__ = ["diversity_size", "input_diversity", "skip_gradient"]
