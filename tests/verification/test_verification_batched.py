"""Batched branch and bound, alpha-CROWN intermediate bounds and MILP refinement (batched.py, refine.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from test_verification_crown import assert_agrees_with_milp, assert_contains, box_samples, queries_around
from torch import nn

from phalanx.verification import Verdict, create_verifier, make_query, to_ir
from phalanx.verification import batched as bt
from phalanx.verification.bab import root_bounds
from phalanx.verification.bounds import NetworkBounds
from phalanx.verification.ir import NetworkIR
from phalanx.verification.query import recheck
from phalanx.verification.refine import dense_layers, refine_bounds


def deep_mlp(seed: int, width: int = 10, depth: int = 3, leaky: float = 0.0, gain: float = 3.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    d = 16
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.LeakyReLU(leaky) if leaky else nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, 4))
    net = nn.Sequential(*layers).double().eval()
    with torch.no_grad():  # larger weights than PyTorch's default: outputs that vary over the box
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(gain)
    net.in_shape = [16]  # type: ignore[assignment]  # what to_ir reads
    return net


def _as_bounds(pre: list[tuple[torch.Tensor, torch.Tensor]], ir: NetworkIR) -> NetworkBounds:
    big = np.full(ir.out_dim, np.inf)
    return NetworkBounds(tuple((a.numpy(), b.numpy()) for a, b in pre), (-big, big))


def _root(net: nn.Module, eps: float, seed: int):  # type: ignore[no-untyped-def]
    ir = to_ir(net)
    x = np.random.default_rng(seed).random(ir.in_dim)
    label = int(np.argmax(ir.forward(x)))
    q = make_query([net], x, eps, label, nets=[ir])
    st, root = root_bounds(q, alpha_steps=0, record=True)
    return ir, q, st, root


def test_dense_layers_reads_a_dense_chain() -> None:
    ir = to_ir(deep_mlp(0))
    _, _, st, _ = _root(deep_mlp(0), 0.05, 0)
    layers = dense_layers(st.graphs[0])
    assert layers is not None and len(layers) == 4
    np.testing.assert_allclose(layers[0][0] @ np.ones(16) + layers[0][1], ir.ops[0].weight @ np.ones(16) + ir.ops[0].bias)


@pytest.mark.parametrize("leaky", [0.0, 0.1], ids=["relu", "leaky"])
def test_intermediate_optimisation_and_refinement_are_sound_and_tighter(leaky: float) -> None:
    """alpha-CROWN on the intermediate layers, then both refinements (prefix MILPs, prefix
    branch and bound): sampled pre-activations stay inside, nothing gets looser, each method
    tightens something, and the search's bounds never pass the exact MILP optimum of the prefix."""
    rng = np.random.default_rng(0)
    tighter_alpha = tighter_milp = tighter_search = stable_search = 0
    for seed, eps in ((0, 0.1), (1, 0.2), (2, 0.3)):
        net = deep_mlp(seed, leaky=leaky)
        ir, q, st, root = _root(net, eps, seed)
        lo, hi = q.box()
        samples = box_samples(ir, lo, hi, 10_000, rng)
        pre = [(a.clone(), b.clone()) for a, b in root.pre[0].pre]
        opt = bt.optimise_intermediate(st, [pre], 30)[0]
        assert_contains(_as_bounds(opt, ir), ir, samples)
        ref, stats = refine_bounds(st.graphs[0], opt, st.x_lo, st.x_hi, deadline=time.perf_counter() + 30,
                                   per_neuron_s=2.0)
        assert_contains(_as_bounds(ref, ir), ir, samples)
        assert stats["milps"] > 0
        found, sstats = bt.refine_by_search(st, 0, opt, deadline=time.perf_counter() + 10, per_side_s=0.2, batch=16,
                                            passes=1)
        assert_contains(_as_bounds(found, ir), ir, samples)
        assert sstats["searches"] + sstats["witnessed"] > 0  # every unstable side searched or shown positive
        for (a0, b0), (a1, b1), (a2, b2), (a3, b3) in zip(pre, opt, ref, found, strict=True):
            assert torch.all(a1 >= a0) and torch.all(b1 <= b0)  # never looser
            assert torch.all(a2 >= a1) and torch.all(b2 <= b1)
            assert torch.all(a3 >= a1) and torch.all(b3 <= b1)
            # the MILPs were solved to optimality (tiny nets): the exact prefix extremes
            # within the MILP gap (HiGHS stops at a relative gap of 1e-4) of the optimum. Only the
            # neurons unstable before refinement get a MILP; a stable neuron's bound is a
            # back-substitution whose relaxation slopes depend on the layers' bounds, so either
            # refinement may end up tighter there
            slack = 2e-4 * (1 + torch.maximum(b2.abs(), a2.abs()))
            solved = (a1 < 0) & (b1 > 0)
            assert torch.all(b3[solved] >= (b2 - slack)[solved]), float((b2 - b3)[solved].max())
            assert torch.all(a3[solved] <= (a2 + slack)[solved]), float((a3 - a2)[solved].max())
            tighter_alpha += int(((b1 - a1) < (b0 - a0) - 1e-9).sum())
            tighter_milp += int(((b2 - a2) < (b1 - a1) - 1e-9).sum())
            tighter_search += int(((b3 - a3) < (b1 - a1) - 1e-9).sum())
            stable_search += int((((a3 >= 0) | (b3 <= 0)) & (a1 < 0) & (b1 > 0)).sum())
    assert tighter_alpha > 0 and tighter_milp > 0 and tighter_search > 0 and stable_search > 0


