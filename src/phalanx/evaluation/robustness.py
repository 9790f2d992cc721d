"""Robust accuracy of a model (ensemble, member or surrogate) under attacks over an eps grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from phalanx.attacks import Attack, pgd
from phalanx.data import Split, iterate_batches
from phalanx.ensembles import expected_correct
from phalanx.evaluation.clean import model_device
from phalanx.types import Norm, ThreatModel, check_eps


@dataclass(frozen=True)
class CurvePoint:
    eps: float
    accuracy: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"eps": self.eps, "accuracy": self.accuracy, "n": self.n}


def robust_correct(model: nn.Module, split: Split, attack: Attack, threat: ThreatModel, *,
                   batch_size: int = 500, generator: torch.Generator | None = None,
                   progress: bool = False, desc: str = "", source: nn.Module | None = None) -> torch.Tensor:
    """(N,) float: whether the model still classifies each example correctly after ``attack``
    (0 or 1), or for a randomized ensemble the exact probability of it over the draw. With
    ``source`` the examples are made against it and transferred to ``model`` (black-box)."""
    device = model_device(model)
    out = []
    batches = iterate_batches(split, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(split) // batch_size), desc=desc or attack.name, leave=False)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        adv = attack(model if source is None else source, x, y, threat, generator=generator)
        out.append(expected_correct(model, adv, y).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def robust_accuracy_curve(model: nn.Module, split: Split, eps_list: Sequence[float], *,
                          attack: Attack | None = None, norm: Norm = Norm.LINF,
                          batch_size: int = 500, generator: torch.Generator | None = None,
                          progress: bool = False) -> list[CurvePoint]:
    """Accuracy under ``attack`` (default: PGD-50, step eps/5, random start) for each eps.
    The model's train/eval mode is left as the caller set it (use eval mode)."""
    attack = attack or pgd()
    eps_checked = [check_eps(e) for e in eps_list]
    points = []
    for eps in eps_checked:
        threat = ThreatModel(norm, eps)
        ok = robust_correct(model, split, attack, threat, batch_size=batch_size, generator=generator,
                            progress=progress, desc=f"{attack.name} eps={eps:g}")
        points.append(CurvePoint(eps, float(ok.float().mean()) if len(ok) else 0.0, len(ok)))
    return points
