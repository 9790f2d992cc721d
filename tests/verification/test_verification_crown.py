"""Back-substituted bounds contain sampled activations, are never looser than forward bounds, and
branch and bound agrees with the MILP; joint bounds refute what per-member bounds cannot."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from verif_nets import ARCHS

from phalanx.verification import Verdict, ball, create_verifier, linear_bounds, make_query, to_ir
from phalanx.verification.bounds import NetworkBounds
from phalanx.verification.crown import crown_bounds, graph
from phalanx.verification.ir import LeakyRelu, MaxPool, NetworkIR, Relu, Residual, run_ops
from phalanx.verification.query import recheck

BoundsFn = Callable[[NetworkIR, np.ndarray, np.ndarray], NetworkBounds]


def _net(arch: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the layers are built before the helper seeds
    return ARCHS[arch](seed)


def _activations(ops: tuple, h: np.ndarray, out: list) -> np.ndarray:
    """Inputs of every nonlinear op (depth-first, as NetworkBounds.pre) and the output."""
    for op in ops:
        if isinstance(op, Residual):
            h = _activations(op.branch, h, out) + _activations(op.shortcut, h, out)
            continue
        if isinstance(op, (Relu, LeakyRelu, MaxPool)):
            out.append(h.copy())
        h = run_ops((op,), h)
    return h


def box_samples(ir: NetworkIR, lo: np.ndarray, hi: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points of the box: the vertices that maximise / minimise each output's linearisation
    at the centre (finite differences), random vertices, and uniform interior points."""
    mid = (lo + hi) / 2
    f0 = ir.forward(mid)
    step = 1e-6
    jac = np.stack([(ir.forward(mid + step * e) - f0) / step for e in np.eye(ir.in_dim)], axis=1)  # (out, in)
    grad_vertices = np.concatenate([np.where(jac > 0, hi, lo), np.where(jac > 0, lo, hi)])
    k = (n - grad_vertices.shape[0]) // 2
    vertices = np.where(rng.random((k, ir.in_dim)) < 0.5, lo, hi)
    interior = lo + (hi - lo) * rng.random((n - grad_vertices.shape[0] - k, ir.in_dim))
    return np.concatenate([grad_vertices, vertices, interior])


def assert_contains(bounds: NetworkBounds, ir: NetworkIR, samples: np.ndarray) -> None:
    """Every sampled pre-activation and output lies inside the bounds (no tolerance: the bounds
    are widened for rounding themselves)."""
    pres: list[np.ndarray] = []
    out = _activations(ir.ops, samples, pres)
    assert len(pres) == len(bounds.pre)
    for k, ((lo, hi), p) in enumerate(zip(bounds.pre, pres, strict=True)):
        assert np.all(p >= lo) and np.all(p <= hi), f"pre-activation bounds of nonlinear op {k} miss samples"
    assert np.all(out >= bounds.output[0]) and np.all(out <= bounds.output[1]), "output bounds miss samples"


def _crown(ir: NetworkIR, lo: np.ndarray, hi: np.ndarray) -> NetworkBounds:
    return crown_bounds(ir, lo, hi)


def _alpha(ir: NetworkIR, lo: np.ndarray, hi: np.ndarray) -> NetworkBounds:
    return crown_bounds(ir, lo, hi, alpha_steps=15)


def _backward_only(ir: NetworkIR, lo: np.ndarray, hi: np.ndarray) -> NetworkBounds:
    return crown_bounds(ir, lo, hi, forward=False)


