"""Score-based black-box attacks: they only query the model's outputs, never its gradients.

- Square (Andriushchenko et al. 2020, L-inf version as in AutoAttack): random square updates
  of side ``sqrt(p * n / c)`` with ``p`` halved on a fixed schedule, accepted when the margin
  loss decreases; vertical-stripe initialisation.
- SignHunter (Al-Dujaili & O'Reilly 2020, alg. 1): flips the signs of a perturbation
  ``eps * s`` in ever smaller contiguous chunks, keeping a flip when the loss does not decrease.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from phalanx.attacks.base import ATTACKS, Attack, prepare
from phalanx.attacks.losses import attack_loss, check_loss, other_max
from phalanx.errors import PhalanxError
from phalanx.types import Norm, ThreatModel


def _margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(x)
    return out.gather(-1, y[:, None]).squeeze(-1) - other_max(out, y)


def square_p(it: int, n_queries: int, p_init: float) -> float:
    """Square's schedule of the fraction of pixels changed (reference ``p_selection``: the
    iteration is rescaled to a 10000-query budget and p halves at 10, 50, 200, 500, 1000, 2000,
    4000, 6000 and 8000)."""
    i = int(it / n_queries * 10000)
    for k, edge in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
        if i <= edge:
            return p_init / 2 ** k
    return p_init / 512


def square_attack(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, n_queries: int = 5000,
                  p_init: float = 0.8, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Untargeted L-inf Square attack on the margin loss; returns ``(x_adv, fooled)``. One window
    position and sign pattern per iteration is shared by the batch (as the reference code)."""
    if threat.norm is not Norm.LINF:
        raise PhalanxError(f"phalanx's Square attack is implemented for L-inf, got {threat.norm.value!r}")
    if x.dim() != 4:
        raise PhalanxError(f"the Square attack needs image inputs (B, C, H, W), got {tuple(x.shape)}")
    eps, (lo, hi) = threat.eps, threat.bounds
    _, c, h, w = x.shape
    n_features = c * h * w

    def sign(shape: tuple[int, ...]) -> Tensor:
        return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(x.device, x.dtype)

    x_best = (x + eps * sign((x.shape[0], c, 1, w))).clamp(lo, hi)
    margin = _margin(model, x_best, y)
    for it in range(n_queries - 1):
        active = (margin > 0).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        xc, xb = x[active], x_best[active]
        p = square_p(it, n_queries, p_init)
        s = min(max(round(math.sqrt(p * n_features / c)), 1), min(h, w) - 1 if min(h, w) > 1 else 1)
        vh = int(torch.randint(0, h - s + 1, (), generator=generator))
        vw = int(torch.randint(0, w - s + 1, (), generator=generator))
        delta = torch.zeros((c, h, w), device=x.device, dtype=x.dtype)
        delta[:, vh:vh + s, vw:vw + s] = 2.0 * eps * sign((c, 1, 1))
        x_new = torch.minimum(torch.maximum(xb + delta, xc - eps), xc + eps).clamp(lo, hi)
        m_new = _margin(model, x_new, y[active])
        better = m_new < margin[active]
        upd = active[better]
        x_best[upd] = x_new[better]
        margin[upd] = m_new[better]
    return x_best.detach(), margin <= 0


def signhunter(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, n_queries: int = 1000,
               loss: str = "ce") -> tuple[Tensor, Tensor]:
    """SignHunter (Al-Dujaili & O'Reilly 2020, alg. 1 with its restart when all levels are done):
    start from ``s = +1``; at level ``h`` the n coordinates are cut into ``2^h`` chunks and the
    chunks' signs are flipped one per query, a flip is kept when the loss does not decrease.
    Deterministic (no randomness); examples stop querying once misclassified. Returns
    ``(x_adv, fooled)``; at most ``n_queries`` queries per example (the first is the start)."""
    if threat.norm is not Norm.LINF:
        raise PhalanxError(f"SignHunter is an L-inf attack, got norm {threat.norm.value!r}")
    eps, (lo, hi) = threat.eps, threat.bounds
    flat = x.flatten(1)
    n = flat.shape[1]
    s = torch.ones_like(flat)

    def query(signs: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            out = model((flat[idx] + eps * signs).clamp(lo, hi).view(-1, *x.shape[1:]))
        return attack_loss(out, y[idx], loss), out.argmax(-1) != y[idx]

    all_idx = torch.arange(x.shape[0], device=x.device)
    best_loss, fooled = query(s, all_idx)
    level, chunk_i = 0, 0
    for _ in range(n_queries - 1):
        active = (~fooled).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        size = math.ceil(n / 2 ** level)
        a, b = chunk_i * size, min((chunk_i + 1) * size, n)
        cand = s[active].clone()
        cand[:, a:b] *= -1
        val, fool = query(cand, active)
        keep = val >= best_loss[active]
        s[active[keep]] = cand[keep]
        best_loss[active[keep]] = val[keep]
        fooled[active[keep & fool]] = True
        chunk_i += 1
        if chunk_i == 2 ** level or b >= n:
            level, chunk_i = level + 1, 0
            if 2 ** level > n:
                level = 0
    return (flat + eps * s).clamp(lo, hi).view_as(x).detach(), fooled


@dataclass(frozen=True)
class SignHunterAttack(Attack):
    """SignHunter with a per-example query budget."""

    name: str = "signhunter"
    n_queries: int = 1000
    loss: str = "ce"

    def __post_init__(self) -> None:
        if isinstance(self.n_queries, bool) or not isinstance(self.n_queries, int) or self.n_queries < 1:
            raise PhalanxError(f"n_queries must be an integer >= 1, got {self.n_queries!r}")
        check_loss(self.loss, ("ce", "cw"))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
                 generator: torch.Generator | None = None, target: Tensor | None = None) -> Tensor:
        model = prepare(model, x, y)
        if threat.eps == 0:
            return x.detach().clone()
        adv, _fooled = signhunter(model, x.detach(), y, threat, n_queries=self.n_queries, loss=self.loss)
        # the final sign vector is the best found; keep the clean input nowhere: adv is in the ball
        return adv


@ATTACKS.register("signhunter", "SignHunter: score-based black box, sign flips, query budget (1000)")
def signhunter_attack(n_queries: int = 1000, loss: str = "ce") -> SignHunterAttack:
    return SignHunterAttack(n_queries=n_queries, loss=loss)


__all__ = ["SignHunterAttack", "signhunter", "signhunter_attack", "square_attack", "square_p"]
