"""Pure functions: projections onto eps-balls intersected with the input box, random starts,
and steepest-ascent directions for each norm."""

from __future__ import annotations

import torch
from torch import Tensor

from phalanx.types import Norm, ThreatModel


def _flat_norm(v: Tensor, p: float) -> Tensor:
    return v.flatten(1).norm(p=p, dim=1).view(-1, *([1] * (v.dim() - 1)))


def project(x_adv: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    """Project ``x_adv`` onto {x' : ||x' - x|| <= eps} ∩ [lo, hi]^d."""
    lo, hi = threat.bounds
    delta = x_adv - x
    if threat.norm is Norm.LINF:
        delta = delta.clamp(-threat.eps, threat.eps)
    elif threat.norm is Norm.L2:
        n = _flat_norm(delta, 2)
        delta = delta * torch.where(n > threat.eps, threat.eps / n.clamp_min(1e-12), torch.ones_like(n))
    else:
        delta = project_l1(delta, threat.eps)
    return (x + delta).clamp(lo, hi)


def project_(x_adv: Tensor, x: Tensor, threat: ThreatModel) -> Tensor:
    """:func:`project` for the L-inf ball, in place on ``x_adv`` (a fresh tensor the caller owns
    and no graph needs): the same operations in the same order, so the same result to the bit,
    without allocating the four intermediates. Other norms fall back to :func:`project`."""
    if threat.norm is not Norm.LINF:
        return project(x_adv, x, threat)
    lo, hi = threat.bounds
    return x_adv.sub_(x).clamp_(-threat.eps, threat.eps).add_(x).clamp_(lo, hi)


def project_l1(delta: Tensor, eps: float) -> Tensor:
    """Euclidean projection of each row onto the L1 ball of radius ``eps`` (Duchi et al. 2008)."""
    flat = delta.flatten(1)
    abs_ = flat.abs()
    inside = abs_.sum(1) <= eps
    if bool(inside.all()) or eps == 0:
        return delta if eps > 0 else torch.zeros_like(delta)
    mu, _ = abs_.sort(dim=1, descending=True)
    cums = mu.cumsum(1)
    ar = torch.arange(1, flat.shape[1] + 1, device=delta.device, dtype=delta.dtype)
    cond = mu - (cums - eps) / ar > 0
    rho = cond.float().cumsum(1).argmax(1)  # last index where cond holds
    theta = (cums.gather(1, rho[:, None]) - eps) / (rho[:, None] + 1).to(delta.dtype)
    proj = flat.sign() * (abs_ - theta).clamp_min(0)
    out = torch.where(inside[:, None], flat, proj)
    return out.view_as(delta)


def random_start(x: Tensor, threat: ThreatModel, generator: torch.Generator | None) -> Tensor:
    """A uniformly random point of the ball, then projected onto the input box.

    L-inf: uniform per coordinate. L2 / L1: a direction uniform on the unit sphere (normalised
    Gaussian / normalised Laplace, i.e. the cone measure) times ``eps * r**(1/d)``, which is
    uniform in the ball.
    """
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    if threat.norm is Norm.LINF:  # (2 u - 1) eps, x + delta, then the projection, all in place
        return project_(u.mul_(2).sub_(1).mul_(threat.eps).add_(x), x, threat)
    g = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    if threat.norm is Norm.L2:
        direction = g / _flat_norm(g, 2.0).clamp_min(1e-12)
    else:  # Laplace variates: sign * Exp(1), with Exp(1) = -log(U)
        lap = torch.sign(g) * -torch.log(u.clamp_min(1e-12))
        direction = lap / _flat_norm(lap, 1.0).clamp_min(1e-12)
    d = x[0].numel()
    r = torch.rand((x.shape[0],), generator=generator, dtype=x.dtype).to(x.device) ** (1.0 / d)
    delta = direction * (threat.eps * r.view(-1, *([1] * (x.dim() - 1))))
    return project(x + delta, x, threat)


def apgd_start(x: Tensor, threat: ThreatModel, generator: torch.Generator | None) -> Tensor:
    """APGD's and MORA's start (Croce & Hein 2020 reference code): ``x + eps * t / ||t||``, ``t``
    uniform in [-1, 1]^d scaled onto the L-inf sphere, or Gaussian onto the L2 sphere; then the
    input box. (L1 falls back to :func:`random_start`.)"""
    if threat.norm is Norm.L1:
        return random_start(x, threat, generator)
    if threat.norm is Norm.LINF:
        t = 2 * torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device) - 1
        n = t.flatten(1).abs().amax(1)
    else:
        t = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        n = t.flatten(1).norm(dim=1)
    return (x + threat.eps * t / n.clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))).clamp(*threat.bounds)


def ascent_direction(grad: Tensor, norm: Norm) -> Tensor:
    """Steepest-ascent unit step: sign for L-inf, normalised gradient for L2, and for L1 the
    sign of the largest-magnitude coordinate of each example (a vertex of the L1 ball)."""
    if norm is Norm.LINF:
        return grad.sign()
    if norm is Norm.L2:
        return grad / _flat_norm(grad, 2).clamp_min(1e-12)
    flat = grad.flatten(1)
    idx = flat.abs().argmax(1)
    out = torch.zeros_like(flat)
    out.scatter_(1, idx[:, None], flat.gather(1, idx[:, None]).sign())
    return out.view_as(grad)
