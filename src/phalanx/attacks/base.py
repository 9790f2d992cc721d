"""The attack interface and registry. The model is passed at call time, so one attack object
serves a whole ensemble, a single member or a surrogate."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from phalanx.errors import PhalanxError
from phalanx.models.inference import inference_view
from phalanx.registry import Registry
from phalanx.types import ThreatModel


class Attack(ABC):
    """``attack(model, x, y, threat) -> x_adv`` inside the eps-ball and the input bounds.

    Contract: the model's parameters, gradients and train/eval mode are left untouched, the
    inputs are not modified, and results are deterministic under ``generator``.
    """

    name: str = "attack"
    #: True for attacks defined only on ensembles (MORA, ARC): they cannot attack one member alone
    ensemble_only: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
                 generator: torch.Generator | None = None) -> Tensor: ...


AttackFactory = Callable[..., Attack]
ATTACKS: Registry[AttackFactory] = Registry("attack")


def create_attack(name: str, **params: object) -> Attack:
    """Build a registered attack; unknown names or options raise a :class:`PhalanxError`."""
    factory = ATTACKS.get(name)
    try:
        return factory(**params)
    except TypeError as exc:
        raise PhalanxError(f"bad options for attack {name!r}: {exc}") from None


def check_inputs(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Reject a batch that does not fit the model: labels must be (B,) integers in range and
    the inputs (B, *in_shape) where the model declares its input shape."""
    if x.dim() < 2 or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise PhalanxError(f"expected inputs (B, ...) and labels (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32):
        raise PhalanxError(f"labels must be integer class indices, got dtype {y.dtype}")
    shape = tuple(getattr(model, "in_shape", ()) or ())
    if shape and tuple(x.shape[1:]) != shape:
        raise PhalanxError(f"the model expects inputs of shape {shape}, got {tuple(x.shape[1:])}")
    k = getattr(model, "num_classes", None)
    if isinstance(k, int) and k > 0 and y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise PhalanxError(f"labels must be in 0..{k - 1}, got values in {int(y.min())}..{int(y.max())}")


def prepare(model: nn.Module, x: Tensor, y: Tensor) -> nn.Module:
    """:func:`check_inputs`, then the model an attack differentiates: its inference view (eval-mode
    BatchNorm folded into the layer before it, activations moved after max-pooling; the same
    function with fewer passes, :func:`phalanx.models.inference.inference_view`), or the model
    itself where no rewrite applies."""
    check_inputs(model, x, y)
    return inference_view(model)


def configure_attack(name: str, params: Mapping[str, object] | None = None, *, steps: int | None = None,
                     restarts: int | None = None, loss: str | None = None) -> Attack:
    """Build a registered attack from explicit ``params`` (unknown ones are an error) plus the
    common settings, passed only to attacks that take them (``steps`` to the iterative gradient
    attacks, ``restarts`` to PGD-like ones, ``loss`` to those with a loss choice) and only where
    ``params`` does not set them: an explicit ``--param steps=5`` wins over ``eval.steps``."""
    import inspect

    accepted = inspect.signature(ATTACKS.get(name)).parameters
    kw = dict(params or {})
    for key, value in (("steps", steps), ("restarts", restarts), ("loss", loss)):
        if value is not None and key in accepted:
            kw.setdefault(key, value)
    return create_attack(name, **kw)
