"""ONNX networks into PyTorch modules and the exact float64 IR (:mod:`phalanx.verification.ir`).

A chain graph (every node has one non-constant input, the previous node's output) of
``Gemm``, ``MatMul``, ``Add``, ``Sub``, ``Mul``, ``Div`` (with a constant operand), ``Relu``,
``LeakyRelu``, ``Conv`` (2-D), ``BatchNormalization`` (inference), ``MaxPool``, ``AveragePool``,
``Flatten``, ``Reshape``, ``Identity``, ``Dropout`` becomes an ``nn.Sequential`` of the
equivalent PyTorch layers with the file's weights; :func:`~phalanx.verification.ir.to_ir` then
reads the IR off it exactly as for trained members, so one representation serves every backend
and witnesses are re-checked by the PyTorch forward pass in float64. Constant subgraphs (the
``Shape -> Gather -> Concat`` chains exporters write for ``Reshape``) are folded with the static
input shape. Several chains on the one input joined by ``Concat`` (or stacked and averaged by
``ReduceMean``: phalanx's composite exports) become several branches with a linear head. Any
other operator (``Sigmoid``, ``Tanh``, ``Softmax``, a residual ``Add`` of two
computed tensors, ...) is refused with a :class:`~phalanx.errors.PhalanxError` naming it:
the IR is piecewise linear.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from phalanx.errors import PhalanxError
from phalanx.verification.ir import AffineModule, NetworkIR, to_ir

SUPPORTED_OPS = ("Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Conv", "BatchNormalization",
                 "MaxPool", "AveragePool", "Flatten", "Reshape", "Identity", "Dropout")


class ConstantOp(AffineModule):
    """``x op c`` (or ``c op x``) with a constant tensor broadcast NumPy-style."""

    value: Tensor

    def __init__(self, op: str, value: np.ndarray, constant_first: bool = False) -> None:
        super().__init__()
        self.op, self.constant_first = op, constant_first
        self.register_buffer("value", torch.as_tensor(np.array(value, dtype=np.float64)))

    def forward(self, x: Tensor) -> Tensor:
        c = self.value.to(x.dtype)
        if self.op == "Add":
            return x + c
        if self.op == "Mul":
            return x * c
        if self.op == "Div":
            return x / c
        return c - x if self.constant_first else x - c


class Reshape(AffineModule):
    """Reshape every sample to ``shape`` (the batch dimension kept)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


@dataclass(frozen=True, eq=False)
class OnnxNetwork:
    """An imported network: one or more branches on the one input (PyTorch modules in float64
    and their IRs), the output as ``head @ concat(branch outputs)`` (``head`` None: the plain
    concatenation), the ONNX input name and shapes (with the batch dimension) and the model bytes
    for onnxruntime. Chain graphs have one branch; phalanx's composite exports have one per
    member joined by ``Concat`` (or their mean)."""

    modules: tuple[nn.Module, ...]
    irs: tuple[NetworkIR, ...]
    head: np.ndarray | None
    input_name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    model_bytes: bytes
    source: str

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.irs[0].in_shape

    @property
    def in_dim(self) -> int:
        return self.irs[0].in_dim

    @property
    def n_outputs(self) -> int:
        return int(np.prod(self.output_shape))

    def _combine(self, parts: list[np.ndarray]) -> np.ndarray:
        y = np.concatenate(parts, axis=1)
        return y if self.head is None else y @ self.head.T

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Flat float64 outputs of the PyTorch modules for (B, n_in) flat inputs."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1, *self.in_shape))
        with torch.no_grad():
            return self._combine([m(xt).reshape(xt.shape[0], -1).numpy() for m in self.modules])

    def forward_ir(self, x: np.ndarray) -> np.ndarray:
        """The same through the exact IR."""
        h = np.asarray(x, dtype=np.float64).reshape(-1, self.in_dim)
        return self._combine([n.forward(h) for n in self.irs])

    def run_onnxruntime(self, x: np.ndarray) -> np.ndarray:
        """Flat outputs of onnxruntime on (B, n_in) flat inputs (one sample at a time, as the
        VNN-COMP checker; inputs cast to the model's input type)."""
        sess = _session(self.model_bytes)
        inp = sess.get_inputs()[0]
        dtype = np.float64 if inp.type == "tensor(double)" else np.float32
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in self.input_shape)
        outs = [np.asarray(sess.run(None, {inp.name: np.asarray(r, dtype=dtype).reshape(shape)})[0],
                           dtype=np.float64).reshape(-1) for r in np.asarray(x).reshape(-1, self.in_dim)]
        return np.stack(outs)


