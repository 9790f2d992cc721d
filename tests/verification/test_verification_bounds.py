"""Bounds are sound (contain sampled pre-activations and outputs) and linear <= interval width."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from verif_nets import ARCHS

from phalanx.verification import ball, interval_bounds, linear_bounds, to_ir
from phalanx.verification.ir import Affine, LeakyRelu, MaxPool, Relu, Residual, run_ops


def _pre_activations(ops: tuple, h: np.ndarray, out: list) -> np.ndarray:
    """Inputs of every nonlinear op, in the depth-first order of NetworkBounds.pre."""
    for op in ops:
        if isinstance(op, Residual):
            a = _pre_activations(op.branch, h, out)
            b = _pre_activations(op.shortcut, h, out)
            h = a + b
            continue
        if isinstance(op, (Relu, LeakyRelu, MaxPool)):
            out.append(h.copy())
        h = run_ops((op,), h)
    return h


@pytest.mark.parametrize("arch", sorted(ARCHS))
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.0, 0.01, 0.05, 0.2]))
def test_bounds_contain_samples(arch: str, seed: int, eps: float) -> None:
    ir = to_ir(ARCHS[arch](seed % 5))
    rng = np.random.default_rng(seed)
    lo, hi = ball(rng.random(ir.in_dim), eps)
    samples = np.concatenate([lo + (hi - lo) * rng.random((200, ir.in_dim)), lo[None], hi[None]])
    pres: list = []
    out = _pre_activations(ir.ops, samples, pres)
    ib, lb = interval_bounds(ir, lo, hi), linear_bounds(ir, lo, hi)
    for nb in (ib, lb):
        assert np.all(out >= nb.output[0] - 1e-9) and np.all(out <= nb.output[1] + 1e-9)
        for (pl, pu), p in zip(nb.pre, pres, strict=True):
            assert np.all(p >= pl - 1e-9) and np.all(p <= pu + 1e-9)
    # the linear relaxation is never looser than interval arithmetic
    assert np.all(lb.output[0] >= ib.output[0] - 1e-9) and np.all(lb.output[1] <= ib.output[1] + 1e-9)
    for (a, b), (c, d) in zip(lb.pre, ib.pre, strict=True):
        assert np.all(a >= c - 1e-9) and np.all(b <= d + 1e-9)


def test_spec_bounds_contain_margins_and_are_tighter() -> None:
    ir = to_ir(ARCHS["linear-relu"](1))
    rng = np.random.default_rng(0)
    lo, hi = ball(rng.random(ir.in_dim), 0.05)
    spec = np.zeros((3, 4))
    for r, k in enumerate([1, 2, 3]):
        spec[r, k], spec[r, 0] = 1.0, -1.0
    sb = linear_bounds(ir, lo, hi, spec=spec)
    plain = linear_bounds(ir, lo, hi)
    y = ir.forward(lo + (hi - lo) * rng.random((300, ir.in_dim)))
    m = y @ spec.T
    assert np.all(m <= sb.output[1] + 1e-9) and np.all(m >= sb.output[0] - 1e-9)
    naive_up = plain.output[1][1:] - plain.output[0][0]
    assert np.all(sb.output[1] <= naive_up + 1e-9)


def test_stable_neurons_are_counted() -> None:
    ir = to_ir(ARCHS["linear-relu"](0))
    x = np.random.default_rng(1).random(ir.in_dim)
    assert linear_bounds(ir, x, x).num_unstable == 0  # a point: every neuron is stable
    assert isinstance(ir.ops[0], Affine)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_composed_leading_affine_ops_equal_identity_forms(arch: str) -> None:
    """The linear pass composes the leading affine ops (normalisation, first layer) instead of
    pushing identity forms through them: the same bounds as the walk from identity forms."""
    from phalanx.verification.bounds import _State, _Walker

    ir = to_ir(ARCHS[arch](1))
    rng = np.random.default_rng(3)
    lo, hi = ball(rng.random(ir.in_dim), 0.05)
    spec = rng.normal(size=(3, ir.out_dim))
    for c in (None, spec):
        got = linear_bounds(ir, lo, hi, spec=c)
        w = _Walker(lo, hi, True)
        n = ir.in_dim
        s = _State(lo.copy(), hi.copy(), np.eye(n), np.zeros(n), np.eye(n), np.zeros(n))
        ops = ir.ops if c is None else (*ir.ops[:-1], Affine(c @ ir.ops[-1].weight, c @ ir.ops[-1].bias))
        ref = w.run(ops, s)
        np.testing.assert_allclose(got.output[0], ref.lo, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.output[1], ref.hi, rtol=1e-12, atol=1e-12)
        for (a, b), (p, q) in zip(got.pre, w.pre, strict=True):
            np.testing.assert_allclose(a, p, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(b, q, rtol=1e-12, atol=1e-12)


def test_first_affine_op_bounds_are_its_interval_arithmetic() -> None:
    """With one leading affine op, the linear pass's first pre-activation bounds are exactly that
    op's interval arithmetic on the box (its own form, concretized: no second pass needed), and
    the output bounds still contain sampled outputs."""
    from phalanx.verification.ir import NetworkIR

    rng = np.random.default_rng(5)
    w1, b1, w2, b2 = rng.normal(size=(7, 5)), rng.normal(size=7), rng.normal(size=(3, 7)), rng.normal(size=3)
    ir = NetworkIR((Affine(w1, b1), Relu(), Affine(w2, b2)), 5, 3, (5,))
    lo, hi = ball(rng.random(5), 0.1)
    got = linear_bounds(ir, lo, hi)
    wp, wn = np.maximum(w1, 0.0), np.minimum(w1, 0.0)
    np.testing.assert_array_equal(got.pre[0][0], wp @ lo + wn @ hi + b1)
    np.testing.assert_array_equal(got.pre[0][1], wp @ hi + wn @ lo + b1)
    ys = ir.forward(lo + (hi - lo) * rng.random((500, 5)))
    assert np.all(ys >= got.output[0] - 1e-9) and np.all(ys <= got.output[1] + 1e-9)
