"""The inference view of a model: the same function of the input, computed with fewer passes.

Attacks differentiate a *frozen* model (eval mode) with respect to its input, hundreds of times per
batch. Two rewrites make each forward and backward pass cheaper without changing what is computed:

- **BatchNorm folding.** In eval mode BatchNorm is the per-channel affine map
  ``gamma (h - mu) / sqrt(var + eps) + beta``; after a convolution or linear layer it folds into
  that layer's weight and bias (``w' = s w``, ``b' = s (b - mu) + beta`` with
  ``s = gamma / sqrt(var + eps)`` per output channel; :func:`fold_batchnorm`). A ResNet-20 then
  runs 19 convolutions and no BatchNorm: the memory-bound BatchNorm passes, forward and backward,
  are gone (BENCHMARKS.md, attack throughput). The outputs differ only at float rounding.
- **Activation after max-pooling.** A non-decreasing activation commutes with a max:
  ``maxpool(relu(h)) == relu(maxpool(h))`` exactly, and the gradients are identical too (the same
  window maximum is selected, and the activation's derivative is taken at that same value). Moving
  the activation after the pool applies it to a quarter of the elements.

The view is built by cloning the module tree (cheap: tensors that do not change are shared, not
copied) and is returned only when something was rewritten; the model itself is never modified. It
applies only to a model entirely in eval mode (in train mode BatchNorm uses batch statistics and
updates its running averages, which must stay the model's own), with no hooks (a hook may observe a
module that the view removes). A model in the ``"contiguous"`` memory format is the user's request
for PyTorch's reference arithmetic bit for bit (:func:`~phalanx.models.base.set_memory_format`), so
its BatchNorm is not folded; the exact activation/pool swap still applies.

Feature taps keep their meaning: a folded pair ``(conv, bn)`` becomes ``(Identity, folded conv)``,
so the module at the BatchNorm's place outputs what the BatchNorm did, and
:class:`~phalanx.models.base.FeatureNet`'s taps (computed from the original order) still point to
the same values.
"""

from __future__ import annotations

import copy
from itertools import pairwise

import torch
from torch import Tensor, nn

from phalanx.models.base import memory_format_of

#: layers whose output a following eval-mode BatchNorm folds into (out channels on dim 0)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def fold_batchnorm(weight: Tensor, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float,
                   gamma: Tensor | None, beta: Tensor | None) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``bn(layer(h))`` as one layer, for a layer whose output channels are on
    dim 0 of ``weight`` (convolution, linear) and an eval-mode BatchNorm with running ``mean`` and
    ``var``, ``eps`` and affine ``gamma``, ``beta`` (None: 1 and 0)."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    shift = -mean if bias is None else bias - mean
    new_bias = shift * scale if beta is None else torch.addcmul(beta, shift, scale)
    new_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))  # keeps weight's memory format
    return new_weight, new_bias


def _foldable_bn(m: nn.Module) -> bool:
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training
            and m.running_mean is not None and m.running_var is not None)


def _monotone(m: nn.Module) -> bool:
    """Elementwise and non-decreasing, so that it commutes with a max."""
    return type(m) is nn.ReLU or (type(m) is nn.LeakyReLU and m.negative_slope >= 0)


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, name) for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                             "_backward_pre_hooks", "_state_dict_hooks"))


def _clone(m: nn.Module) -> nn.Module:
    """A new module tree over the same parameter and buffer tensors."""
    new = copy.copy(m)
    new.__dict__["_parameters"] = dict(m._parameters)
    new.__dict__["_buffers"] = dict(m._buffers)
    new.__dict__["_modules"] = {k: (None if c is None else _clone(c)) for k, c in m._modules.items()}
    return new


def _folded(layer: nn.Module, bn: nn.Module) -> nn.Module:
    assert isinstance(layer, _FOLDABLE) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        w, b = fold_batchnorm(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                              bn.weight, bn.bias)
    new = copy.copy(layer)
    new.__dict__["_parameters"] = {"weight": nn.Parameter(w, requires_grad=False),
                                   "bias": nn.Parameter(b, requires_grad=False)}
    return new


def _pairs(m: nn.Module) -> list[tuple[str, str]]:
    """(layer, BatchNorm) child names that ``m`` applies back to back: consecutive children of a
    Sequential, or what the module declares in ``fold_pairs`` (e.g. a residual block's
    ``(conv1, bn1)``)."""
    if type(m) is nn.Sequential:  # a subclass may apply its children differently
        names = list(m._modules)
        return list(pairwise(names))
    return list(getattr(m, "fold_pairs", ()))


def _rewrite(m: nn.Module, fold: bool) -> bool:
    """Rewrite the clone ``m`` in place (children first); True if anything changed."""
    changed = False
    for child in m._modules.values():
        if child is not None:
            changed |= _rewrite(child, fold)
    mods = m._modules
    if fold:
        for a, b in _pairs(m):
            layer, bn = mods.get(a), mods.get(b)
            if (isinstance(layer, _FOLDABLE) and bn is not None and _foldable_bn(bn)
                    and getattr(bn, "num_features", None) == layer.weight.shape[0]):
                mods[a], mods[b] = nn.Identity(), _folded(layer, bn)
                changed = True
    if type(m) is nn.Sequential:
        names = list(mods)
        for a, b in pairwise(names):
            act, pool = mods[a], mods[b]
            if act is not None and _monotone(act) and isinstance(pool, _POOLS) and not pool.return_indices:
                mods[a], mods[b] = pool, act
                changed = True
    return changed


def inference_view(model: nn.Module) -> nn.Module:
    """``model`` computed with fewer passes (module docstring), or ``model`` itself when it is not
    entirely in eval mode, has hooks, is (or holds) a TorchScript module, or has nothing to rewrite. The view's parameters are
    ``model``'s own tensors or frozen folded copies; ``model`` is left untouched."""
    modules = list(model.modules())
    if any(m.training or _has_hooks(m) or isinstance(m, torch.jit.ScriptModule) for m in modules):
        return model  # (a scripted module runs its compiled graph, not its children)
    view = _clone(model)
    return view if _rewrite(view, fold=memory_format_of(model) != "contiguous") else model


__all__ = ["fold_batchnorm", "inference_view"]