_SESSIONS: dict[int, Any] = {}


def _session(model_bytes: bytes) -> Any:
    key = hash(model_bytes)
    if key not in _SESSIONS:
        ort = _require("onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        _SESSIONS.clear()
        _SESSIONS[key] = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def _require(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise PhalanxError(f"reading ONNX networks needs {name}: pip install 'phalanx[onnx]'") from None


def load_onnx(path: str | Path) -> OnnxNetwork:
    """Import an ``.onnx`` (or ``.onnx.gz``) file; see the module docstring for what is accepted."""
    onnx = _require("onnx")
    p = Path(path)
    try:
        raw = p.read_bytes()
        if p.suffix == ".gz":
            raw = gzip.decompress(raw)
        model = onnx.load_from_string(raw)
    except FileNotFoundError:
        raise PhalanxError(f"ONNX file {str(p)!r} not found") from None
    except Exception as exc:
        raise PhalanxError(f"cannot read ONNX file {str(p)!r}: {type(exc).__name__}: {exc}") from None
    return import_model(model, str(p), raw)


def import_model(model: Any, source: str = "<onnx>", raw: bytes | None = None) -> OnnxNetwork:
    """Import a loaded ``onnx.ModelProto``."""
    from onnx import numpy_helper

    g = model.graph
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t).astype(np.float64)
                                     if numpy_helper.to_array(t).dtype.kind == "f" else numpy_helper.to_array(t)
                                     for t in g.initializer}
    inputs = [i for i in g.input if i.name not in consts]
    if len(inputs) != 1 or len(g.output) != 1:
        raise PhalanxError(f"{source}: the network must have one input and one output, found "
                           f"{len(inputs)} and {len(g.output)}")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in inputs[0].type.tensor_type.shape.dim)
    if not dims or any(d == 0 or (d < 0 and k > 0) for k, d in enumerate(dims)):
        raise PhalanxError(f"{source}: input shape {list(dims)} unsupported; accepted: static sizes "
                           "(a leading batch dimension may be symbolic)")
    batched = len(dims) >= 2 and dims[0] in (1, -1)
    in_shape = tuple(dims[1:] if batched else dims)
    # computed tensors: name -> (modules from the input, per-sample shape); joins of branches:
    # name -> ("concat" | "stack" | "mean", branch tensor names); "unsq": name -> branch name
    chains: dict[str, tuple[list[nn.Module], tuple[int, ...]]] = {inputs[0].name: ([], in_shape)}
    joins: dict[str, tuple[str, list[str]]] = {}
    unsq: dict[str, str] = {}
    for node in g.node:
        op = node.op_type
        attrs = {a.name: _attr(a) for a in node.attribute}
        dyn = [i for i in node.input if i and i not in consts]
        where = f"{source}: node {node.name or op} ({op})"
        if not dyn:
            consts.update(_fold(node, attrs, consts, source))
            continue
        if any(d not in chains and d not in unsq and d not in joins for d in dyn):
            raise PhalanxError(f"{where} reads a tensor computed by an unsupported construct")
        if op == "Shape" and len(dyn) == 1 and dyn[0] in chains:
            consts[node.output[0]] = np.asarray((1, *chains[dyn[0]][1]), dtype=np.int64)
        elif op == "Unsqueeze" and len(dyn) == 1 and dyn[0] in chains and _axes(attrs, node, consts) == [0]:
            unsq[node.output[0]] = dyn[0]
        elif op == "Concat" and len(dyn) == len(node.input) and all(d in chains for d in dyn) and len(dyn) > 1:
            if int(attrs.get("axis", 0)) not in (1, -1) or any(len(chains[d][1]) != 1 for d in dyn):
                raise PhalanxError(f"{where}: only a concatenation of flat branch outputs along the last axis")
            joins[node.output[0]] = ("concat", dyn)
        elif op == "Concat" and len(dyn) == len(node.input) and all(d in unsq for d in dyn):
            if int(attrs.get("axis", 0)) != 0:
                raise PhalanxError(f"{where}: only stacking branch outputs along a new first axis")
            joins[node.output[0]] = ("stack", [unsq[d] for d in dyn])
        elif op == "ReduceMean" and len(dyn) == 1 and joins.get(dyn[0], ("", []))[0] == "stack":
            if _axes(attrs, node, consts) != [0] or int(attrs.get("keepdims", 1)):
                raise PhalanxError(f"{where}: only the mean over the stacked branches (axes [0], keepdims 0)")
            joins[node.output[0]] = ("mean", joins[dyn[0]][1])
        elif len(dyn) == 1 and dyn[0] in chains:
            mods, shape = chains[dyn[0]]
            new, shape = _convert(node, attrs, consts, shape, source)
            chains[node.output[0]] = ([*mods, *new], shape)
        else:
            why = "a second computed input (e.g. a residual Add)" if len(dyn) > 1 else "a branch of the graph"
            raise PhalanxError(f"{where} has {why}; supported: chains of layers, and branches on the input "
                               "joined by Concat or their mean")
    out_name = g.output[0].name
    if out_name in chains:
        branches, head_kind = [out_name], ""
    elif out_name in joins and joins[out_name][0] in ("concat", "mean"):
        head_kind, branches = joins[out_name]
    else:
        raise PhalanxError(f"{source}: the graph output {out_name!r} is not produced by a supported construct")
    modules, irs = [], []
    for name in branches:
        seq = nn.Sequential(*chains[name][0]).double().eval()
        modules.append(seq)
        irs.append(to_ir(seq, in_shape))
    head = None
    if head_kind == "mean":
        if len({n.out_dim for n in irs}) != 1:
            raise PhalanxError(f"{source}: the averaged branches have different output sizes")
        k = irs[0].out_dim
        head = np.hstack([np.eye(k) / len(irs)] * len(irs))
    with torch.no_grad():
        outs = [m(torch.zeros((1, *in_shape), dtype=torch.float64)) for m in modules]
    out_dims = tuple(int(s) for s in outs[0].shape) if len(outs) == 1 else \
        (1, head.shape[0] if head is not None else sum(n.out_dim for n in irs))
    raw_bytes = raw if raw is not None else model.SerializeToString()
    return OnnxNetwork(tuple(modules), tuple(irs), head, inputs[0].name, dims, out_dims, raw_bytes, source)


