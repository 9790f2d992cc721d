"""Regression tests from the soundness review of the VNN-LIB / portfolio path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from phalanx.verification.ir import to_ir
from phalanx.verification.portfolio import Portfolio
from phalanx.verification.query import ConstantNet, Verdict, property_query


def _class0_net() -> nn.Module:
    """Y = (x_0 + 5, 0): class 0 at every input of [0, 1]^2 (each member 'robust' for label 0)."""
    net = nn.Linear(2, 2).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        net.bias.copy_(torch.tensor([5.0, 0.0]))
    return net


@pytest.mark.parametrize("second", ["network", "constant"])
def test_member_stage_never_decides_a_property_query(second: str) -> None:
    """A VNN-LIB property over two networks (Y_A0 - Y_B0 >= 0, or Y_0 - 5 >= 0 with the constant
    network; both SAT at x_0 = 1) says nothing about the members' argmax robustness: the members
    stage must not turn their robustness for the midpoint's label into UNSAT (nor crash)."""
    net = _class0_net()
    other: nn.Module = _class0_net() if second == "network" else ConstantNet((2,))
    models = [net, other]
    nets = [to_ir(net, (2,)), to_ir(other, (2,)) if second == "network" else other.ir()]  # type: ignore[operator]
    c = np.array([1.0, 0.0, -1.0, 0.0]) if second == "network" else np.array([1.0, 0.0, -5.0])
    q = property_query(models, nets, [0.0, 0.0], [1.0, 1.0], [[c]])
    alone = Portfolio(stages=("members",)).verify(q, time_limit_s=20.0)
    assert alone.verdict is not Verdict.UNSAT, alone.message
    r = Portfolio(stages=("members", "complete")).verify(q, time_limit_s=20.0)
    assert r.verdict is Verdict.SAT, r.message
    assert r.counterexample is not None
    y = np.concatenate([m.double()(torch.as_tensor(r.counterexample)[None])[0].detach().numpy() for m in models])
    assert float(c @ y) >= 0.0


def test_export_refuses_a_property_query() -> None:
    """The exporter writes argmax properties at the query's label; a property (VNN-LIB) query
    has no label, so exporting it would silently write another property."""
    from phalanx.errors import PhalanxError
    from phalanx.verification.export import vnnlib2_text, vnnlib_text

    a, b = _class0_net(), _class0_net()
    q = property_query([a, b], [to_ir(a, (2,)), to_ir(b, (2,))], [0.0, 0.0], [1.0, 1.0],
                       [[np.array([1.0, 0.0, -1.0, 0.0])]])
    for fn in (vnnlib_text, vnnlib2_text):
        with pytest.raises(PhalanxError, match="property"):
            fn(q)
