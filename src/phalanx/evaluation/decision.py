"""Decision regions around a test point (DVERGE fig. 1): predicted labels on the plane spanned
by a surrogate's adversarial direction (vertical) and a random Rademacher vector (horizontal),
both scaled to the L-inf radius ``eps``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def adversarial_direction(surrogate: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Sign of the surrogate's input gradient of the CE loss at ``x`` (one example, (1, ...))."""
    a = x.detach().clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(surrogate(a), y), a)
    return g.sign()


@torch.no_grad()
def decision_regions(models: Mapping[str, nn.Module], x: Tensor, y: Tensor, surrogate: nn.Module, *,
                     eps: float, resolution: int = 41, bounds: tuple[float, float] = (0.0, 1.0),
                     generator: torch.Generator | None = None) -> dict[str, Any]:
    """Labels predicted by each model on ``x + eps * (a * d_adv + b * d_rand)``, ``a, b`` in
    ``[-1, 1]`` (a ``resolution`` x ``resolution`` grid; rows = adversarial axis from -1 at the
    bottom to +1 at the top, columns = random axis), clamped to ``bounds``."""
    with torch.enable_grad():
        d_adv = adversarial_direction(surrogate, x, y)
    d_rand = (torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x.device, x.dtype)
    ticks = torch.linspace(-1.0, 1.0, resolution, device=x.device, dtype=x.dtype)
    a, b = torch.meshgrid(ticks, ticks, indexing="ij")
    pts = x + eps * (a.reshape(-1, *([1] * (x.dim() - 1))) * d_adv + b.reshape(-1, *([1] * (x.dim() - 1))) * d_rand)
    pts = pts.clamp(*bounds)
    grids = {name: m(pts).argmax(-1).view(resolution, resolution).cpu().tolist() for name, m in models.items()}
    return {"eps": eps, "resolution": resolution, "label": int(y.item()), "grids": grids}


__all__ = ["adversarial_direction", "decision_regions"]
