"""No redundant passes: PGD with one restart runs exactly one forward per step, same result."""

from __future__ import annotations

import torch
from torch import nn

from phalanx.attacks import GradientAttack
from phalanx.types import Norm, ThreatModel


class Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)  # type: ignore[no-any-return]


def test_single_restart_pgd_has_no_checking_pass_and_the_same_result() -> None:
    torch.manual_seed(0)
    model = Counting(nn.Sequential(nn.Flatten(), nn.Linear(16, 3))).eval()
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1])
    th = ThreatModel(Norm.LINF, 0.2)
    atk = GradientAttack(steps=4, step_size=0.25, restarts=1)
    adv = atk(model, x, y, th, generator=torch.Generator().manual_seed(3))
    assert model.calls == 4  # one forward per step, none after the loop
    # the returned point is the loop's last iterate, as before (one restart keeps its point)
    ref = atk._run(model, x, y, th, torch.Generator().manual_seed(3), None)
    assert torch.equal(adv, ref)
    assert float((adv - x).abs().max()) <= 0.2 + 1e-6
    # with two restarts the success check still runs (it picks the restart that broke each example)
    model.calls = 0
    GradientAttack(steps=4, step_size=0.25, restarts=2)(model, x, y, th, generator=torch.Generator().manual_seed(3))
    assert model.calls in (5, 10)  # 4 steps + 1 check per restart run (one, or two if any survived)
