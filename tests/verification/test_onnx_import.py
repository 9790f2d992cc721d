"""ONNX import: each supported operator on small random graphs agrees with onnxruntime, in
the PyTorch module and in the exact IR; unsupported graphs name what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from phalanx.errors import PhalanxError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from phalanx.verification.onnx_import import import_model  # noqa: E402

RNG = np.random.default_rng(0)


def _w(name: str, *shape: int, scale: float = 0.5) -> object:
    return numpy_helper.from_array((RNG.normal(size=shape) * scale).astype(np.float32), name)


def _i64(name: str, values: list[int]) -> object:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _model(nodes: list, inits: list, in_shape: list, out: str = "Y") -> object:
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("X", TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _mlp() -> object:
    nodes = [helper.make_node("Flatten", ["X"], ["f"], axis=1),
             helper.make_node("Sub", ["f", "mu"], ["s"]),
             helper.make_node("Div", ["s", "sd"], ["d"]),
             helper.make_node("Gemm", ["d", "W1", "b1"], ["h"], transB=1, alpha=0.7, beta=1.3),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["m"]),
             helper.make_node("Add", ["m", "b2"], ["a"]),
             helper.make_node("LeakyRelu", ["a"], ["l"], alpha=0.1),
             helper.make_node("Mul", ["l", "k"], ["p"]),
             helper.make_node("Gemm", ["p", "W3"], ["Y"])]
    inits = [_w("mu", 12), numpy_helper.from_array(np.full(12, 0.6, np.float32), "sd"), _w("W1", 9, 12),
             _w("b1", 9), _w("W2", 9, 7), _w("b2", 7), _w("k", 7), _w("W3", 7, 3)]
    return _model(nodes, inits, [1, 3, 4])


def _cnn(asym: bool) -> object:
    pads = [0, 1, 1, 0] if asym else [1, 1, 1, 1]
    nodes = [helper.make_node("Conv", ["X", "C1", "cb1"], ["c"], pads=pads, strides=[1, 1], kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "g", "bb", "mean", "var"], ["bn"], epsilon=1e-3),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["mp", "C2"], ["c2"], group=2, kernel_shape=[1, 1]),
             helper.make_node("AveragePool", ["c2"], ["ap"], kernel_shape=[2, 2], strides=[1, 1]),
             # the Shape -> Gather -> Unsqueeze -> Concat -> Reshape chain torch.onnx writes for x.view(B, -1)
             helper.make_node("Shape", ["ap"], ["sh"]),
             helper.make_node("Gather", ["sh", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "axes"], ["bu"]),
             helper.make_node("Concat", ["bu", "minus1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["ap", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "W", "wb"], ["Y"], transB=1)]
    n_flat = 4 * 1 * 1 if asym else 4 * 2 * 2
    var = numpy_helper.from_array(RNG.uniform(0.5, 2.0, 4).astype(np.float32), "var")
    inits = [_w("C1", 4, 2, 3, 3), _w("cb1", 4), _w("g", 4), _w("bb", 4), _w("mean", 4), var, _w("C2", 4, 2, 1, 1),
             numpy_helper.from_array(np.asarray(0, dtype=np.int64), "zero"), _i64("axes", [0]),
             _i64("minus1", [-1]), _w("W", 3, n_flat), _w("wb", 3)]
    return _model(nodes, inits, [1, 2, 5 if asym else 6, 5 if asym else 6])


@pytest.mark.parametrize("build", [_mlp, lambda: _cnn(False), lambda: _cnn(True)], ids=["mlp", "cnn", "cnn-asym-pads"])
def test_import_matches_onnxruntime(build) -> None:  # type: ignore[no-untyped-def]
    model = build()
    net = import_model(model)
    x = RNG.uniform(-1, 1, size=(20, net.in_dim))
    sess = ort.InferenceSession(model.SerializeToString())
    want = np.stack([sess.run(None, {"X": r.astype(np.float32).reshape(net.input_shape)})[0].reshape(-1) for r in x])
    scale = 1 + np.abs(want).max()
    np.testing.assert_allclose(net.forward(x), want, atol=1e-5 * scale)
    np.testing.assert_allclose(net.forward_ir(x), net.forward(x), atol=1e-10 * scale)
    np.testing.assert_allclose(net.run_onnxruntime(x), want, atol=1e-6 * scale)


def test_unsupported_operator_is_named() -> None:
    model = _model([helper.make_node("Gemm", ["X", "W"], ["h"]), helper.make_node("Sigmoid", ["h"], ["Y"])],
                   [_w("W", 4, 3)], [1, 4])
    with pytest.raises(PhalanxError, match=r"ONNX operator Sigmoid is not supported.*supported: Gemm"):
        import_model(model, "net.onnx")


def test_residual_add_of_two_computed_tensors_is_refused() -> None:
    model = _model([helper.make_node("Gemm", ["X", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                    helper.make_node("Add", ["r", "h"], ["Y"])], [_w("W", 4, 4)], [1, 4])
    with pytest.raises(PhalanxError, match=r"\(Add\) has a second computed input"):
        import_model(model, "net.onnx")


def test_bad_file_is_one_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from phalanx.verification.onnx_import import load_onnx

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all \x00\xff")
    with pytest.raises(PhalanxError, match="cannot read ONNX file"):
        load_onnx(bad)
    with pytest.raises(PhalanxError, match="not found"):
        load_onnx(tmp_path / "missing.onnx")


def test_check_import_refuses_a_network_that_onnxruntime_computes_differently() -> None:
    """The load-time guard behind ``verify vnnlib``: the IR must agree with onnxruntime on random
    inputs; an import whose IR computes another function (here: the model bytes of a different
    network under the same IR) is refused instead of verified."""
    import dataclasses

    from phalanx.verification.interchange import IMPORT_TOL, check_import

    model = _mlp()
    net = import_model(model, "mlp", model.SerializeToString())
    assert check_import(net) <= IMPORT_TOL
    other = _mlp()  # fresh random weights: same shapes, another function
    misread = dataclasses.replace(net, model_bytes=other.SerializeToString())
    with pytest.raises(PhalanxError, match="differs from onnxruntime"):
        check_import(misread)