def shrunk(fn: BoundsFn, frac: float = 0.05) -> BoundsFn:
    """A deliberately unsound test double: ``fn``'s output bounds moved inwards by ``frac`` of their width."""
    def inner(ir: NetworkIR, lo: np.ndarray, hi: np.ndarray) -> NetworkBounds:
        b = fn(ir, lo, hi)
        a, c = b.output
        w = frac * (c - a)
        return NetworkBounds(b.pre, (a + w, c - w))
    return inner


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", [_crown, _alpha, _backward_only], ids=["crown", "alpha-crown", "backward-only"])
def test_backward_bounds_contain_10000_samples(arch: str, method: BoundsFn) -> None:
    rng = np.random.default_rng(7)
    for seed, eps in ((0, 0.01), (1, 0.05), (2, 0.2)):
        ir = to_ir(_net(arch, seed))
        lo, hi = ball(rng.random(ir.in_dim), eps)
        assert_contains(method(ir, lo, hi), ir, box_samples(ir, lo, hi, 10_000, rng))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_the_containment_check_catches_an_unsound_bound(arch: str) -> None:
    rng = np.random.default_rng(3)
    ir = to_ir(_net(arch, 0))
    lo, hi = ball(rng.random(ir.in_dim), 0.002)
    samples = box_samples(ir, lo, hi, 10_000, rng)
    assert_contains(_crown(ir, lo, hi), ir, samples)  # the sound one passes ...
    with pytest.raises(AssertionError, match="output bounds miss samples"):
        assert_contains(shrunk(_crown)(ir, lo, hi), ir, samples)  # ... the shrunk one is caught


def _no_looser(tight: NetworkBounds, loose: NetworkBounds, tol: float = 1e-9) -> None:
    for (a, b), (c, d) in zip((*tight.pre, tight.output), (*loose.pre, loose.output), strict=True):
        assert np.all(a >= c - tol) and np.all(b <= d + tol)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_backward_bounds_never_looser_than_forward(arch: str) -> None:
    rng = np.random.default_rng(11)
    spec = np.zeros((3, 4))
    for r, k in enumerate([1, 2, 3]):
        spec[r, k], spec[r, 0] = 1.0, -1.0
    for seed, eps in ((0, 0.01), (1, 0.05), (2, 0.2)):
        ir = to_ir(_net(arch, seed))
        lo, hi = ball(rng.random(ir.in_dim), eps)
        fwd, crown, alpha = linear_bounds(ir, lo, hi), crown_bounds(ir, lo, hi), _alpha(ir, lo, hi)
        _no_looser(crown, fwd)
        _no_looser(alpha, crown)
        fs, cs = linear_bounds(ir, lo, hi, spec=spec), crown_bounds(ir, lo, hi, spec=spec)
        assert np.all(cs.output[1] <= fs.output[1] + 1e-9) and np.all(cs.output[0] >= fs.output[0] - 1e-9)
        if arch in ("linear-relu", "leaky", "conv-avgpool"):  # no max-pool / residual: backward alone suffices
            _no_looser(_backward_only(ir, lo, hi), fwd)


