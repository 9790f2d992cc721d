"""The training-method interface that every method (baseline, ADP, GAL, DVERGE, SMD, TRS,
iGAT, adversarial training) implements; the one loop in :mod:`phalanx.training.loop` runs it."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from phalanx.ensembles import Ensemble
from phalanx.errors import PhalanxError
from phalanx.registry import Registry


@dataclass
class Batch:
    """A training batch. ``x_target``/``y_target`` are a second, independently shuffled batch,
    present only for methods that set ``needs_target_batch`` (DVERGE's distillation targets)."""

    x: Tensor
    y: Tensor
    x_target: Tensor | None = None
    y_target: Tensor | None = None


@dataclass
class StepContext:
    """What a method may know about the current step. ``generator`` is seeded per epoch from
    the run's seed, so a resumed run draws the same random numbers as an uninterrupted one."""

    epoch: int  # 0-based
    step: int  # 0-based within the epoch
    global_step: int
    steps_per_epoch: int
    epochs: int
    generator: torch.Generator
    device: torch.device
    epoch_state: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossOutput:
    """The scalar to minimise and detached per-step metrics (averaged over the epoch)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class TrainingMethod(ABC):
    """A training objective. Hyperparameters are dataclass fields of the concrete method.

    The loop calls ``start_epoch`` once per epoch, then ``loss`` per batch, and steps one
    optimizer over all members' parameters (per-member losses that depend only on their own
    member make this identical to the reference code's separate per-member optimizers).
    """

    name: ClassVar[str] = "method"
    needs_target_batch: ClassVar[bool] = False
    #: whether adversarial/distilled data is generated with members in train mode (the
    #: reference code's default) or eval mode
    generation_mode: ClassVar[str] = "n/a"

    def start_epoch(self, ensemble: Ensemble, ctx: StepContext) -> None:  # noqa: B027
        """Per-epoch setup (e.g. DVERGE's random layer); default: nothing."""

    @abstractmethod
    def loss(self, ensemble: Ensemble, batch: Batch, ctx: StepContext) -> LossOutput:
        """The loss of one batch; the ensemble is in train mode."""

    def describe(self) -> dict[str, Any]:
        """The method's name and hyperparameters (recorded in the run folder)."""
        params: dict[str, Any] = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return {"name": self.name, **{k: v for k, v in params.items() if _jsonable(v)}}


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None), list, tuple, dict))


MethodFactory = type[TrainingMethod]
METHODS: Registry[Any] = Registry("training method")


def create_method(name: str, **params: Any) -> TrainingMethod:
    """Instantiate a registered method; unknown hyperparameters raise a clear error."""
    factory = METHODS.get(name)
    try:
        return factory(**params)  # type: ignore[no-any-return]
    except TypeError as exc:
        if "unexpected keyword" in str(exc) and dataclasses.is_dataclass(factory):
            fields = ", ".join(f.name for f in dataclasses.fields(factory))
            raise PhalanxError(f"method {name!r} has no such option ({exc}); accepted: {fields}") from None
        raise
