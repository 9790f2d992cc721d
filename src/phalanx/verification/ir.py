"""A piecewise-linear network IR in float64 numpy, built exactly from trained PyTorch members.

Every linear module (input :class:`~phalanx.models.base.Normalize`, ``Linear``, ``Conv2d``,
``BatchNorm`` in eval mode, ``AvgPool2d``, ``Flatten``, ``Identity``, ``Dropout`` in eval mode)
is folded into a dense :class:`Affine` op, read off by evaluating the module in float64 on the
zero input and on the unit basis (``W[:, j] = f(e_j) - f(0)``, ``b = f(0)``); this is exact up to
float64 rounding for any affine module. Consecutive affines are merged. ReLU, leaky ReLU,
max-pooling and residual additions are kept as their own ops, so every backend (MILP, Marabou,
SMT, bound propagation) reads one representation. See ``VERIFICATION-API.md``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch import nn

from phalanx.errors import PhalanxError


@dataclass(frozen=True, eq=False)
class Conv:
    """A bias-free 2-d convolution factor from ``in_shape`` (C, H, W) to ``out_shape``."""

    weight: np.ndarray  # (out_channels, in_channels / groups, kh, kw)
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class Diag:
    """Elementwise scaling ``y = d * x`` (input normalization, eval-mode BatchNorm)."""

    scale: np.ndarray


@dataclass(frozen=True, eq=False)
class Dense:
    """``y = W x`` for a dense ``W`` of shape (out, in)."""

    weight: np.ndarray


#: one linear factor of an affine op's weight (bias-free); see :attr:`Affine.factors`
Factor = Union[Conv, Diag, Dense]  # noqa: UP007


@dataclass(frozen=True, eq=False)
class Affine:
    """``y = W x + b`` with ``W`` of shape (out, in).

    ``factors``, when known, is the same linear map as a chain (applied first to last) of
    convolutions, diagonal scalings and dense matrices, so that bound propagation can apply
    ``W`` and ``W^T`` as convolutions / transposed convolutions instead of dense products
    (``crown.py``); ``W`` stays the exact reference every backend reads. ``None``: dense only.
    """

    weight: np.ndarray
    bias: np.ndarray
    factors: tuple[Factor, ...] | None = None


@dataclass(frozen=True)
class Relu:
    """``y = max(x, 0)`` elementwise."""


@dataclass(frozen=True)
class LeakyRelu:
    """``y = x`` for ``x >= 0`` and ``slope * x`` otherwise (``0 <= slope <= 1``)."""

    slope: float


@dataclass(frozen=True, eq=False)
class MaxPool:
    """Output ``j`` is ``max(x[groups[j]])``."""

    groups: tuple[np.ndarray, ...]


@dataclass(frozen=True, eq=False)
class Residual:
    """``out = run(branch, h) + run(shortcut, h)`` (an empty shortcut is the identity)."""

    branch: tuple[Op, ...]
    shortcut: tuple[Op, ...]


Op = Union[Affine, Relu, LeakyRelu, MaxPool, Residual]  # noqa: UP007 (runtime alias)
Nonlinear = Union[Relu, LeakyRelu, MaxPool]  # noqa: UP007


def op_out_dim(op: Op, in_dim: int) -> int:
    if isinstance(op, Affine):
        return int(op.weight.shape[0])
    if isinstance(op, MaxPool):
        return len(op.groups)
    if isinstance(op, Residual):
        return ops_out_dim(op.branch, in_dim)
    return in_dim


def ops_out_dim(ops: tuple[Op, ...], in_dim: int) -> int:
    d = in_dim
    for op in ops:
        d = op_out_dim(op, d)
    return d


def apply_op(op: Op, h: np.ndarray) -> np.ndarray:
    """Apply one op to a (B, n) float64 batch."""
    if isinstance(op, Affine):
        return h @ op.weight.T + op.bias  # type: ignore[no-any-return]
    if isinstance(op, Relu):
        return np.maximum(h, 0.0)
    if isinstance(op, LeakyRelu):
        return np.where(h >= 0.0, h, op.slope * h)
    if isinstance(op, MaxPool):
        return np.stack([h[:, g].max(axis=1) for g in op.groups], axis=1)
    return run_ops(op.branch, h) + run_ops(op.shortcut, h)


def run_ops(ops: tuple[Op, ...], h: np.ndarray) -> np.ndarray:
    for op in ops:
        h = apply_op(op, h)
    return h


def walk_nonlinear(ops: tuple[Op, ...]) -> Iterator[Nonlinear]:
    """The nonlinear ops in depth-first order (residual: branch before shortcut)."""
    for op in ops:
        if isinstance(op, Residual):
            yield from walk_nonlinear(op.branch)
            yield from walk_nonlinear(op.shortcut)
        elif not isinstance(op, Affine):
            yield op


@dataclass(frozen=True, eq=False)
class NetworkIR:
    """A member as a sequence of ops on flattened float64 inputs of shape ``in_shape``."""

    ops: tuple[Op, ...]
    in_dim: int
    out_dim: int
    in_shape: tuple[int, ...]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits for (B, in_dim) or (in_dim,) float64 inputs (same leading shape out)."""
        arr = np.asarray(x, dtype=np.float64)
        single = arr.ndim == 1
        h = arr.reshape(1, -1) if single else arr.reshape(arr.shape[0], -1)
        if h.shape[1] != self.in_dim:
            raise PhalanxError(f"network expects {self.in_dim} inputs, got {h.shape[1]}")
        out = run_ops(self.ops, h)
        return out[0] if single else out

    @property
    def num_nonlinear(self) -> int:
        return sum(1 for _ in walk_nonlinear(self.ops))

    def num_neurons(self) -> int:
        """Number of nonlinear units (ReLU/leaky units and max-pool outputs)."""
        n = 0
        dims = _nonlinear_dims(self.ops, self.in_dim)
        for d in dims:
            n += d
        return n