def _axes(attrs: dict[str, Any], node: Any, consts: dict[str, np.ndarray]) -> list[int]:
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1] in consts:
        axes = consts[node.input[1]]
    return [int(v) for v in np.atleast_1d(np.asarray(axes if axes is not None else [], dtype=np.int64))]


def _attr(a: Any) -> Any:
    from onnx import helper, numpy_helper

    v = helper.get_attribute_value(a)
    if hasattr(v, "dims") and hasattr(v, "data_type"):
        return numpy_helper.to_array(v)
    if isinstance(v, bytes):
        return v.decode()
    return v


def _unsupported(op: str, source: str, detail: str = "") -> PhalanxError:
    return PhalanxError(f"{source}: ONNX operator {op}{' ' + detail if detail else ''} is not supported by the "
                        f"verification IR (piecewise-linear networks); supported: {', '.join(SUPPORTED_OPS)}")


def _fold(node: Any, attrs: dict[str, Any], consts: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Evaluate a node whose inputs are all constants."""
    op = node.op_type
    xs = [consts[i] for i in node.input if i]
    if op == "Constant":
        v = attrs.get("value")
        if v is None:
            raise _unsupported(op, source, "(only the tensor 'value' form)")
        return {node.output[0]: np.asarray(v)}
    if op in ("Identity", "Cast"):
        return {node.output[0]: xs[0]}
    if op == "Gather":
        return {node.output[0]: np.take(xs[0], xs[1], axis=int(attrs.get("axis", 0)))}
    if op == "Unsqueeze":
        axes = attrs.get("axes", xs[1] if len(xs) > 1 else None)
        out = xs[0]
        for a in sorted(int(v) for v in np.atleast_1d(np.asarray(axes))):
            out = np.expand_dims(out, a)
        return {node.output[0]: out}
    if op == "Concat":
        return {node.output[0]: np.concatenate([np.atleast_1d(x) for x in xs], axis=int(attrs.get("axis", 0)))}
    if op in ("Add", "Sub", "Mul", "Div"):
        f = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
        return {node.output[0]: f(xs[0], xs[1])}
    if op == "Reshape":
        return {node.output[0]: xs[0].reshape(tuple(int(v) for v in xs[1]))}
    raise _unsupported(op, source, "on constants")


def _convert(node: Any, attrs: dict[str, Any], consts: dict[str, np.ndarray], shape: tuple[int, ...],
             source: str) -> tuple[list[nn.Module], tuple[int, ...]]:
    """PyTorch modules for one node on a tensor of per-sample ``shape``; returns the new shape."""
    op = node.op_type
    where = f"{source}: node {node.name or op} ({op})"
    mods: list[nn.Module]
    if op in ("Relu", "Identity", "Dropout"):
        mods = [nn.ReLU()] if op == "Relu" else []
    elif op == "LeakyRelu":
        mods = [nn.LeakyReLU(float(attrs.get("alpha", 0.01)))]
    elif op == "Flatten":
        axis = int(attrs.get("axis", 1))
        if axis != 1:
            raise PhalanxError(f"{where}: Flatten axis {axis} unsupported; accepted: 1 (keep the batch)")
        mods = [nn.Flatten(1)]
    elif op == "Reshape":
        target = [int(v) for v in consts[node.input[1]]]
        if not target or target[0] not in (1, -1, 0):
            raise PhalanxError(f"{where}: reshape to {target} does not keep the batch dimension first")
        rest = [shape[k - 1] if v == 0 and k - 1 < len(shape) else v for k, v in enumerate(target) if k > 0]
        n = int(np.prod(shape))
        if rest.count(-1) == 1:
            known = int(np.prod([v for v in rest if v != -1]))
            rest[rest.index(-1)] = n // known if known else 0
        if int(np.prod(rest)) != n or (target[0] == -1 and -1 in target[1:]):
            raise PhalanxError(f"{where}: cannot reshape {list(shape)} per sample to {target}")
        mods = [Reshape(tuple(rest))]
    elif op in ("Gemm", "MatMul"):
        mods = [_linear(node, attrs, consts, shape, where)]
    elif op in ("Add", "Sub", "Mul", "Div"):
        first = node.input[0] in consts
        c = consts[node.input[0] if first else node.input[1]]
        if first and op == "Div":
            raise PhalanxError(f"{where}: a constant divided by the input is not affine")
        _check_broadcast(c, shape, where)
        mods = [ConstantOp(op, c, constant_first=first)]
    elif op == "BatchNormalization":
        scale, bias, mean, var = (consts[i] for i in node.input[1:5])
        k = (scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))).reshape(-1, *([1] * (len(shape) - 1)))
        t = bias.reshape(k.shape) - mean.reshape(k.shape) * k
        mods = [ConstantOp("Mul", k), ConstantOp("Add", t)]
    elif op == "Conv":
        mods = _conv(node, attrs, consts, shape, where)
    elif op in ("MaxPool", "AveragePool"):
        mods = [_pool(op, attrs, shape, where)]
    else:
        raise _unsupported(op, source)
    probe = nn.Sequential(*mods).double().eval()
    with torch.no_grad():
        out = probe(torch.zeros((1, *shape), dtype=torch.float64))
    return mods, tuple(int(s) for s in out.shape[1:])


def _check_broadcast(c: np.ndarray, shape: tuple[int, ...], where: str) -> None:
    full = (1, *shape)
    try:
        b = np.broadcast_shapes(c.shape, full)
    except ValueError:
        b = None
    if b != full:
        raise PhalanxError(f"{where}: constant of shape {list(c.shape)} does not broadcast onto {list(full)}")


def _linear(node: Any, attrs: dict[str, Any], consts: dict[str, np.ndarray], shape: tuple[int, ...],
            where: str) -> nn.Module:
    if node.op_type == "MatMul":
        if node.input[1] not in consts or node.input[0] in consts:
            raise PhalanxError(f"{where}: only input @ constant is supported")
        w = consts[node.input[1]]
        if w.ndim != 2 or w.shape[0] != shape[-1]:
            raise PhalanxError(f"{where}: weight of shape {list(w.shape)} does not match input {list(shape)}")
        lin = nn.Linear(w.shape[0], w.shape[1], bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(w.T))
        return lin
    if int(attrs.get("transA", 0)) or node.input[0] in consts or len(shape) != 1:
        raise PhalanxError(f"{where}: only Gemm(input, constant[, constant]) on flat inputs without transA")
    w = consts[node.input[1]]
    w = w if int(attrs.get("transB", 0)) else w.T
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if w.shape[1] != shape[0]:
        raise PhalanxError(f"{where}: weight of shape {list(w.shape)} does not match {shape[0]} inputs")
    has_c = len(node.input) > 2 and node.input[2]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bool(has_c))
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(alpha * w))
        if has_c:
            lin.bias.copy_(torch.as_tensor(np.array(np.broadcast_to(beta * consts[node.input[2]].reshape(-1), (w.shape[0],)))))
    return lin


def _conv(node: Any, attrs: dict[str, Any], consts: dict[str, np.ndarray], shape: tuple[int, ...],
          where: str) -> list[nn.Module]:
    w = consts.get(node.input[1])
    if w is None or w.ndim != 4 or len(shape) != 3:
        raise PhalanxError(f"{where}: only 2-D convolutions with constant weights on (C, H, W) inputs")
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise PhalanxError(f"{where}: auto_pad {attrs['auto_pad']} unsupported; accepted: explicit pads")
    pads = [int(v) for v in attrs.get("pads", [0, 0, 0, 0])]
    groups = int(attrs.get("group", 1))
    conv = nn.Conv2d(shape[0], w.shape[0], (w.shape[2], w.shape[3]), stride=tuple(attrs.get("strides", [1, 1])),
                     dilation=tuple(attrs.get("dilations", [1, 1])), groups=groups,
                     bias=len(node.input) > 2 and bool(node.input[2]))
    with torch.no_grad():
        conv.weight.copy_(torch.as_tensor(w))
        if conv.bias is not None:
            conv.bias.copy_(torch.as_tensor(consts[node.input[2]]))
    if pads[0] == pads[2] and pads[1] == pads[3]:
        conv.padding = (pads[0], pads[1])
        return [conv]
    return [nn.ZeroPad2d((pads[1], pads[3], pads[0], pads[2])), conv]


def _pool(op: str, attrs: dict[str, Any], shape: tuple[int, ...], where: str) -> nn.Module:
    k = tuple(int(v) for v in attrs["kernel_shape"])
    pads = [int(v) for v in attrs.get("pads", [0] * 2 * len(k))]
    if len(k) != 2 or len(shape) != 3 or pads[:2] != pads[2:] or int(attrs.get("ceil_mode", 0)):
        raise PhalanxError(f"{where}: only 2-D pooling on (C, H, W) with symmetric pads and ceil_mode 0")
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise PhalanxError(f"{where}: auto_pad {attrs['auto_pad']} unsupported; accepted: explicit pads")
    st = [int(v) for v in attrs.get("strides", [1, 1])]
    strides = (st[0], st[1])
    if op == "MaxPool":
        if int(attrs.get("storage_order", 0)):
            raise PhalanxError(f"{where}: MaxPool storage_order 1 unsupported")
        return nn.MaxPool2d((k[0], k[1]), strides, (pads[0], pads[1]), dilation=tuple(attrs.get("dilations", [1, 1])))
    return nn.AvgPool2d((k[0], k[1]), strides, (pads[0], pads[1]), count_include_pad=bool(attrs.get("count_include_pad", 0)))


__all__ = ["SUPPORTED_OPS", "ConstantOp", "OnnxNetwork", "Reshape", "import_model", "load_onnx"]
