"""Attacks on randomized ensembles (one member drawn per query with fixed probabilities).

- Expectation over the randomness (EOT, Athalye et al. 2018) for gradient attacks:
  :func:`expected_loss` averages the loss over the draw, exactly (``sum_m w_m L(z_m)``) or
  from ``samples`` draws per query; ``samples = 1`` is single-sample PGD, which sees one random
  member per gradient.
- ARC (Dbouk and Shanbhag, ICML 2022, "Adversarial Vulnerability of Randomized Ensembles",
  alg. 1; reference code ``hsndbk4/ARC``, ``attack.py``): members in decreasing probability;
  for each, the direction to its closest linearised decision boundary (dual-norm distance
  ``zeta``), a step ``beta`` that keeps the previous members' progress, a local perturbation
  of norm ``eta``; a candidate is kept only if the *expected accuracy* does not increase.
  Defaults as the reference's README: 20 iterations, ``eta = eps``, no random start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from phalanx.attacks.base import ATTACKS, Attack, prepare
from phalanx.attacks.losses import attack_loss
from phalanx.ensembles import expected_correct
from phalanx.errors import PhalanxError
from phalanx.types import Norm, ThreatModel


def is_randomized(model: nn.Module) -> bool:
    return bool(getattr(model, "randomized", False))


def check_samples(samples: int | None) -> int | None:
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise PhalanxError(f"EOT samples must be an integer >= 1 (or None for the exact expectation over the "
                           f"members), got {samples!r}")
    return samples


def expected_loss(model: nn.Module, x: Tensor, y: Tensor, loss: str = "ce", *, samples: int | None = None,
                  generator: torch.Generator | None = None, need_output: bool = True) -> tuple[Tensor, Tensor | None]:
    """``(loss (B,), output (B, K))``: for a randomized ensemble the loss of each member's
    log-softmax averaged over the draw (exactly with member probabilities when ``samples`` is
    None, else over ``samples`` independent draws per example); for any other model the loss of
    its output (there is nothing to average). ``need_output=False`` skips combining the members
    (the output is then None for a randomized ensemble)."""
    check_samples(samples)
    if not is_randomized(model):
        out = model(x)
        return attack_loss(out, y, loss), out
    ens: Any = model
    z = ens.member_logits(x)
    out = ens.combine(z.detach()) if need_output else None
    m, b = z.shape[0], z.shape[1]
    per = torch.stack([attack_loss(torch.log_softmax(z[i], -1), y, loss) for i in range(m)])  # (M, B)
    w = ens.weights.to(per.device, per.dtype)
    if samples is None:
        return (w[:, None] * per).sum(0), out
    draws = torch.multinomial(w.cpu().float(), b * samples, replacement=True, generator=generator)
    draws = draws.view(samples, b).to(per.device)
    return per.gather(0, draws).mean(0), out


def _dual(v: Tensor, norm: Norm) -> Tensor:
    flat = v.flatten(1)
    return flat.abs().sum(1) if norm is Norm.LINF else flat.norm(dim=1)


def _bv(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _to_ball(d: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    """The reference's projection of a perturbation: clip (L-inf) or renorm (L2) to eps, then
    the input box."""
    if threat.norm is Norm.LINF:
        d = d.clamp(-threat.eps, threat.eps)
    else:
        n = d.flatten(1).norm(dim=1)
        d = d * _bv(torch.where(n > threat.eps, threat.eps / n.clamp_min(1e-12), torch.ones_like(n)), d)
    lo, hi = threat.bounds
    return torch.minimum(torch.maximum(d, lo - x), hi - x)


def closest_boundary(member: nn.Module, point: Tensor, norm: Norm, top_k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """For each example: ``zeta`` the dual-norm distance to the closest linearised decision
    boundary of ``member`` at ``point`` (between its predicted class and any other class, or the
    ``top_k - 1`` runner-ups; ties go to the smaller class index, as the reference's loop), the
    unit direction ``g`` to it (``-sign(w)`` for L-inf, ``-w / ||w||_2`` for L2) and
    ``g2 = -w / ||w||_*`` (used for beta). One backward pass per class (the reference: K + 1)."""
    a = point.detach().requires_grad_(True)
    out = member(a)
    b, k = out.shape
    jac = torch.stack([torch.autograd.grad(out[:, j].sum(), a, retain_graph=j < k - 1)[0].flatten(1)
                       for j in range(k)])  # (K, B, D)
    out = out.detach()
    u = torch.arange(b, device=out.device)
    pred = out.argmax(-1)
    w = jac[pred, u][None] - jac  # (K, B, D): gradient of z_pred - z_j
    dn = w.abs().sum(-1) if norm is Norm.LINF else w.norm(dim=-1)
    zeta_all = (out[u, pred][None] - out.T).abs() / (dn + 1e-10)  # (K, B)
    allowed = torch.ones_like(zeta_all, dtype=torch.bool)
    if top_k is not None:
        allowed = torch.zeros_like(allowed)
        allowed.scatter_(0, out.topk(min(top_k, k), dim=-1).indices.T, True)
    allowed[pred, u] = False
    zeta_all = torch.where(allowed, zeta_all, torch.full_like(zeta_all, float("inf")))
    zeta, j = zeta_all.min(0)
    wj = w[j, u]  # (B, D)
    dj = dn[j, u][:, None]
    g2 = (-wj / (dj + 1e-10)).view_as(point)
    g = (-wj.sign()).view_as(point) if norm is Norm.LINF else g2
    none = torch.isinf(zeta)  # a single class: no boundary
    g = torch.where(_bv(none, g), torch.zeros_like(g), g)
    g2 = torch.where(_bv(none, g2), torch.zeros_like(g2), g2)
    return zeta, g, g2


def _require_randomized(model: nn.Module) -> None:
    if not is_randomized(model):
        comb = getattr(getattr(model, "combiner", None), "value", type(model).__name__)
        raise PhalanxError(f"ARC attacks randomized ensembles (combiner 'random'), got {comb!r}; "
                           "for a deterministic ensemble use mora, autoattack or pgd")


def arc(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, steps: int = 20, step_size: float = 1.0,
        rand_init: bool = False, top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """ARC (Dbouk and Shanbhag 2022, alg. 1) on a randomized ensemble; ``step_size`` is the local
    radius ``eta`` as a fraction of eps. Returns the point of lowest expected accuracy found."""
    _require_randomized(model)
    if threat.norm not in (Norm.LINF, Norm.L2):
        raise PhalanxError(f"ARC is defined for L-inf and L2 (as the reference), got {threat.norm.value!r}")
    ens: Any = model
    members = list(ens.members)
    w = ens.weights.cpu()
    # decreasing probability; equal probabilities in reverse member order, as the reference's
    # np.flip(np.argsort(alpha))
    order = sorted(range(len(members)), key=lambda i: float(w[i]))[::-1]
    eps = threat.eps
    beta_m = step_size * eps
    rho = 0.05 * eps
    delta_min = torch.zeros_like(x)
    if rand_init:
        from phalanx.attacks.projection import random_start

        delta_min = random_start(x, threat, generator) - x
    delta_min = _to_ball(delta_min, x, threat)
    loss_min = expected_correct(model, x, y)  # as the reference, also with a random start

    def local_norm(d: Tensor) -> Tensor:
        flat = d.flatten(1)
        return flat.abs().amax(1) if threat.norm is Norm.LINF else flat.norm(dim=1)

    for _ in range(steps):
        delta_local = torch.zeros_like(x)
        loss_local = loss_min.clone()
        for n_i, i in enumerate(order):
            zeta, g, g2 = closest_boundary(members[i], x + delta_min + delta_local, threat.norm, top_k)
            beta = torch.full_like(zeta, beta_m)
            if n_i > 0:
                dot = (g2 * delta_local).flatten(1).sum(1)
                beta_c = beta_m / (beta_m - zeta + 1e-10) * (zeta - dot).abs() + rho
                beta = torch.where(zeta < beta_m, beta_c, beta)
            hat = delta_local + _bv(beta, g) * g
            hat = beta_m * hat / _bv(local_norm(hat) + 1e-10, hat)
            d = _to_ball(delta_min + hat, x, threat)
            new = expected_correct(model, x + d, y)
            keep = new <= loss_local
            delta_local = torch.where(_bv(keep, x), hat, delta_local)
            loss_local = torch.minimum(loss_local, new)
        d = _to_ball(delta_min + delta_local, x, threat)
        new = expected_correct(model, x + d, y)
        keep = new <= loss_min
        delta_min = torch.where(_bv(keep, x), d, delta_min)
        loss_min = torch.minimum(loss_min, new)
    return (x + delta_min).detach()


@dataclass(frozen=True)
class ArcAttack(Attack):
    """ARC for randomized ensembles; see :func:`arc`. ``top_k`` None searches all C - 1
    hyperplanes (reference ``g = -1``), else the ``top_k - 1`` runner-ups (ARC-lite)."""

    ensemble_only: ClassVar[bool] = True
    name: str = "arc"
    steps: int = 20
    step_size: float = 1.0
    rand_init: bool = False
    top_k: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise PhalanxError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not self.step_size > 0:
            raise PhalanxError(f"step_size must be > 0 (a fraction of eps), got {self.step_size!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 2):
            raise PhalanxError(f"top_k must be an integer >= 2 (or None for all classes), got {self.top_k!r}")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
                 generator: torch.Generator | None = None, target: Tensor | None = None) -> Tensor:
        model = prepare(model, x, y)
        _require_randomized(model)
        x = x.detach()
        if threat.eps == 0:
            return x.clone()
        return arc(model, x, y, threat, steps=self.steps, step_size=self.step_size, rand_init=self.rand_init,
                   top_k=self.top_k, generator=generator)


@ATTACKS.register("arc", "ARC: attack on randomized ensembles, 20 steps, eta = eps (Dbouk & Shanbhag 2022)")
def arc_attack(steps: int = 20, step_size: float = 1.0, rand_init: bool = False, top_k: int | None = None) -> ArcAttack:
    return ArcAttack(steps=steps, step_size=step_size, rand_init=rand_init, top_k=top_k)


__all__ = ["ArcAttack", "arc", "arc_attack", "check_samples", "closest_boundary", "expected_loss",
           "is_randomized"]
