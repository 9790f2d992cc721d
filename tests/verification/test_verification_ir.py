"""Encodings equal the PyTorch forward pass (property tests), for every supported layer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from verif_nets import ARCHS, _net, toy_network

from phalanx.errors import PhalanxError
from phalanx.verification import interval_bounds, linear_bounds, to_ir
from phalanx.verification.ir import Affine, MaxPool, Relu, Residual
from phalanx.verification.milp import MilpModel, encode_network


@pytest.mark.parametrize("arch", sorted(ARCHS))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_ir_equals_pytorch_forward(arch: str, seed: int) -> None:
    model = ARCHS[arch](seed % 7)
    ir = to_ir(model)
    x = torch.rand(6, *model.in_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref = copy.deepcopy(model).double()(x).detach().numpy()
    assert np.allclose(ir.forward(x.reshape(6, -1).numpy()), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_milp_encoding_equals_forward(arch: str) -> None:
    model = ARCHS[arch](3)
    ir = to_ir(model)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.random(ir.in_dim)
        lo, hi = np.clip(x - 0.05, 0, 1), np.clip(x + 0.05, 0, 1)
        b = linear_bounds(ir, lo, hi)
        m = MilpModel()
        iv = m.add_vars(x, x)  # the input fixed to the point: the encoding must reproduce the logits
        ov = encode_network(m, ir, iv, b)
        out = m.solve(30)
        assert out.status == "optimal" and out.values is not None
        assert np.allclose(out.values[ov], ir.forward(x), atol=1e-5)


def test_structure_is_folded_and_merged() -> None:
    ir = to_ir(ARCHS["conv-bn-maxpool"](0))
    kinds = [type(op) for op in ir.ops]
    assert kinds == [Affine, Relu, MaxPool, Affine]  # normalize+conv+bn folded; pool+flatten+linear merged
    res = to_ir(ARCHS["residual"](0))
    blocks = [op for op in res.ops if isinstance(op, Residual)]
    assert len(blocks) == 2 and blocks[0].shortcut == () and len(blocks[1].shortcut) == 1


@pytest.mark.parametrize("layer", [nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.LeakyReLU(-0.5)])
def test_unsupported_layer_is_named(layer: nn.Module) -> None:
    model = _net([nn.Flatten(), nn.Linear(72, 5), layer, nn.Linear(5, 4)], (2, 6, 6), 0)
    with pytest.raises(PhalanxError, match=type(layer).__name__):
        to_ir(model)


def test_toy_network_of_figure_1() -> None:
    ir = to_ir(toy_network(), in_shape=(2,))
    x = np.array([1.0, -5.0])
    assert ir.forward(x).tolist() == [6.0, 3.0]
    for fn in (interval_bounds, linear_bounds):
        b = fn(ir, x, x)  # a zero-width box: bounds are exact
        assert b.pre[0][0].tolist() == [-8.0, 1.0] and b.pre[0][1].tolist() == [-8.0, 1.0]
        assert b.output[0].tolist() == [6.0, 3.0] and b.output[1].tolist() == [6.0, 3.0]
    m = MilpModel()
    iv = m.add_vars(np.array([-10.0, -10.0]), np.array([10.0, 10.0]))
    m.add_row([iv[0]], [1.0], 1.0, 1.0)
    m.add_row([iv[1]], [1.0], -5.0, -5.0)
    ov = encode_network(m, ir, iv, linear_bounds(ir, np.array([-10.0, -10.0]), np.array([10.0, 10.0])))
    out = m.solve(10)
    assert out.values is not None and np.allclose(out.values[ov], [6.0, 3.0])
