"""Fresh ensembles from a model configuration (the ``[model]`` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from phalanx.data import DatasetSplits
from phalanx.ensembles.ensemble import Ensemble
from phalanx.errors import PhalanxError
from phalanx.models import create_model


@dataclass(frozen=True)
class ModelConfig:
    """``name`` of the architecture, ``members`` count, ``combiner``; other keys are passed to
    the model builder (e.g. ``widths``, ``activation``) and validated there."""

    name: str = "small-cnn"
    members: int = 3
    combiner: str = "mean-prob"
    init: str | None = None  # start from this ensemble checkpoint instead of fresh members
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from phalanx.types import check_fields

        check_fields(self, "model")
        if self.members < 1:
            raise PhalanxError(f"model.members must be a positive integer, got {self.members!r}")



def build_ensemble(cfg: ModelConfig, data: DatasetSplits, *, seed: int = 0) -> Ensemble:
    """``cfg.members`` fresh members (seeded), normalised with the dataset's statistics."""
    torch.manual_seed(seed)
    members = [create_model(cfg.name, data.in_shape, data.num_classes, mean=data.mean, std=data.std,
                            **cfg.options) for _ in range(cfg.members)]
    return Ensemble(members, cfg.combiner)
