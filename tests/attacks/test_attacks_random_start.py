from __future__ import annotations

import pytest
import torch

from phalanx.attacks.projection import random_start
from phalanx.types import ThreatModel


@pytest.mark.parametrize("norm,p", [("l2", 2), ("l1", 1), ("linf", float("inf"))])
def test_random_start_is_uniform_in_the_ball(norm, p):
    # 4-dimensional ball away from the box edges: for a uniform point, P(||delta|| <= t eps) = t^4,
    # so the median radius is 0.5 ** 0.25 = 0.841 (L-inf: per-coordinate uniform, same law)
    x = torch.full((4000, 1, 2, 2), 0.5)
    delta = random_start(x, ThreatModel(norm, 0.3), torch.Generator().manual_seed(0)) - x
    r = delta.flatten(1).norm(p=p, dim=1) / 0.3
    assert float(r.max()) <= 1 + 1e-6
    assert float(r.median()) == pytest.approx(0.5 ** 0.25, abs=0.02)
    assert float((r <= 0.5).float().mean()) == pytest.approx(0.5 ** 4, abs=0.02)