def test_side_witnesses_are_points_of_the_box_and_never_searched() -> None:
    """A positive witness is re-checked by a forward pass at a point of the box, so that side of the
    neuron is truly unstable: the exact prefix MILP never stabilises it, and the search skips it."""
    net = deep_mlp(2)
    ir, q, st, root = _root(net, 0.3, 2)
    lo, hi = q.box()
    pre = bt.optimise_intermediate(st, [[(a.clone(), b.clone()) for a, b in root.pre[0].pre]], 30)[0]
    ref, _ = refine_bounds(st.graphs[0], pre, st.x_lo, st.x_hi, deadline=time.perf_counter() + 30, per_neuron_s=2.0)
    positive = 0
    for k in bt.relus(st.graphs[0]):
        a, b = pre[k]
        uns = torch.nonzero((a < 0) & (b > 0))[:, 0]
        if uns.numel() == 0:
            continue
        values, points = bt.side_witnesses(bt.prefix_graph(st.graphs[0], k), st.x_lo, st.x_hi, uns)
        assert values.shape == (uns.numel(), 2) and points.shape == (2, uns.numel(), ir.in_dim)
        pts = points.reshape(-1, ir.in_dim).numpy()
        assert np.all(pts >= lo - 1e-12) and np.all(pts <= hi + 1e-12)
        for side, sign in ((0, 1.0), (1, -1.0)):
            for i, j in enumerate(uns.tolist()):
                with torch.no_grad():  # re-checked by the PyTorch network's own forward (act k: net[2 + 2k - 1])
                    z = float(net[: 2 + 2 * k](points[side, i].view(1, -1))[0, j])
                assert abs(sign * z - float(values[i, side])) <= 1e-9
                if values[i, side] > 0:  # the exact optimum of that side is positive too
                    positive += 1
                    assert (float(ref[k][1][j]) if sign > 0 else float(-ref[k][0][j])) >= float(values[i, side]) - 1e-6
    assert positive > 0
    _, stats = bt.refine_by_search(st, 0, pre, deadline=time.perf_counter() + 20, per_side_s=0.1, batch=16, passes=2)
    assert stats["witnessed"] > 0 and stats["searches"] > 0


