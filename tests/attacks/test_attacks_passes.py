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


def _out_of_place_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, size: float, steps: int,
                      gen: torch.Generator, momentum: float = 0.0) -> torch.Tensor:
    """PGD written the plain way (every intermediate a new tensor): the reference for the in-place loop."""
    u = torch.rand(x.shape, generator=gen, dtype=x.dtype)
    d = (2 * u - 1) * eps
    adv = (x + ((x + d) - x).clamp(-eps, eps)).clamp(0, 1) if momentum == 0 else x.clone()
    g = torch.zeros_like(x)
    for _ in range(steps):
        adv.requires_grad_(True)
        grad, = torch.autograd.grad(nn.functional.cross_entropy(model(adv), y, reduction="none").sum(), adv)
        adv = adv.detach()
        if momentum > 0:
            g = momentum * g + grad / grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            grad = g
        adv = (x + (adv + size * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return adv


def test_in_place_linf_steps_match_the_out_of_place_loop_to_the_bit() -> None:
    """The L-inf loop steps and projects in place (issue 14, fewer allocations per step); the
    iterates must be bit-for-bit those of the plain out-of-place formulas, with and without momentum."""
    from phalanx.attacks.projection import project, project_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    eps, frac = 0.1, 0.3
    th = ThreatModel(Norm.LINF, eps)
    adv = GradientAttack(steps=5, step_size=frac)(model, x, y, th, generator=torch.Generator().manual_seed(2))
    ref = _out_of_place_pgd(model, x, y, eps, frac * eps, 5, torch.Generator().manual_seed(2))
    assert torch.equal(adv, ref)
    adv = GradientAttack(steps=5, step_size=frac, random_start=False, momentum=0.7)(model, x, y, th)
    ref = _out_of_place_pgd(model, x, y, eps, frac * eps, 5, torch.Generator(), momentum=0.7)
    assert torch.equal(adv, ref)
    a = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    for norm in (Norm.LINF, Norm.L2):
        t = ThreatModel(norm, 0.2)
        assert torch.equal(project_(a.clone(), x, t), project(a, x, t))


def test_apgd_takes_no_gradient_at_its_final_iterate() -> None:
    """APGD evaluates n_iter + 1 points but differentiates only n_iter of them (the last
    iterate's gradient is never used), and still reports the last iterate when it is the best."""
    from phalanx.attacks.parameter_free import apgd_box

    with_grad, without = [], []

    def objective(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (with_grad if a.requires_grad else without).append(1)
        return a.sum(1), torch.zeros(a.shape[0], dtype=torch.bool)  # increases along +1: best = last

    lo, hi = torch.zeros(3, 4), torch.ones(3, 4)
    run = apgd_box(objective, torch.full((3, 4), 0.5), lo, hi, torch.full((3, 4), 0.05), n_iter=6)
    assert (len(with_grad), len(without)) == (6, 1)
    assert torch.allclose(run.best, torch.full((3,), 4 * 0.8))  # 0.5 + 6 steps of 0.05 per coordinate
    assert torch.allclose(run.x_best, torch.full((3, 4), 0.8))