def test_convolutions_are_applied_as_convolutions() -> None:
    ir = to_ir(_net("conv-bn-maxpool", 0))
    g = graph(ir, "cpu")
    first = g.nodes[1]
    assert first.kind == "affine" and "W" not in g.tensors[1]  # transposed convolutions, no dense matrix
    rng = np.random.default_rng(0)
    lo, hi = ball(rng.random(ir.in_dim), 0.05)
    a = crown_bounds(ir, lo, hi, forward=False)
    # the same network with the structure dropped (dense W^T) gives the same bounds
    from phalanx.verification.ir import Affine

    dense = NetworkIR(tuple(Affine(o.weight, o.bias) if isinstance(o, Affine) else o for o in ir.ops),
                      ir.in_dim, ir.out_dim, ir.in_shape)
    b = crown_bounds(dense, lo, hi, forward=False)
    for (p, q), (r, s) in zip((*a.pre, a.output), (*b.pre, b.output), strict=True):
        np.testing.assert_allclose(p, r, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(q, s, rtol=1e-9, atol=1e-9)


def queries_around(models: list[nn.Module], seed: int, radii: tuple[float, ...]) -> list:
    """Queries on ``models[0]`` alone and on the pair, at a random point labelled by ``models[0]``."""
    irs = [to_ir(m) for m in models]
    x = np.random.default_rng(seed).random(irs[0].in_dim)
    label = int(np.argmax(irs[0].forward(x)))
    return [make_query([models[i] for i in members], x, eps, label, nets=[irs[i] for i in members])
            for eps in radii for members in ([0], [0, 1])]


def assert_agrees_with_milp(bab: object, queries: list) -> list:
    """Both decide every query, with the same verdict (each SAT witness re-checked); both
    verdicts occur. Returns the branch-and-bound results."""
    milp = create_verifier("milp")
    out = []
    for q in queries:
        m, b = milp.verify(q, time_limit_s=60), bab.verify(q, time_limit_s=60)  # type: ignore[attr-defined]
        assert m.verdict.decided and b.verdict.decided, (m.message, b.message)
        assert m.verdict is b.verdict, (q.describe(), m.message, b.message)
        if b.verdict is Verdict.SAT:
            assert recheck(q, b.counterexample)[0] is not None
        out.append(b)
    assert {r.verdict for r in out} == {Verdict.SAT, Verdict.UNSAT}
    return out


@pytest.mark.parametrize("options", [{}, {"leaf_unstable": 0, "alpha_steps": 5}], ids=["default", "split-to-leaves"])
def test_branch_and_bound_agrees_with_milp(options: dict) -> None:
    queries = [q for arch in ("linear-relu", "leaky", "conv-avgpool") for seed in range(3)
               for q in queries_around([_net(arch, seed), _net(arch, seed + 10)], seed, (0.02, 0.06, 0.15))]
    assert_agrees_with_milp(create_verifier("bab", **options), queries)


def _line_member(offset: float, sign: float) -> nn.Sequential:
    """Logits ``[0, sign * (x - offset)]`` of a scalar input."""
    net = nn.Sequential(nn.Linear(1, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[0.0], [sign]]))
        net[0].bias.copy_(torch.tensor([0.0, -sign * offset]))
    return net.eval()


def test_joint_bounds_refute_what_member_bounds_cannot() -> None:
    # member A errs (predicts 1 instead of 0) only for x >= 0.6, member B only for x <= 0.4: each
    # can err in the ball [0, 1], never both on one input
    ms = [_line_member(0.6, 1.0), _line_member(0.4, -1.0)]
    q = make_query(ms, np.array([0.5]), 0.5, 0, nets=[to_ir(m, (1,)) for m in ms])
    assert create_verifier("bounds").verify(q).verdict is Verdict.TIMEOUT  # per-member bounds: undecided
    assert create_verifier("crown", joint=False).verify(q).verdict is Verdict.TIMEOUT
    r = create_verifier("crown").verify(q)
    assert r.verdict is Verdict.UNSAT and "one input" in r.message
    assert create_verifier("milp").verify(q, time_limit_s=30).verdict is Verdict.UNSAT
    # the same members can err together when the regions overlap: the joint bound must not refute it
    ms2 = [_line_member(0.45, 1.0), _line_member(0.55, -1.0)]
    q2 = make_query(ms2, np.array([0.5]), 0.5, 0, nets=[to_ir(m, (1,)) for m in ms2])
    assert create_verifier("crown").verify(q2).verdict is Verdict.TIMEOUT
    r2 = create_verifier("bab").verify(q2, time_limit_s=30)
    assert r2.verdict is Verdict.SAT and 0.45 <= float(r2.counterexample[0]) <= 0.55


def test_mean_logits_joint_bounds_are_sound() -> None:
    ms = [_net("linear-relu", 0), _net("linear-relu", 1), _net("linear-relu", 2)]
    irs = [to_ir(m) for m in ms]
    rng = np.random.default_rng(5)
    x = rng.random(irs[0].in_dim)
    label = int(np.argmax(np.mean([n.forward(x) for n in irs], axis=0)))
    for eps in (0.01, 0.1, 0.3):
        q = make_query(ms, x, eps, label, kind="mean-logits", nets=irs)
        m = create_verifier("milp").verify(q, time_limit_s=60)
        c = create_verifier("crown").verify(q)
        b = create_verifier("bab").verify(q, time_limit_s=60)
        assert not (c.verdict is Verdict.UNSAT and m.verdict is Verdict.SAT)
        assert b.verdict is m.verdict
