"""The model base class: input normalization inside the model, a sequential body, and
pre-activation feature taps by layer index (the hook DVERGE's feature distillation needs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from phalanx.errors import PhalanxError

ACTIVATIONS = ("relu", "leaky_relu")

#: memory layouts of convolutional models' 4-D weights (and so of their activations)
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
#: the default: channels-last (NHWC) runs convolutions, BatchNorm and activations faster on CPU
#: (oneDNN) and GPU (cuDNN); outputs differ from NCHW only at float rounding (BENCHMARKS.md)
DEFAULT_MEMORY_FORMAT = "channels_last"


def has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def set_memory_format(module: nn.Module, memory_format: str = DEFAULT_MEMORY_FORMAT) -> nn.Module:
    """Convert ``module``'s 4-D parameters and buffers, in place and once, to ``memory_format``
    (``"channels_last"`` or ``"contiguous"``); returns ``module``.

    Every 4-D tensor flowing through a convolution with channels-last weights comes out
    channels-last whatever the input's layout, so converting the weights once makes training,
    attacks and evaluation all run in that layout; ``.to(device)``, ``deepcopy``, optimizer state
    and ``load_state_dict`` preserve it. ``"contiguous"`` restores PyTorch's NCHW for users who
    need bit-for-bit NCHW results. Modules without convolutions are returned unchanged."""
    fmt = MEMORY_FORMATS.get(memory_format) if isinstance(memory_format, str) else None
    if fmt is None:
        raise PhalanxError(f"unknown memory_format {memory_format!r}; accepted: {', '.join(MEMORY_FORMATS)}")
    if has_conv(module):
        module.to(memory_format=fmt)  # type: ignore[call-overload]
    return module


def memory_format_of(module: nn.Module) -> str | None:
    """``"channels_last"`` or ``"contiguous"`` from the first convolution weight whose layout tells
    them apart (a single input channel fits both); None without a 2-D convolution."""
    found = None
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            cl, nchw = m.weight.is_contiguous(memory_format=torch.channels_last), m.weight.is_contiguous()
            if cl != nchw:
                return "channels_last" if cl else "contiguous"
            found = "contiguous"
    return found


def make_activation(name: str, negative_slope: float = 0.01) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    raise PhalanxError(f"unknown activation {name!r}; accepted: {', '.join(ACTIVATIONS)}")


def is_activation(m: nn.Module) -> bool:
    return isinstance(m, (nn.ReLU, nn.LeakyReLU))


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, so that attacks work in [0, 1] pixel space."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise PhalanxError(f"normalization needs one positive std per mean, got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ResidualBlock(nn.Module):
    """CIFAR ResNet basic block whose output is taken *before* the final activation.

    ``out = bn2(conv2(act(bn1(conv1(h))))) + shortcut(h)``; the model applies the activation
    after the block, so the block output is a pre-activation feature (DVERGE's even layers) and
    ``bn1``'s output is the in-block feature (DVERGE's odd layers).
    """

    #: (layer, BatchNorm) applied back to back, which an eval-mode view may fold into one layer
    #: (:func:`phalanx.models.inference.inference_view`; the shortcut is a Sequential)
    fold_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, cin: int, cout: int, stride: int, activation: str, negative_slope: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act = make_activation(activation, negative_slope)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward_taps(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mid = self.bn1(self.conv1(h))
        return mid, self._rest(h, self.act(mid))

    def forward(self, h: Tensor) -> Tensor:
        # without the inner tap, the activation may overwrite bn1's output (see _apply)
        return self._rest(h, _apply(self.act, self.bn1(self.conv1(h)), self.bn1))

    def _rest(self, h: Tensor, a: Tensor) -> Tensor:
        out, skip = self.bn2(self.conv2(a)), self.shortcut(h)
        if self.bn2._forward_hooks:  # a hook may keep bn2's output
            return out + skip  # type: ignore[no-any-return]
        # the sum in place: BatchNorm's backward never reads its output (same values as out + skip)
        return out.add_(skip)  # type: ignore[no-any-return]


class FeatureNet(nn.Module):
    """A classifier ``body(normalize(x))`` with numbered pre-activation feature taps.

    Feature layer ``l`` (1-based) is the output of the ``l``-th module that is followed by an
    activation (or, inside a :class:`ResidualBlock`, its ``bn1`` output), and the last layer is
    the logits. ``config`` holds everything needed to rebuild the model (see ``build_model``).
    """

    def __init__(self, normalize: Normalize, body: nn.Sequential, config: dict[str, Any]) -> None:
        super().__init__()
        self.normalize = normalize
        self.body = body
        self.config = dict(config)
        taps: list[tuple[int, bool]] = []  # (module index, inner tap of a residual block)
        mods = list(body)
        for i, m in enumerate(mods):
            if isinstance(m, ResidualBlock):
                taps.append((i, True))
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if i == len(mods) - 1 or (nxt is not None and is_activation(nxt)):
                taps.append((i, False))
        self._taps = taps

    @property
    def num_feature_layers(self) -> int:
        return len(self._taps)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.config["in_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    def forward(self, x: Tensor) -> Tensor:
        h = self.normalize(x)
        prev: nn.Module | None = None
        for m in self.body:
            h = _apply(m, h, prev)
            prev = m
        return h

    def features(self, x: Tensor, layer: int) -> Tensor:
        """Pre-activation features of layer ``layer`` in ``1..num_feature_layers`` (last = logits)."""
        if not isinstance(layer, int) or not 1 <= layer <= self.num_feature_layers:
            raise PhalanxError(
                f"feature layer {layer!r} out of range; accepted: 1..{self.num_feature_layers}"
            )
        idx, inner = self._taps[layer - 1]
        h = self.normalize(x)
        prev: nn.Module | None = None
        for i, m in enumerate(self.body):
            if i == idx:
                if inner:
                    assert isinstance(m, ResidualBlock)
                    return m.forward_taps(h)[0]
                return m(h)  # type: ignore[no-any-return]
            h = _apply(m, h, prev)
            prev = m
        raise AssertionError("unreachable")


#: modules whose output is a fresh tensor that their backward never reads (convolution and linear
#: layers save their input, BatchNorm its input and statistics, max-pooling its input and indices;
#: a residual block returns its sum)
_FRESH_OUTPUT = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.modules.pooling._MaxPoolNd,
                 ResidualBlock)


def _apply(m: nn.Module, h: Tensor, prev: nn.Module | None) -> Tensor:
    """``m(h)``, except that a plain ReLU after a module in :data:`_FRESH_OUTPUT` overwrites ``h``
    in place (the same values and gradients, one memory pass and one activation-sized allocation
    fewer per ReLU; autograd's version check would reject it if anything had saved ``h``). A ReLU
    with hooks, after a module with forward hooks (which may keep its output), or after anything
    else, runs as a module."""
    if (type(m) is nn.ReLU and isinstance(prev, _FRESH_OUTPUT) and not m._forward_hooks
            and not m._forward_pre_hooks and not prev._forward_hooks):
        return torch.relu_(h)
    return m(h)  # type: ignore[no-any-return]