def _nonlinear_dims(ops: tuple[Op, ...], in_dim: int) -> list[int]:
    dims: list[int] = []
    d = in_dim
    for op in ops:
        if isinstance(op, Residual):
            dims += _nonlinear_dims(op.branch, d)
            dims += _nonlinear_dims(op.shortcut, d)
        elif isinstance(op, (Relu, LeakyRelu)):
            dims.append(d)
        elif isinstance(op, MaxPool):
            dims.append(d)
        d = op_out_dim(op, d)
    return dims


# ---------------------------------------------------------------------------------------------
# conversion from PyTorch

class AffineModule(nn.Module):
    """Base of modules that declare themselves affine per sample (e.g. the ONNX importer's
    constant ops and reshapes); :func:`to_ir` folds them like ``Linear`` (and checks it)."""


_AFFINE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv2d, nn.Conv1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d, nn.Flatten,
    nn.Identity, nn.Dropout, nn.ZeroPad2d, AffineModule,
)


def _affine_of(module: nn.Module, shape: tuple[int, ...]) -> tuple[Affine, tuple[int, ...]]:
    """Read ``W``, ``b`` off an affine module by evaluating it in float64 on the unit basis."""
    n = int(np.prod(shape))
    m = _double_eval(module)
    with torch.no_grad():
        zero = torch.zeros((1, *shape), dtype=torch.float64)
        b = m(zero)
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
        cols = m(basis) - b
        # the read-off is exact only for an affine, per-sample module: check it on a random batch
        # (e.g. BatchNorm with track_running_stats=False normalizes by batch statistics in eval)
        probe = torch.rand((3, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        got = m(probe).reshape(3, -1)
    out_shape = tuple(int(s) for s in b.shape[1:])
    w = cols.reshape(n, -1).T.contiguous().numpy().copy()
    bias = b.reshape(-1).numpy().copy()
    want = probe.reshape(3, -1).numpy() @ w.T + bias
    scale = 1.0 + float(np.abs(want).max(initial=0.0)) + float(np.abs(w).sum(axis=1).max(initial=0.0))
    if not np.allclose(got.numpy(), want, rtol=0.0, atol=1e-9 * scale):
        raise PhalanxError(f"layer {type(module).__name__} is not affine per sample in eval mode (e.g. BatchNorm "
                           "without running statistics); accepted: affine layers with eval-mode statistics")
    factors = _factors_of(m, w, shape, out_shape)
    if factors is not None:  # keep the structure only where it reproduces W
        lin = probe.reshape(3, -1).numpy()
        if not np.allclose(apply_factors(factors, lin), lin @ w.T, rtol=0.0, atol=1e-9 * scale):
            factors = None
    return Affine(w, bias, factors), out_shape


def _factors_of(m: nn.Module, w: np.ndarray, shape: tuple[int, ...],
                out_shape: tuple[int, ...]) -> tuple[Factor, ...] | None:
    """The structure of an affine module's weight: a convolution for Conv2d / AvgPool2d, a
    diagonal for elementwise modules, nothing for reshapes, dense for Linear; None if unknown."""
    if isinstance(m, (nn.Flatten, nn.Identity, nn.Dropout)):
        return ()
    if isinstance(m, nn.Conv2d) and len(shape) == 3 and len(out_shape) == 3 and not isinstance(m.padding, str) \
            and m.padding_mode == "zeros":
        return (Conv(m.weight.detach().double().numpy().copy(), _pair(m.stride), _pair(m.padding),
                     _pair(m.dilation), int(m.groups), _triple(shape), _triple(out_shape)),)
    if isinstance(m, nn.AvgPool2d) and len(shape) == 3 and len(out_shape) == 3 and not m.ceil_mode \
            and m.divisor_override is None and (m.count_include_pad or _pair(m.padding) == (0, 0)):
        kh, kw = _pair(m.kernel_size)
        c = shape[0]
        ker = np.full((c, 1, kh, kw), 1.0 / (kh * kw))
        return (Conv(ker, _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding), (1, 1), c,
                     _triple(shape), _triple(out_shape)),)
    if w.shape[0] == w.shape[1] and np.count_nonzero(w - np.diag(np.diagonal(w))) == 0:
        return (Diag(np.diagonal(w).copy()),)
    if isinstance(m, nn.Linear) and len(shape) == 1:
        return (Dense(w),)
    return None


def _triple(s: tuple[int, ...]) -> tuple[int, int, int]:
    return int(s[0]), int(s[1]), int(s[2])


def apply_factors(factors: tuple[Factor, ...], h: np.ndarray) -> np.ndarray:
    """``h @ W.T`` for a (B, in) batch, applying the factors as convolutions (float64 torch)."""
    import torch.nn.functional as F

    t = torch.as_tensor(np.ascontiguousarray(h, dtype=np.float64))
    for f in factors:
        if isinstance(f, Conv):
            t = F.conv2d(t.reshape(-1, *f.in_shape), torch.as_tensor(f.weight), None, f.stride, f.padding,
                         f.dilation, f.groups).reshape(t.shape[0], -1)
        elif isinstance(f, Diag):
            t = t * torch.as_tensor(f.scale)
        else:
            t = t @ torch.as_tensor(f.weight).T
    return t.numpy()


def _double_eval(module: nn.Module) -> nn.Module:
    import copy

    m = copy.deepcopy(module).double()
    m.eval()
    return m


def _merge(ops: list[Op]) -> list[Op]:
    """Merge consecutive affine ops: ``W2 (W1 x + b1) + b2``."""
    out: list[Op] = []
    for op in ops:
        if isinstance(op, Affine) and out and isinstance(out[-1], Affine):
            prev = out.pop()
            assert isinstance(prev, Affine)
            factors = None if prev.factors is None or op.factors is None else prev.factors + op.factors
            out.append(Affine(op.weight @ prev.weight, op.weight @ prev.bias + op.bias, factors))
        else:
            out.append(op)
    return out


def _maxpool_groups(m: nn.MaxPool2d, shape: tuple[int, ...]) -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
    if len(shape) != 3:
        raise PhalanxError(f"MaxPool2d needs a (C, H, W) input, got shape {shape}")
    if m.ceil_mode:
        raise PhalanxError("MaxPool2d with ceil_mode=True is not supported by the verification IR")
    c, h, w = shape
    kh, kw = _pair(m.kernel_size)
    sh, sw = _pair(m.stride if m.stride is not None else m.kernel_size)
    ph, pw = _pair(m.padding)
    dh, dw = _pair(m.dilation)
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    groups: list[np.ndarray] = []
    for ch, i, j in itertools.product(range(c), range(oh), range(ow)):
        idx = [ch * h * w + r * w + s
               for r in (i * sh - ph + dh * a for a in range(kh)) if 0 <= r < h
               for s in (j * sw - pw + dw * b for b in range(kw)) if 0 <= s < w]
        groups.append(np.asarray(idx, dtype=np.int64))
    return tuple(groups), (c, oh, ow)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    t = tuple(int(a) for a in v)
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


def _convert(modules: list[nn.Module], shape: tuple[int, ...], where: str) -> tuple[list[Op], tuple[int, ...]]:
    from phalanx.models.base import Normalize, ResidualBlock

    ops: list[Op] = []
    for k, m in enumerate(modules):
        name = f"{where}[{k}] ({type(m).__name__})"
        if isinstance(m, nn.Sequential):
            sub, shape = _convert(list(m), shape, f"{where}[{k}]")
            ops += sub
        elif isinstance(m, (*_AFFINE_TYPES, Normalize)):
            op, shape = _affine_of(m, shape)
            ops.append(op)
        elif isinstance(m, nn.ReLU):
            ops.append(Relu())
        elif isinstance(m, nn.LeakyReLU):
            slope = float(m.negative_slope)
            if not 0.0 <= slope <= 1.0:
                raise PhalanxError(f"layer {name}: leaky ReLU slope {slope} unsupported; accepted: 0 <= slope <= 1")
            ops.append(LeakyRelu(slope))
        elif isinstance(m, nn.MaxPool2d):
            groups, shape = _maxpool_groups(m, shape)
            ops.append(MaxPool(groups))
        elif isinstance(m, ResidualBlock):
            branch, out_shape = _convert([m.conv1, m.bn1, m.act, m.conv2, m.bn2], shape, f"{name}.branch")
            short, short_shape = _convert([m.shortcut], shape, f"{name}.shortcut")
            if out_shape != short_shape:
                raise PhalanxError(f"layer {name}: branch shape {out_shape} != shortcut shape {short_shape}")
            short = [op for op in _merge(short) if not _is_identity(op)]
            ops.append(Residual(tuple(_merge(branch)), tuple(short)))
            shape = out_shape
        else:
            raise PhalanxError(
                f"layer {name} is not supported by the verification encodings; supported: Linear, Conv2d, "
                "ReLU, LeakyReLU, MaxPool2d, AvgPool2d, Flatten, BatchNorm (eval), Normalize, ResidualBlock")
    return ops, shape


def _is_identity(op: Op) -> bool:
    return (isinstance(op, Affine) and op.weight.shape[0] == op.weight.shape[1]
            and np.array_equal(op.weight, np.eye(op.weight.shape[0])) and not op.bias.any())


def to_ir(model: nn.Module, in_shape: tuple[int, ...] | None = None) -> NetworkIR:
    """The exact IR of a trained member (eval-mode semantics). Unsupported layer -> PhalanxError.

    ``model`` is a :class:`~phalanx.models.base.FeatureNet` (``normalize`` then ``body``), an
    ``nn.Sequential`` or a single supported module; ``in_shape`` defaults to ``model.in_shape``.
    """
    shape = tuple(int(s) for s in (in_shape if in_shape is not None else getattr(model, "in_shape", ())))
    if not shape:
        raise PhalanxError(f"cannot infer the input shape of {type(model).__name__}; pass in_shape")
    normalize = getattr(model, "normalize", None)
    body = getattr(model, "body", None)
    if isinstance(normalize, nn.Module) and isinstance(body, nn.Module):
        modules: list[nn.Module] = [normalize, body]
    elif isinstance(model, nn.Sequential):
        modules = list(model)
    else:
        modules = [model]
    ops, out_shape = _convert(modules, shape, type(model).__name__)
    merged = tuple(op for op in _merge(ops))
    in_dim = int(np.prod(shape))
    return NetworkIR(merged, in_dim, int(np.prod(out_shape)), shape)


def stack_outputs(nets: tuple[NetworkIR, ...]) -> tuple[int, list[slice]]:
    """Total output size of side-by-side networks and each one's slice of the concatenation."""
    slices, start = [], 0
    for n in nets:
        slices.append(slice(start, start + n.out_dim))
        start += n.out_dim
    return start, slices
