"""The attack interface and registry. The model is passed at call time, so one attack object
serves a whole ensemble, a single member or a surrogate."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from phalanx.registry import Registry
from phalanx.types import ThreatModel


class Attack(ABC):
    """``attack(model, x, y, threat) -> x_adv`` inside the eps-ball and the input bounds.

    Contract: the model's parameters, gradients and train/eval mode are left untouched, the
    inputs are not modified, and results are deterministic under ``generator``.
    """

    name: str = "attack"

    @abstractmethod
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
                 generator: torch.Generator | None = None) -> Tensor: ...


AttackFactory = Callable[..., Attack]
ATTACKS: Registry[AttackFactory] = Registry("attack")


def create_attack(name: str, **params: object) -> Attack:
    return ATTACKS.get(name)(**params)
