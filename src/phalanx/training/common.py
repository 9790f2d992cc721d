"""Helpers shared by the diversity-training methods: input gradients of member outputs, the
train/eval mode used while generating adversarial or distilled data, and method variants."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phalanx.ensembles import Ensemble
from phalanx.errors import PhalanxError
from phalanx.training.base import METHODS, TrainingMethod

GENERATION_MODES = ("train", "eval")
SALIENCY_OUTPUTS = ("prob", "logit")


def check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise PhalanxError(f"{name} must be one of {', '.join(accepted)}, got {value!r}")


def check_nonneg(**values: float) -> None:
    for k, v in values.items():
        if not isinstance(v, (int, float)) or not v >= 0:
            raise PhalanxError(f"{k} must be a number >= 0, got {v!r}")


def check_positive(**values: float) -> None:
    for k, v in values.items():
        if not isinstance(v, (int, float)) or not v > 0:
            raise PhalanxError(f"{k} must be a number > 0, got {v!r}")


def check_steps(**values: int) -> None:
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PhalanxError(f"{k} must be an integer >= 1, got {v!r}")


@contextmanager
def generation_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Run adversarial/distilled-data generation with the model in ``mode``, then restore every
    submodule's own mode. ``'train'`` is the reference code's choice (REFERENCE-FACTS: BatchNorm
    uses batch statistics and updates its running stats during generation)."""
    check_choice("generation mode", mode, GENERATION_MODES)
    saved = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, was in saved:
            m.training = was


def member_input_gradients(members: list[nn.Module] | nn.ModuleList, x: Tensor, y: Tensor, *,
                           kind: str = "ce", create_graph: bool = True) -> tuple[Tensor, Tensor]:
    """Input gradients of every member, ``(M, B, *x.shape[1:])``, and the member logits (M, B, K).

    ``kind``: ``'ce'`` the gradient of the batch-mean cross-entropy (GAL, TRS: as their reference
    code, so each example's gradient carries a 1/B factor); ``'prob'`` the saliency
    ``d softmax(f_m(x))[y] / dx`` and ``'logit'`` ``d f_m(x)[y] / dx`` (SMD eq. 1), per example.
    ``create_graph=True`` keeps the graph so a loss on the gradients trains the parameters.
    """
    check_choice("gradient kind", kind, ("ce", *SALIENCY_OUTPUTS))
    xg = x if x.requires_grad else x.detach().requires_grad_(True)  # keep an attack's graph
    grads, outs = [], []
    for m in members:
        z = m(xg)
        if kind == "ce":
            obj = F.cross_entropy(z, y)
        elif kind == "prob":
            obj = torch.softmax(z, -1).gather(1, y[:, None]).sum()
        else:
            obj = z.gather(1, y[:, None]).sum()
        g, = torch.autograd.grad(obj, xg, create_graph=create_graph)
        grads.append(g)
        outs.append(z)
    return torch.stack(grads), torch.stack(outs)


def warn_if_relu(ensemble: Ensemble, method: str, log: Any) -> None:
    """Log a warning when members use plain ReLU (GAL needs leaky ReLU; DVERGE appendix A)."""
    if any(isinstance(mod, nn.ReLU) for mod in ensemble.modules()):
        log.warning("%s: members use ReLU; the reference uses leaky ReLU to avoid vanishing input "
                    "gradients (build members with activation='leaky_relu')", method)


def register_variant(name: str, cls: type[TrainingMethod], help: str, **defaults: Any) -> None:
    """Register ``name`` as ``cls`` with other default settings (variants are settings, not
    subclasses); unknown options raise a :class:`PhalanxError` naming the accepted ones."""
    fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    def factory(**params: Any) -> TrainingMethod:
        bad = [k for k in params if k not in fields]
        if bad:
            raise PhalanxError(f"method {name!r} has no option {bad[0]!r}; accepted: {', '.join(fields)}")
        return cls(**{**defaults, **params})

    factory.__doc__ = help
    METHODS.add(name, factory, help)

