"""The model registry: mlp, lenet5, mnist-convnet, resnet20 and a small CNN for 8x8 inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from phalanx.errors import PhalanxError
from phalanx.models.base import (
    DEFAULT_MEMORY_FORMAT,
    FeatureNet,
    Normalize,
    ResidualBlock,
    make_activation,
    set_memory_format,
)
from phalanx.registry import Registry

Builder = Callable[..., FeatureNet]
MODELS: Registry[Builder] = Registry("model")


def _flat_dim(layers: Sequence[nn.Module], in_shape: tuple[int, int, int], name: str) -> int:
    try:
        with torch.no_grad():
            h = torch.zeros(1, *in_shape)
            for m in layers:
                h = m(h)
    except RuntimeError:
        h = torch.zeros(0)
    if h.numel() == 0 or min(h.shape[1:]) < 1:
        raise PhalanxError(f"input shape {in_shape} is too small for model {name!r}")
    return int(h.numel())


def _finish(name: str, layers: list[nn.Module], in_shape: Sequence[int], num_classes: int,
            mean: Sequence[float] | None, std: Sequence[float] | None, extra: dict[str, Any]) -> FeatureNet:
    c = int(in_shape[0])
    mean = list(mean) if mean is not None else [0.0] * c
    std = list(std) if std is not None else [1.0] * c
    if len(mean) != c or len(std) != c:
        raise PhalanxError(f"normalization has {len(mean)} channels, input has {c}")
    cfg = {"name": name, "in_shape": [int(s) for s in in_shape], "num_classes": int(num_classes),
           "mean": [float(v) for v in mean], "std": [float(v) for v in std], **extra}
    return FeatureNet(Normalize(mean, std), nn.Sequential(*layers), cfg)


def _check(in_shape: Sequence[int], num_classes: int) -> tuple[int, int, int]:
    if len(in_shape) != 3 or any(int(s) < 1 for s in in_shape):
        raise PhalanxError(f"in_shape must be (C, H, W) with positive sizes, got {tuple(in_shape)}")
    if num_classes < 2:
        raise PhalanxError(f"num_classes must be >= 2, got {num_classes}")
    return (int(in_shape[0]), int(in_shape[1]), int(in_shape[2]))


@MODELS.register("mlp", "multi-layer perceptron with configurable widths and activation")
def mlp(in_shape: Sequence[int], num_classes: int, *, widths: Sequence[int] = (100,),
        activation: str = "relu", negative_slope: float = 0.01,
        mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> FeatureNet:
    shape = _check(in_shape, num_classes)
    if any(int(w) < 1 for w in widths):
        raise PhalanxError(f"mlp widths must be positive, got {list(widths)}")
    layers: list[nn.Module] = [nn.Flatten()]
    prev = shape[0] * shape[1] * shape[2]
    for w in widths:
        layers += [nn.Linear(prev, int(w)), make_activation(activation, negative_slope)]
        prev = int(w)
    layers.append(nn.Linear(prev, num_classes))
    return _finish("mlp", layers, shape, num_classes, mean, std,
                   {"widths": [int(w) for w in widths], "activation": activation,
                    "negative_slope": negative_slope})


def _conv_net(name: str, shape: tuple[int, int, int], num_classes: int, convs: Sequence[tuple[int, int, int]],
              fcs: Sequence[int], pool: str, activation: str, negative_slope: float) -> list[nn.Module]:
    """conv(k, pad)-act-pool blocks, then fully connected layers."""
    layers: list[nn.Module] = []
    cin = shape[0]
    for cout, k, pad in convs:
        pool_layer = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
        layers += [nn.Conv2d(cin, cout, k, padding=pad), make_activation(activation, negative_slope), pool_layer]
        cin = cout
    layers.append(nn.Flatten())
    prev = _flat_dim(layers, shape, name)
    for w in fcs:
        layers += [nn.Linear(prev, w), make_activation(activation, negative_slope)]
        prev = w
    layers.append(nn.Linear(prev, num_classes))
    return layers


def _check_pool(pool: str) -> None:
    if pool not in ("max", "avg"):
        raise PhalanxError(f"unknown pool {pool!r}; accepted: max, avg")


@MODELS.register("lenet5", "LeCun's LeNet-5: conv6-pool-conv16-pool-fc120-fc84-fc10")
def lenet5(in_shape: Sequence[int], num_classes: int, *, activation: str = "relu",
           negative_slope: float = 0.01, pool: str = "max",
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> FeatureNet:
    shape = _check(in_shape, num_classes)
    _check_pool(pool)
    # padding 2 on the first conv turns 28x28 MNIST into LeNet-5's 32x32 receptive geometry
    layers = _conv_net("lenet5", shape, num_classes, [(6, 5, 2), (16, 5, 0)], [120, 84], pool,
                       activation, negative_slope)
    return _finish("lenet5", layers, shape, num_classes, mean, std,
                   {"activation": activation, "negative_slope": negative_slope, "pool": pool})


@MODELS.register("mnist-convnet", "conv20-pool-conv50-pool-fc500 (the net TRS/CLDL code calls LeNet)")
def mnist_convnet(in_shape: Sequence[int], num_classes: int, *, activation: str = "relu",
                  negative_slope: float = 0.01, pool: str = "max",
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> FeatureNet:
    shape = _check(in_shape, num_classes)
    _check_pool(pool)
    layers = _conv_net("mnist-convnet", shape, num_classes, [(20, 5, 0), (50, 5, 0)], [500], pool,
                       activation, negative_slope)
    return _finish("mnist-convnet", layers, shape, num_classes, mean, std,
                   {"activation": activation, "negative_slope": negative_slope, "pool": pool})


@MODELS.register("small-cnn", "small CNN for 8x8 inputs: conv16-conv32-pool-fc64")
def small_cnn(in_shape: Sequence[int], num_classes: int, *, channels: Sequence[int] = (16, 32),
              hidden: int = 64, activation: str = "relu", negative_slope: float = 0.01,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> FeatureNet:
    shape = _check(in_shape, num_classes)
    if len(channels) != 2 or min(channels) < 1 or hidden < 1:
        raise PhalanxError(f"small-cnn needs two positive channel counts and hidden >= 1, got {channels}, {hidden}")
    c1, c2 = int(channels[0]), int(channels[1])
    layers: list[nn.Module] = [
        nn.Conv2d(shape[0], c1, 3, padding=1), make_activation(activation, negative_slope),
        nn.Conv2d(c1, c2, 3, padding=1), make_activation(activation, negative_slope),
        nn.MaxPool2d(2), nn.Flatten(),
    ]
    prev = _flat_dim(layers, shape, "small-cnn")
    layers += [nn.Linear(prev, hidden), make_activation(activation, negative_slope), nn.Linear(hidden, num_classes)]
    return _finish("small-cnn", layers, shape, num_classes, mean, std,
                   {"channels": [c1, c2], "hidden": int(hidden), "activation": activation,
                    "negative_slope": negative_slope})


@MODELS.register("resnet20", "CIFAR ResNet-20 (16/32/64 channels, 3 blocks per stage)")
def resnet20(in_shape: Sequence[int], num_classes: int, *, activation: str = "relu",
             negative_slope: float = 0.01, width: int = 16,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> FeatureNet:
    shape = _check(in_shape, num_classes)
    if shape[1] < 4 or shape[2] < 4:
        raise PhalanxError(f"input shape {shape} is too small for model 'resnet20' (needs >= 4x4)")
    layers: list[nn.Module] = [nn.Conv2d(shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               make_activation(activation, negative_slope)]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            layers += [ResidualBlock(cin, cout, stride, activation, negative_slope),
                       make_activation(activation, negative_slope)]
            cin = cout
    h = -(-shape[1] // 4)
    w = -(-shape[2] // 4)
    layers += [nn.AvgPool2d((h, w)), nn.Flatten(), nn.Linear(cin, num_classes)]
    for m in layers:
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
    return _finish("resnet20", layers, shape, num_classes, mean, std,
                   {"activation": activation, "negative_slope": negative_slope, "width": int(width)})


_BASE_KEYS = ("name", "in_shape", "num_classes")


def create_model(name: str, in_shape: Sequence[int], num_classes: int, *,
                 memory_format: str = DEFAULT_MEMORY_FORMAT, **kwargs: Any) -> FeatureNet:
    """Build a registered model; unknown keyword options raise a clear error.

    Convolutional models are converted once to ``memory_format`` (``"channels_last"``, the
    faster default, or ``"contiguous"`` for bit-for-bit NCHW; see
    :func:`~phalanx.models.base.set_memory_format`); a non-default choice is kept in the model's
    ``config`` so that a checkpoint rebuilds it in the same layout."""
    builder = MODELS.get(name)
    set_memory_format(nn.Identity(), memory_format)  # validate before building
    try:
        model = builder(in_shape, num_classes, **kwargs)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            import inspect

            allowed = [p for p in inspect.signature(builder).parameters if p not in ("in_shape", "num_classes")]
            bad = sorted(set(kwargs) - set(allowed))
            raise PhalanxError(f"model {name!r} has no option {', '.join(map(repr, bad))}; "
                               f"accepted options: {', '.join([*allowed, 'memory_format'])}") from None
        raise
    set_memory_format(model, memory_format)
    if memory_format != DEFAULT_MEMORY_FORMAT:
        model.config["memory_format"] = memory_format
    return model


def build_model(config: dict[str, Any]) -> FeatureNet:
    """Rebuild a model from its ``FeatureNet.config`` (as stored in a checkpoint)."""
    if not isinstance(config, dict) or any(k not in config for k in _BASE_KEYS):
        raise PhalanxError(f"model config must contain {', '.join(_BASE_KEYS)}, got {config!r}")
    kwargs = {k: v for k, v in config.items() if k not in _BASE_KEYS}
    return create_model(str(config["name"]), config["in_shape"], int(config["num_classes"]), **kwargs)
