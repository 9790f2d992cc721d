"""Falsification (APGD on the property margin inside the box): its witnesses re-check, it never
answers on UNSAT queries, and it finds the counterexamples the exact MILP proves to exist."""

from __future__ import annotations

import numpy as np
import torch
from verif_nets import ARCHS

from phalanx.verification import create_verifier, make_query
from phalanx.verification.falsify import FalsifyConfig, falsify
from phalanx.verification.query import Verdict, member_labels, property_query


def _queries() -> list:
    out = []
    rng = np.random.default_rng(0)
    for seed in range(4):
        models = [ARCHS["linear-relu"](seed), ARCHS["leaky"](seed + 10)]
        x0 = rng.uniform(0, 1, 72)
        label = int(np.argmax(member_labels(models[:1], x0, (2, 6, 6))[0]))
        for eps in (0.02, 0.08, 0.2):
            out.append(make_query(models, x0, eps, label))                       # both members err
            out.append(make_query(models, x0, eps, label, kind="mean-logits"))   # the ensemble errs
    return out


def test_falsify_agrees_with_the_milp() -> None:
    milp = create_verifier("milp")
    found = sat = 0
    for q in _queries():
        truth = milp.verify(q, time_limit_s=60).verdict
        out = falsify(q, FalsifyConfig())
        if out.witness is not None:
            assert truth is not Verdict.UNSAT  # a re-checked witness: never on an UNSAT query
            lo, hi = q.box()
            assert np.all(out.witness >= lo) and np.all(out.witness <= hi)
            logits = member_labels(q.models, out.witness, (2, 6, 6))
            if q.kind.value == "mean-logits":
                assert int(np.argmax(logits.mean(0))) != q.label
            else:
                assert all(int(np.argmax(z)) != q.label for z in logits)
        sat += truth is Verdict.SAT
        found += out.witness is not None
    assert sat >= 6, "the fixture should contain SAT queries"
    assert found >= 0.9 * sat


def test_property_query_with_constant_terms() -> None:
    """Y_0 >= 2.5 on a box of the hand-built network Y = W2 relu(W1 x) (Y_0 = 6 x_0 near (1, -5)):
    found where the box allows x_0 >= 2.5/6 + margin, absent where it does not."""
    from verif_nets import toy_network

    from phalanx.verification.ir import to_ir
    from phalanx.verification.query import ConstantNet

    net = toy_network().double()
    const = ConstantNet((2,))
    models, nets = [net, const], [to_ir(net, (2,)), const.ir()]
    for hi0, expect in ((0.45, True), (0.41, False)):
        q = property_query(models, nets, [0.3, -5.1], [hi0, -4.9], [[np.array([1.0, 0.0, -2.5])]])
        out = falsify(q)
        assert (out.witness is not None) is expect
        if expect:
            with torch.no_grad():
                y = net(torch.as_tensor(out.witness)[None])[0]
            assert float(y[0]) >= 2.5