def test_search_refinement_stops_when_the_caller_is_done() -> None:
    net = deep_mlp(1, depth=4)
    _, _, st, root = _root(net, 0.2, 1)
    pre = [(a.clone(), b.clone()) for a, b in root.pre[0].pre]
    asked: list[int] = []

    def done(bounds: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        asked.append(len(bounds))
        return len(asked) == 2  # done after the second refined layer

    _, full = bt.refine_by_search(st, 0, pre, deadline=time.perf_counter() + 30, per_side_s=0.1, batch=16, passes=1)
    _, early = bt.refine_by_search(st, 0, pre, deadline=time.perf_counter() + 30, per_side_s=0.1, batch=16,
                                   passes=3, done=done)
    assert early["done"] == 1 and early["passes"] == 1 and len(asked) == 2
    assert 0 < early["searches"] < full["searches"]


def test_the_sample_check_catches_a_refinement_that_overshoots() -> None:
    rng = np.random.default_rng(1)
    net = deep_mlp(3)
    ir, q, st, root = _root(net, 0.2, 3)
    lo, hi = q.box()
    samples = box_samples(ir, lo, hi, 10_000, rng)
    ref, _ = refine_bounds(st.graphs[0], [(a.clone(), b.clone()) for a, b in root.pre[0].pre], st.x_lo, st.x_hi,
                           deadline=time.perf_counter() + 30, per_neuron_s=2.0)
    assert_contains(_as_bounds(ref, ir), ir, samples)
    bad = [(a + 0.05 * (b - a), b) for a, b in ref]  # a test double: lower bounds moved inwards
    with pytest.raises(AssertionError, match="miss samples"):
        assert_contains(_as_bounds(bad, ir), ir, samples)


def _pre_activations(ir: NetworkIR, x: np.ndarray) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    h = x
    for op in ir.ops:
        if hasattr(op, "weight"):
            h = h @ op.weight.T + op.bias
        else:
            out.append(h.copy())
            slope = getattr(op, "slope", 0.0)
            h = np.where(h >= 0, h, slope * h)
    return out


def test_split_domains_keep_every_point_that_satisfies_their_splits() -> None:
    rng = np.random.default_rng(2)
    net = deep_mlp(4)
    ir, q, st, root = _root(net, 0.3, 4)
    pre = [[(a, b) for a, b in p.pre] for p in root.pre]
    pb = bt.make_problem(st, pre, root.upper)
    assert pb is not None
    alpha, beta, lam = bt.initial_params(pb, 1, torch.float32)
    b = bt.Batch([[torch.zeros(1, a.numel(), dtype=torch.int8) for a, _ in pre[0]]],
                 [[a[None].clone() for a, _ in pre[0]]], [[z[None].clone() for _, z in pre[0]]], alpha, beta, lam,
                 torch.zeros(1, pb.conj.shape[0], dtype=torch.float64), torch.zeros(1, dtype=torch.int64))
    for _ in range(3):  # split the first unstable neuron of each act, then tighten the layers above
        lo, hi = bt.domain_bounds(b, 0)
        for k in range(len(lo)):
            uns = torch.nonzero((lo[k][0] < 0) & (hi[k][0] > 0))[:, 0]
            if uns.numel():
                n = len(b)
                b = bt.split(b, torch.zeros(n, dtype=torch.int64), torch.full((n,), k), torch.full((n,), int(uns[0])))
                b = bt.tighten(pb, b, k)
                break
    lo_b, hi_b = q.box()
    x = box_samples(ir, lo_b, hi_b, 20_000, rng)
    acts = _pre_activations(ir, x)
    covered = 0
    for d in range(len(b)):
        inside = np.ones(len(x), dtype=bool)
        for k, z in enumerate(acts):
            s = b.signs[0][k][d].numpy()
            inside &= np.all((s == 0) | ((s > 0) & (z >= 0)) | ((s < 0) & (z <= 0)), axis=1)
        if not inside.any():
            continue
        lo, hi = bt.domain_bounds(b, 0)
        assert float(b.upper[d].max()) > -np.inf  # a domain with points is never refuted as empty
        for k, z in enumerate(acts):
            assert np.all(z[inside] >= lo[k][d].numpy()) and np.all(z[inside] <= hi[k][d].numpy())
        covered += int(inside.sum())
    assert covered == len(x)  # the children partition the box (up to points on a split's zero)


@pytest.mark.parametrize("options", [{"batch_leaf_unstable": 0, "refine_share": 0.0, "batch": 8, "alpha_steps": 5},
                                     {"batch_leaf_unstable": 0, "batch": 8, "batch_dtype": "float64", "alpha_steps": 5,
                                      "refine_share": 0.05}],
                         ids=["split-to-leaves", "refined-float64"])
def test_batched_branch_and_bound_agrees_with_milp(options: dict) -> None:
    """Single-member and mutual-error pair queries of deep MLPs at radii around their decision
    boundaries (where root bounds alone rarely decide)."""
    queries = [q for seed in range(4) for q in queries_around(
        [deep_mlp(seed, width=16, leaky=0.1 if seed == 2 else 0.0), deep_mlp(seed + 10, width=16)], seed,
        (0.07, 0.09))]
    results = assert_agrees_with_milp(create_verifier("bab", **options), queries)
    branched = sum(r.details.get("batched", 0) == 1 and r.details.get("domains", 0) > 1 for r in results)
    assert branched >= 3  # the batched search itself decided queries, not only the root bounds


def test_batched_search_never_claims_unsat_on_a_time_limit() -> None:
    net = deep_mlp(7, width=24)
    ir = to_ir(net)
    x = np.random.default_rng(7).random(ir.in_dim)
    q = make_query([net], x, 0.4, int(np.argmax(ir.forward(x))), nets=[ir])
    r = create_verifier("bab", batch=4, refine_share=0.0, bab_share=1.0).verify(q, time_limit_s=0.5)
    assert r.verdict in (Verdict.TIMEOUT, Verdict.SAT)
    if r.verdict is Verdict.SAT:
        assert recheck(q, r.counterexample)[0] is not None


@pytest.mark.parametrize("arch", ["linear-relu", "leaky", "conv-avgpool", "conv-bn-maxpool", "maxpool-padded"])
def test_batched_bounds_contain_sampled_outputs_and_split_children_stay_sound(arch: str) -> None:
    """The batched backward pass (every supported chain op, max-pool included) bounds every
    sampled disjunct value, on the root and on both children of a split (on the points of each)."""
    from test_verification_crown import _net

    rng = np.random.default_rng(5)
    net = _net(arch, 1)
    ir = to_ir(net)
    x = rng.random(ir.in_dim)
    q = make_query([net], x, 0.1, int(np.argmax(ir.forward(x))), nets=[ir])
    st, root = root_bounds(q, alpha_steps=0, record=True)
    assert bt.is_chain(st.graphs[0])
    pre = [[(a, b) for a, b in p.pre] for p in root.pre]
    pb = bt.make_problem(st, pre, np.full(len(root.upper), 1.0))  # every row live
    assert pb is not None
    alpha, beta, lam = bt.initial_params(pb, 1, torch.float64)
    b = bt.Batch([[torch.zeros(1, a.numel(), dtype=torch.int8) for a, _ in pre[0]]],
                 [[a[None].clone() for a, _ in pre[0]]], [[z[None].clone() for _, z in pre[0]]], alpha, beta, lam,
                 torch.full((1, pb.conj.shape[0]), np.inf, dtype=torch.float64), torch.zeros(1, dtype=torch.int64))
    lo, hi = q.box()
    xs = box_samples(ir, lo, hi, 10_000, rng)
    vals = ir.forward(xs) @ st.rows.T  # (N, D): every disjunct's value
    got, b = bt.optimise(pb, b, 10, 0.1, torch.float32, None)  # optimised slopes, float64 bound
    up = got.upper[0].numpy()
    assert np.all(vals.max(0) <= up[pb.conj[:, 0].numpy()])
    k = next(k for k in bt.relus(st.graphs[0]) if bool(((pre[0][k][0] < 0) & (pre[0][k][1] > 0)).any()))
    j = int(torch.nonzero((pre[0][k][0] < 0) & (pre[0][k][1] > 0))[0, 0])
    kids = bt.split(b, torch.zeros(1, dtype=torch.int64), torch.tensor([k]), torch.tensor([j]))
    _, kids = bt.optimise(pb, kids, 10, 0.1, torch.float32, None)  # betas on the new split
    raw = bt.bound_batch(pb, kids, torch.float64).upper.numpy()  # the children's own bounds
    z = _pre_activations_any(ir, xs)[k][:, j]
    for child, side in ((0, z >= 0), (1, z <= 0)):
        if side.any():
            assert np.all(vals[side].max(0) <= raw[child][pb.conj[:, 0].numpy()])


def _pre_activations_any(ir: NetworkIR, x: np.ndarray) -> list[np.ndarray]:
    from test_verification_crown import _activations

    out: list[np.ndarray] = []
    _activations(ir.ops, x, out)
    return out


def test_refinement_order_scores_every_act_of_a_max_pool_chain() -> None:
    """The neuron order of the refinement: one score per pre-activation of every act, max-pools
    included (their recorded coefficients are on their outputs, not on the bounds' inputs)."""
    from test_verification_crown import _net

    from phalanx.verification.bab import _importance

    net = _net("conv-bn-maxpool", 1)
    ir = to_ir(net)
    x = np.random.default_rng(1).random(ir.in_dim)
    q = make_query([net], x, 0.1, int(np.argmax(ir.forward(x))), nets=[ir])
    st, root = root_bounds(q, alpha_steps=0, record=True)
    pre = [[(a, b) for a, b in p.pre] for p in root.pre]
    kinds = {st.graphs[0].nodes[i].kind for i in st.graphs[0].acts}
    assert kinds == {"act", "maxpool"}
    scores = _importance(st, root, pre)[0]
    assert scores is not None
    assert [s.shape for s in scores] == [lo.shape for lo, _ in pre[0]]
    assert all(bool(torch.all(s >= 0)) for s in scores)
