"""Backends agree, every SAT witness re-checks, attacks never break an UNSAT query."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from verif_nets import toy_network

from phalanx.errors import PhalanxError
from phalanx.verification import (
    BACKENDS,
    MilpVerifier,
    QueryKind,
    Verdict,
    create_verifier,
    make_query,
    query_bounds,
    to_ir,
)
from phalanx.verification.marabou import marabou_available
from phalanx.verification.portfolio import AttackVerifier
from phalanx.verification.query import recheck
from phalanx.verification.selection import ensemble_kind

requires_marabou = pytest.mark.skipif(not marabou_available(), reason="maraboupy not importable")
EPS = (0.03, 0.06, 0.1)


@pytest.fixture(scope="module")
def pair_queries(tiny_mlp_pair, digits):
    members = list(tiny_mlp_pair.members)
    with torch.no_grad():
        preds = tiny_mlp_pair.member_logits(digits.val.x).argmax(-1)
    idx = ((preds == digits.val.y).all(0)).nonzero().flatten()[:6]
    nets = [to_ir(m) for m in members]
    return [make_query(members, digits.val.x[i], e, int(digits.val.y[i]), nets=nets) for e in EPS for i in idx]


@pytest.fixture(scope="module")
def milp_results(pair_queries):
    v = MilpVerifier()
    return [v.verify(q, time_limit_s=60) for q in pair_queries]


def _check_sat(q, r) -> None:
    assert r.counterexample is not None
    x = r.counterexample
    assert np.all(np.abs(x - q.x0) <= q.eps + 1e-12) and np.all((x >= 0) & (x <= 1))
    w, _, det = recheck(q, x)
    assert w is not None and all(lab != q.label for lab in det["member_labels"])


def test_milp_decides_and_witnesses_recheck(pair_queries, milp_results) -> None:
    assert all(r.verdict.decided for r in milp_results)
    verdicts = {r.verdict for r in milp_results}
    assert verdicts == {Verdict.SAT, Verdict.UNSAT}  # the fixture exercises both answers
    for q, r in zip(pair_queries, milp_results, strict=True):
        if r.verdict is Verdict.SAT:
            _check_sat(q, r)


@requires_marabou
def test_marabou_agrees_with_milp(pair_queries, milp_results) -> None:
    v = create_verifier("marabou")
    both = 0
    for q, m in zip(pair_queries, milp_results, strict=True):
        r = v.verify(q, time_limit_s=60)
        assert r.verdict is not Verdict.ERROR, r.message
        if r.verdict.decided:
            both += 1
            assert r.verdict is m.verdict, (q.describe(), r.message, m.message)
            if r.verdict is Verdict.SAT:
                _check_sat(q, r)
    assert both > 0


def test_portfolio_agrees_with_milp(pair_queries, milp_results) -> None:
    p = create_verifier("portfolio")
    stages = set()
    for q, m in zip(pair_queries, milp_results, strict=True):
        r = p.verify(q, time_limit_s=60)
        assert r.verdict is m.verdict
        stages.add(r.details["stage"])
        if r.verdict is Verdict.SAT:
            _check_sat(q, r)
    assert "bounds" in stages and "attack" in stages  # the cheapest bounds decide first


def test_heuristic_options_change_only_the_search(pair_queries, milp_results) -> None:
    """The MILP backend's default HiGHS options (RINS/RENS off) and HiGHS's own defaults give
    the same verdicts on every query; a SAT of either re-checks."""
    from phalanx.verification.backends import FAST_HIGHS_OPTIONS

    assert FAST_HIGHS_OPTIONS and MilpVerifier().highs_options == FAST_HIGHS_OPTIONS
    v = MilpVerifier(highs_options={})
    for q, m in zip(pair_queries, milp_results, strict=True):
        r = v.verify(q, time_limit_s=60)
        assert r.verdict is m.verdict, (q.describe(), r.message, m.message)
        if r.verdict is Verdict.SAT:
            _check_sat(q, r)


def test_bad_highs_options_are_rejected() -> None:
    from phalanx.verification.milp import MilpModel

    m = MilpModel()
    z = m.add_var(0.0, 1.0, integer=True)
    m.set_objective([z], [1.0], "max")
    assert m.solve(5).objective == 1.0
    for opts in ({"no_such_option": 1}, {"mip_heuristic_run_rins": "often"}):
        m.options = opts  # type: ignore[assignment]
        with pytest.raises(PhalanxError, match="HiGHS rejected option"):
            m.solve(5)


def test_two_highs_thread_counts_in_one_process(pair_queries, milp_results) -> None:
    """HiGHS starts one scheduler per calling thread with the first run's thread count; another
    count afterwards used to answer ERROR ("HiGHS: Not Set") instead of the verdict."""
    solved = [(q, m) for q, m in zip(pair_queries, milp_results, strict=True)
              if m.details.get("status") in ("target", "optimal", "infeasible")]  # reached HiGHS
    assert {m.verdict for _, m in solved} == {Verdict.SAT, Verdict.UNSAT}
    for threads in (2, 1, 3, 0, 1):
        v = create_verifier("milp", threads=threads)
        for q, m in solved[:3] + solved[-3:]:
            r = v.verify(q, time_limit_s=60)
            assert r.verdict is m.verdict, (threads, q.describe(), r.message)
    # the portfolio's member proofs run with the complete backend's thread count
    p = create_verifier("portfolio", threads=2)
    members = next(s for s in p.stages if s.name == "members")  # type: ignore[attr-defined]
    assert members.backend.threads == 2  # type: ignore[attr-defined]
    for q, m in solved[:3]:
        assert p.verify(q, time_limit_s=60).verdict is m.verdict


def test_bad_thread_counts_are_rejected() -> None:
    from phalanx.verification.milp import MilpModel

    m = MilpModel()
    z = m.add_var(0.0, 1.0, integer=True)
    m.set_objective([z], [1.0], "max")
    for bad in (-1, True, 1.5):
        with pytest.raises(PhalanxError, match="threads must be an integer"):
            m.solve(5, threads=bad)  # type: ignore[arg-type]
    m.options = {"threads": 2}
    with pytest.raises(PhalanxError, match="threads setting"):
        m.solve(5)
    with pytest.raises(PhalanxError, match="threads must be an integer"):
        create_verifier("milp", threads=-2)


def test_attacks_never_break_unsat(pair_queries, milp_results) -> None:
    atk = AttackVerifier(attacks=("ga1", "ga2", "ga3", "pgd"), steps=30, restarts=2)
    for q, m in zip(pair_queries, milp_results, strict=True):
        r = atk.verify(q, time_limit_s=10)
        assert r.verdict in (Verdict.SAT, Verdict.TIMEOUT)
        if m.verdict is Verdict.UNSAT:
            assert r.verdict is not Verdict.SAT


def _plain_mlp(seed: int, dtype: torch.dtype) -> torch.nn.Module:
    """A bare ``nn.Sequential`` (no float32 ``Normalize`` buffers to promote the input) whose
    hidden hyperplanes pass through the centre of the box, so that every class has a region."""
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(8, 4, generator=g) * 3)  # type: ignore[operator]
        m[0].bias.copy_(-0.5 * m[0].weight.sum(1))  # type: ignore[operator]
        m[2].weight.copy_(torch.randn(3, 8, generator=g))  # type: ignore[operator]
    return m.eval().to(dtype)


@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float64), (torch.float32, torch.float64)])
def test_attack_stage_works_in_the_members_dtype(dtypes) -> None:
    """float64 (and mixed) members used to crash the attack and portfolio verifiers in the attack
    stage's float32 cast (RuntimeError), where ``milp`` answers; now all three agree and every
    witness re-checks."""
    members = [_plain_mlp(s, dt) for s, dt in zip((3, 4), dtypes, strict=True)]
    nets = [to_ir(m, in_shape=(4,)) for m in members]
    rng = np.random.default_rng(0)
    atk = AttackVerifier(attacks=("ga1", "ga2", "ga3", "pgd"), steps=20)
    portfolio = create_verifier("portfolio")
    seen: dict[Verdict, int] = {}
    attack_sat = 0
    for _ in range(12):
        x0 = rng.uniform(0.2, 0.8, 4)
        label = int(nets[0].forward(x0).argmax())
        q = make_query(members, x0, float(rng.choice([0.02, 0.1, 0.3])), label, nets=nets)
        ref = MilpVerifier().verify(q, time_limit_s=60)
        assert ref.verdict.decided, ref.message
        seen[ref.verdict] = seen.get(ref.verdict, 0) + 1
        for v in (atk, portfolio):
            r = v.verify(q, time_limit_s=60)
            assert r.verdict is not Verdict.ERROR, r.message
            if v is portfolio:
                assert r.verdict is ref.verdict, r.message
            elif ref.verdict is Verdict.UNSAT:
                assert r.verdict is Verdict.TIMEOUT
            if r.verdict is Verdict.SAT:
                _check_sat(q, r)
                attack_sat += v is atk
    assert set(seen) == {Verdict.SAT, Verdict.UNSAT} and attack_sat >= 1, seen
    assert [p.dtype for m in members for p in m.parameters()][-1] == dtypes[1]  # members left as they were


def test_bounds_never_contradict_milp(pair_queries, milp_results) -> None:
    b = create_verifier("bounds")
    for q, m in zip(pair_queries, milp_results, strict=True):
        r = b.verify(q, time_limit_s=1)
        assert r.verdict in (Verdict.UNSAT, Verdict.TIMEOUT)
        if r.verdict is Verdict.UNSAT:
            assert m.verdict is Verdict.UNSAT


def test_runner_up_can_only_report_sat(pair_queries, milp_results) -> None:
    v = MilpVerifier()
    for q, m in zip(pair_queries[:8], milp_results[:8], strict=True):
        ru = make_query(q.models, q.x0, q.eps, q.label, runner_up=True, nets=q.nets)
        r = v.verify(ru, time_limit_s=30)
        assert r.verdict is not Verdict.UNSAT
        if r.verdict is Verdict.SAT:
            assert m.verdict is Verdict.SAT  # a runner-up witness is a real mutual error


def _small_pair(seed: int):
    torch.manual_seed(seed)
    return [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).eval()
            for _ in range(2)]


@pytest.mark.parametrize("kind", ["mutual-error", "mean-logits", "majority"])
def test_smt_and_milp_agree_on_small_networks(kind: str) -> None:
    pytest.importorskip("z3")
    decided = 0
    for seed in range(6):
        models = _small_pair(seed)
        nets = [to_ir(m, in_shape=(3,)) for m in models]
        x0 = np.array([0.5, 0.4, 0.6])
        label = int(np.argmax(nets[0].forward(x0)))
        for eps in (0.05, 0.3):
            q = make_query(models, x0, eps, label, kind=kind, nets=nets)
            a = MilpVerifier().verify(q, time_limit_s=30)
            b = create_verifier("smt").verify(q, time_limit_s=30)
            assert a.verdict.decided
            if b.verdict.decided:
                decided += 1
                assert a.verdict is b.verdict
            for r in (a, b):
                if r.verdict is Verdict.SAT:
                    assert recheck(q, r.counterexample)[0] is not None
    assert decided > 0


def test_toy_network_query() -> None:
    """Fig. 1's network labels [1, -5] as class 0 (output [6, 3]); a ball of radius 0.5 keeps it."""
    net = toy_network()
    nets = [to_ir(net, in_shape=(2,))]
    q = make_query([net], np.array([1.0, -5.0]), 0.5, 0, nets=nets, input_bounds=(-10.0, 10.0))
    assert MilpVerifier().verify(q, time_limit_s=10).verdict is Verdict.UNSAT
    # radius 3: class 1 can only tie with class 0 (both logits 0 when x1 <= 0): not a proof either way
    q = make_query([net], np.array([1.0, -5.0]), 3.0, 0, nets=nets, input_bounds=(-10.0, 10.0))
    r = MilpVerifier().verify(q, time_limit_s=10)
    assert r.verdict is Verdict.ERROR and "tie" in r.message
    # radius 5.5: x = [0.1, 0.5] gives logits [1.8, 2.7]
    q = make_query([net], np.array([1.0, -5.0]), 5.5, 0, nets=nets, input_bounds=(-10.0, 10.0))
    r = MilpVerifier().verify(q, time_limit_s=10)
    assert r.verdict is Verdict.SAT and r.details["member_labels"] == [1]


def test_mean_prob_ensembles_are_rejected() -> None:
    with pytest.raises(PhalanxError, match="not piecewise linear"):
        ensemble_kind("mean-prob")
    assert ensemble_kind("mean-logits") is QueryKind.MEAN_LOGITS


def test_registry_and_lazy_imports() -> None:
    assert {"milp", "marabou", "smt", "bounds", "attack", "portfolio"} <= set(BACKENDS.names())
    with pytest.raises(PhalanxError, match="known"):
        create_verifier("gurobi")


def test_bad_queries_are_rejected(tiny_mlp_pair, digits) -> None:
    ms = list(tiny_mlp_pair.members)
    with pytest.raises(PhalanxError, match="label"):
        make_query(ms, digits.val.x[0], 0.1, 12)
    with pytest.raises(PhalanxError, match="eps"):
        make_query(ms, digits.val.x[0], -0.1, 1)
    with pytest.raises(PhalanxError, match="quorum"):
        make_query(ms, digits.val.x[0], 0.1, 1, quorum=3)
    # an explicit box belongs to property queries: with it a mutual-error query's ball would not be
    # the box that member facts and bound caches key by its point and eps
    import dataclasses

    q = make_query(ms, digits.val.x[0], 0.1, 1)
    box = (np.zeros_like(q.x0), np.ones_like(q.x0))
    with pytest.raises(PhalanxError, match="property queries"):
        dataclasses.replace(q, spec_box=box)


def test_importable_without_optional_backends(tiny_mlp_pair, digits, monkeypatch) -> None:
    """z3 and maraboupy missing: the package imports, and using them gives an install hint."""
    import sys

    monkeypatch.setitem(sys.modules, "z3", None)
    monkeypatch.setitem(sys.modules, "maraboupy", None)
    q = make_query(list(tiny_mlp_pair.members), digits.val.x[0], 0.3, int(digits.val.y[0]))
    with pytest.raises(PhalanxError, match=r"phalanx\[smt\]"):
        create_verifier("smt").verify(q, time_limit_s=5)
    with pytest.raises(PhalanxError, match=r"phalanx\[marabou\]"):
        create_verifier("marabou").verify(q, time_limit_s=5)


def test_ensemble_kind_names_the_way_for_every_combiner() -> None:
    from phalanx.verification.query import QueryKind
    from phalanx.verification.selection import ensemble_kind

    assert ensemble_kind("mean-logits") is QueryKind.MEAN_LOGITS
    assert ensemble_kind("vote") is ensemble_kind("majority") is QueryKind.MAJORITY
    for comb in ("vote-prob", "vote-index"):
        with pytest.raises(PhalanxError, match=rf"{comb}.*verified as 'majority'.*--combiner majority"):
            ensemble_kind(comb)
    with pytest.raises(PhalanxError, match="randomized-attack"):
        ensemble_kind("random")
    with pytest.raises(PhalanxError, match="'mean-prob' cannot be verified exactly"):
        ensemble_kind("mean-prob")


def test_portfolio_runs_cheap_bounds_before_the_attack(pair_queries, milp_results) -> None:
    """The default order is forward bounds, joint CROWN, attack, members, the exact MILP, the
    complete backend (CROWN only with ``bounds="crown"``, the exact MILP only when the complete
    backend is not the MILP); a query the bounds decide never runs the attack, and the complete
    MILP reuses the bounds stage's bounds."""
    from phalanx.verification.portfolio import DEFAULT_STAGES, STAGES, Portfolio

    assert DEFAULT_STAGES == ("bounds", "crown", "attack", "members", "exact", "complete")
    assert set(DEFAULT_STAGES) <= set(STAGES.names())
    assert [s.name for s in Portfolio().stages] == ["bounds", "crown", "attack", "members", "exact", "bab"]
    p = Portfolio(complete="milp", bounds="linear")
    assert [s.name for s in p.stages] == ["bounds", "attack", "members", "milp"]
    by_bounds = 0
    for q, m in zip(pair_queries, milp_results, strict=True):
        r = p.verify(q, time_limit_s=60)
        assert r.verdict is m.verdict
        if r.details["stage"] == "bounds":
            by_bounds += 1
            assert list(r.details["stages"]) == ["bounds"]
    assert by_bounds > 0
    assert [s.name for s in Portfolio(complete="milp", bounds="linear", member_proofs=False).stages] == [
        "bounds", "attack", "milp"]
    with pytest.raises(PhalanxError, match="unknown portfolio stage 'joint'"):
        Portfolio(stages=["bounds", "joint"])
    with pytest.raises(PhalanxError, match="unknown portfolio bounds 'deeppoly'; accepted: crown, linear, interval"):
        Portfolio(bounds="deeppoly")


class _Recorder:
    """A stage that records the time it was given and decides nothing."""

    def __init__(self, name: str, claim: float | None) -> None:
        self.name, self._claim, self.limits = name, claim, []

    def claim(self, query, state):
        return self._claim

    def run(self, query, state, time_limit_s):
        from phalanx.verification import VerificationResult

        self.limits.append(time_limit_s)
        return VerificationResult(Verdict.TIMEOUT, self.name, 0.0, message="nothing")


def test_portfolio_shares_time_by_claims(pair_queries) -> None:
    """A stage gets the time left times its claim over its own and the later stages' claims;
    claim 0 skips it; claim None (cheap) gets all that is left; the last stage gets whatever is left;
    no stage decides -> TIMEOUT."""
    from phalanx.verification.portfolio import Portfolio

    cheap, a, skipped, b = _Recorder("cheap", None), _Recorder("a", 1.0), _Recorder("skip", 0.0), _Recorder("b", 3.0)
    r = Portfolio(stages=[cheap, a, skipped, b]).verify(pair_queries[0], time_limit_s=8.0)
    assert r.verdict is Verdict.TIMEOUT
    assert cheap.limits[0] <= 8.0 and cheap.limits[0] > 7.9
    assert a.limits[0] == pytest.approx(2.0, abs=0.05)  # 8 * 1 / (1 + 3)
    assert skipped.limits == []
    assert b.limits[0] == pytest.approx(8.0, abs=0.1)  # all that is left: time a stage did not use passes on


def test_member_stage_takes_less_than_half_and_caches_timeouts(pair_queries) -> None:
    """The member stage's time follows its claim (the needed member proofs' share of the joint
    query's unstable ReLUs), not a fixed half; a member left undecided at some limit is not
    retried with a smaller one."""
    from phalanx.verification.portfolio import BoundsStage, MembersStage, Portfolio, StageState, clear_caches

    given: list[float] = []

    class Slow(MilpVerifier):
        def verify_with_bounds(self, query, qb, *, time_limit_s):
            given.append(time_limit_s)
            return self._result(Verdict.TIMEOUT, 0.0, message="pretend")

    clear_caches()
    q = next(q for q in pair_queries if BoundsStage().run(q, StageState(), 10).verdict is Verdict.TIMEOUT)
    members = MembersStage(Slow())
    state = StageState()
    BoundsStage().run(q, state, 10)
    claim = members.claim(q, state)
    assert claim is not None and 0 < claim < 1
    complete = _Recorder("complete", 1.0)
    Portfolio(stages=[BoundsStage(), members, complete]).verify(q, time_limit_s=30.0)
    assert len(given) == 2 and sum(given) < 15.0  # both members tried, within less than half
    assert complete.limits[0] > 15.0
    given.clear()
    Portfolio(stages=[BoundsStage(), members, complete]).verify(q, time_limit_s=30.0)
    assert given == []  # cached as undecided at a larger limit than it would get now
    clear_caches()


def test_disjunct_bounds_alone_are_the_full_bounds_disjuncts(pair_queries) -> None:
    """The cheap bounds pass (disjuncts only, what an UNSAT proof needs) gives exactly the full
    call's disjunct bounds; the per-network bounds are added later without recomputing them."""
    from phalanx.verification import query_bounds

    for q in pair_queries[:4]:
        full = query_bounds(q)
        cheap = query_bounds(q, per_network=False)
        assert cheap.nets == () and cheap.proves_unsat(q) == full.proves_unsat(q)
        for a, b in zip(full.disjunct_upper + full.disjunct_lower, cheap.disjunct_upper + cheap.disjunct_lower,
                        strict=True):
            np.testing.assert_array_equal(a, b)
        filled = query_bounds(q, disjuncts=cheap)
        assert filled.disjunct_upper is cheap.disjunct_upper and len(filled.nets) == len(q.nets)
        for a, b in zip(full.nets, filled.nets, strict=True):
            np.testing.assert_array_equal(a.output[1], b.output[1])


def test_bounds_stop_at_unsat_and_cache_are_exact(pair_queries, monkeypatch) -> None:
    """Stopping at the first member whose bounds settle the query proves UNSAT exactly when the
    full pass does, with the bounded members' disjuncts unchanged and the others left at
    (-inf, inf); a query it cannot settle gets the full bounds. Cached bounds are the same
    numbers, computed once per member, point and eps (a pair sharing a member reuses them)."""
    import weakref

    from phalanx.verification import backends, query_bounds
    from phalanx.verification.query import make_query

    stopped = 0
    for q in pair_queries:
        full = query_bounds(q, per_network=False)
        part = query_bounds(q, per_network=False, stop_at_unsat=True)
        assert part.proves_unsat(q) == full.proves_unsat(q)
        for a, b in zip(full.disjunct_upper + full.disjunct_lower, part.disjunct_upper + part.disjunct_lower,
                        strict=True):
            assert np.all((a == b) | np.isinf(b))
        if any(np.isinf(u).any() for u in part.disjunct_upper):
            stopped += 1
            assert part.proves_unsat(q)
    assert stopped > 0  # the fixture has pairs whose first member alone settles them

    calls = []
    real = backends.linear_bounds
    monkeypatch.setattr(backends, "linear_bounds", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache: backends.BoundCache = weakref.WeakKeyDictionary()
    q = pair_queries[0]
    first = query_bounds(q, per_network=False, cache=cache)
    assert len(calls) == 2 and len(cache) == 2
    again = query_bounds(q, per_network=False, cache=cache)
    assert len(calls) == 2  # both members from the cache
    other = make_query(list(q.models)[::-1], q.x0, q.eps, q.label, nets=list(q.nets)[::-1])
    swapped = query_bounds(other, per_network=False, cache=cache)
    assert len(calls) == 2  # the same members in another pair: still cached
    for a, b in zip(first.disjunct_upper, again.disjunct_upper, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(swapped.disjunct_upper[0], first.disjunct_upper[1])
    wider = make_query(list(q.models), q.x0, q.eps * 2, q.label, nets=list(q.nets))
    query_bounds(wider, per_network=False, cache=cache)
    assert len(calls) == 4  # another box: computed afresh


def test_member_queries_reuse_the_joint_bounds(pair_queries) -> None:
    """A member's single-network query has the joint query's group of that member as its only
    group, so its bounds are the joint bounds' network and group: reusing them is exact."""
    from phalanx.verification import query_bounds
    from phalanx.verification.query import make_query

    for q in pair_queries[:3]:
        joint = query_bounds(q)
        for i in range(len(q.nets)):
            single = make_query([q.models[i]], q.x0, q.eps, q.label, nets=[q.nets[i]], input_bounds=q.input_bounds)
            own = query_bounds(single)
            np.testing.assert_allclose(own.disjunct_upper[0], joint.disjunct_upper[i], rtol=0, atol=1e-12)
            np.testing.assert_allclose(own.disjunct_lower[0], joint.disjunct_lower[i], rtol=0, atol=1e-12)
            np.testing.assert_array_equal(own.nets[0].output[1], joint.nets[i].output[1])


def test_stage_settled_by_cached_work_jumps_the_queue(pair_queries) -> None:
    """After the first stage, a stage that decides from cached work alone (member verdicts cached
    by earlier pairs) runs before the costlier stages ahead of it; without the cache the order
    is kept."""
    from phalanx.verification.portfolio import (
        _MEMBER_CACHE,
        BoundsStage,
        MembersStage,
        Portfolio,
        StageState,
        _member_key,
        clear_caches,
    )

    q = next(q for q in pair_queries if BoundsStage().run(q, StageState(), 10).verdict is Verdict.TIMEOUT)
    attack, complete = _Recorder("attack", None), _Recorder("complete", 1.0)
    members = MembersStage(MilpVerifier())
    clear_caches()
    try:
        _MEMBER_CACHE[_member_key(q, 1)] = (Verdict.UNSAT, 5.0)  # as if an earlier pair had proven it
        assert members.free(q)
        r = Portfolio(stages=[BoundsStage(), attack, members, complete]).verify(q, time_limit_s=10.0)
        assert r.verdict is Verdict.UNSAT and r.details["stage"] == "members"
        assert list(r.details["stages"]) == ["bounds", "members"] and attack.limits == []
        clear_caches()
        assert not members.free(q)
        stub = MembersStage(type("Undecided", (MilpVerifier,), {"verify_with_bounds": lambda self, query, qb, *,
                                time_limit_s: self._result(Verdict.TIMEOUT, 0.0, message="pretend")})())
        r = Portfolio(stages=[BoundsStage(), attack, stub, complete]).verify(q, time_limit_s=10.0)
        assert list(r.details["stages"]) == ["bounds", "attack", "members", "complete"]
    finally:
        clear_caches()


def test_complete_stage_claims_its_decision_rate(pair_queries) -> None:
    """A stage claiming ``"rate"`` claims how often it decided the queries that reached it (Laplace
    estimate), so a complete stage that keeps failing after the exact MILP leaves the MILP more of
    the time: 1/2 before evidence (the MILP gets 2/3), 1/5 after three failures (5/6)."""
    from phalanx.verification.portfolio import _STAGE_STATS, Portfolio, StageState, VerifierStage, decision_rate

    class Never(MilpVerifier):
        name = "never"

        def verify(self, query, *, time_limit_s):
            return self._result(Verdict.TIMEOUT, 0.0, message="pretend")

    _STAGE_STATS.pop("never", None)
    q = pair_queries[0]
    late = VerifierStage(Never(), claim="rate")
    assert late.claim(q, StageState()) == decision_rate("never") == 0.5
    exact = _Recorder("exact-recorder", 1.0)
    Portfolio(stages=[exact, late]).verify(q, time_limit_s=6.0)
    assert exact.limits[0] == pytest.approx(4.0, abs=0.05)
    for _ in range(2):
        Portfolio(stages=[exact, late]).verify(q, time_limit_s=6.0)
    assert _STAGE_STATS["never"] == [3, 0] and decision_rate("never") == pytest.approx(0.2)
    Portfolio(stages=[exact, late]).verify(q, time_limit_s=6.0)
    assert exact.limits[-1] == pytest.approx(5.0, abs=0.05)
    with pytest.raises(PhalanxError, match="unknown stage claim 'often'"):
        VerifierStage(Never(), claim="often")
    _STAGE_STATS.pop("never", None)


def test_exact_stage_steps_aside_above_its_unstable_limit(pair_queries, monkeypatch) -> None:
    """The exact MILP stage claims 1 up to ``EXACT_MAX_UNSTABLE`` unstable ReLUs (by the forward
    bounds) and 0 above, leaving the time to the complete backend."""
    from phalanx.verification import portfolio as pf

    stage = pf.STAGES.get("exact")(pf.PortfolioOptions())
    for q in pair_queries:
        state = pf.StageState(query_bounds(q, "linear"), "linear")
        n = sum(nb.num_unstable for nb in state.bounds.nets)
        if n == 0:
            continue
        monkeypatch.setattr(pf, "EXACT_MAX_UNSTABLE", n)
        assert stage.claim(q, state) == 1.0
        monkeypatch.setattr(pf, "EXACT_MAX_UNSTABLE", n - 1)
        assert stage.claim(q, state) == 0.0
        return
    pytest.fail("no query with an unstable ReLU")


def test_presolve_steps_aside_when_it_would_overrun_the_limit() -> None:
    """HiGHS's presolve ignores the time limit (11.5 s on a 3 s limit for a joint 784-256-10 pair,
    409k nonzeros): ``solve`` turns it off when the estimate passes half the limit, keeps it
    otherwise, and the MILP's answers do not depend on it."""
    from phalanx.verification.milp import MilpModel, presolve_fits

    assert not presolve_fits(20.0, 409_258) and presolve_fits(60.0, 409_258)  # 784-256-10 pairs
    assert presolve_fits(20.0, 204_756) and not presolve_fits(1.0, 204_756)  # 784-128-10 pairs
    assert presolve_fits(0.5, 48_062)  # 784-30-10 pairs: the small MILPs keep it
    for opts in ({}, {"presolve": "off"}, {"presolve": "on"}):  # the caller's choice is passed through
        m = MilpModel()
        z = m.add_var(0.0, 1.0, integer=True)
        y = m.add_var(0.0, 3.0)
        m.add_row([y, z], [1.0, -2.0], -np.inf, 0.5)  # y <= 2 z + 0.5
        m.set_objective([y], [1.0], "max")
        m.options = opts  # type: ignore[assignment]
        assert m.solve(5).objective == 2.5


def test_member_facts_follow_the_balls(pair_queries) -> None:
    """A member proven robust at some eps is robust at every smaller eps (same point, label and
    box), a member proven to err at some eps errs at every larger one, never the other way."""
    from phalanx.verification.portfolio import clear_caches, member_fact, record_member

    q = pair_queries[0]

    def at(eps: float):
        return make_query(list(q.models), q.x0, eps, q.label, nets=list(q.nets))

    clear_caches()
    try:
        record_member(at(0.05), 0, Verdict.UNSAT)
        record_member(at(0.2), 0, Verdict.SAT)
        record_member(at(0.05), 1, Verdict.TIMEOUT)  # undecided: not a fact
        assert [member_fact(at(e), 0) for e in (0.01, 0.05, 0.1, 0.2, 0.3)] == [
            Verdict.UNSAT, Verdict.UNSAT, None, Verdict.SAT, Verdict.SAT]
        assert member_fact(at(0.01), 1) is None
        other = make_query(list(q.models), pair_queries[1].x0, 0.01, int(pair_queries[1].label), nets=list(q.nets))
        assert member_fact(other, 0) is None  # another point
        runner = make_query(list(q.models), q.x0, 0.01, q.label, nets=list(q.nets), runner_up=True)
        assert member_fact(runner, 0) is None  # a runner-up group is not the member's whole error set
    finally:
        clear_caches()


def test_member_facts_agree_with_the_milp_and_skip_the_bounds(pair_queries, monkeypatch) -> None:
    """Facts learnt by the portfolio on the fixture's queries (bounds and member proofs, each eps
    in turn, largest first) agree with MILP proofs of each member alone at every eps; a query that
    facts settle is answered UNSAT by the bounds stage without computing a bound, with the MILP's
    verdict."""
    from phalanx.verification import backends
    from phalanx.verification.portfolio import BoundsStage, Portfolio, StageState, clear_caches, member_fact

    milp = MilpVerifier()
    clear_caches()
    try:
        p = Portfolio(complete="milp", bounds="linear")
        for q in sorted(pair_queries, key=lambda q: -q.eps):
            p.verify(q, time_limit_s=60)
        facts = 0
        for q in pair_queries:
            for i in range(2):
                f = member_fact(q, i)
                if f is None:
                    continue
                facts += 1
                single = make_query([q.models[i]], q.x0, q.eps, q.label, nets=[q.nets[i]])
                assert milp.verify(single, time_limit_s=60).verdict is f
        assert facts > 0
        calls = []
        real = backends.linear_bounds
        monkeypatch.setattr(backends, "linear_bounds", lambda *a, **k: calls.append(1) or real(*a, **k))
        settled = 0
        for q, m in zip(pair_queries, [milp.verify(q, time_limit_s=60) for q in pair_queries], strict=True):
            if sum(member_fact(q, i) is Verdict.UNSAT for i in range(2)) >= 1:
                settled += 1
                n = len(calls)
                assert BoundsStage().run(q, StageState(), 10).verdict is Verdict.UNSAT is m.verdict
                assert len(calls) == n
        assert settled > 0
    finally:
        clear_caches()


def test_bounds_pass_follows_the_given_order(pair_queries, monkeypatch) -> None:
    """``order`` decides which member is bounded first (after cached ones), with the same bounds."""
    from phalanx.verification import backends

    q = pair_queries[0]
    seen = []
    real = backends.linear_bounds
    monkeypatch.setattr(backends, "linear_bounds", lambda net, *a, **k: seen.append(net) or real(net, *a, **k))
    a = query_bounds(q, per_network=False, order=[1, 0])
    assert seen == [q.nets[1], q.nets[0]]
    b = query_bounds(q, per_network=False)
    for u, v in zip(a.disjunct_upper, b.disjunct_upper, strict=True):
        np.testing.assert_array_equal(u, v)


def test_highs_gets_the_limit_less_its_overrun() -> None:
    """HiGHS ends a while after its time limit (between cut rounds): it is given the caller's limit
    less an estimate quadratic in the nonzeros, never more than a quarter of the limit, never < 0."""
    from phalanx.verification.milp import HIGHS_OVERRUN_S_PER_NZ2, highs_time_limit

    assert highs_time_limit(20.0, 409_517) == pytest.approx(20.0 - HIGHS_OVERRUN_S_PER_NZ2 * 409_517 ** 2)
    assert 19.0 < highs_time_limit(20.0, 409_517) < 19.5  # 784-256-10 pairs: ~0.75 s kept back
    assert highs_time_limit(20.0, 48_062) > 19.98  # 784-30-10 pairs: ~0.01 s
    assert highs_time_limit(1.0, 409_517) == pytest.approx(0.75)  # at most a quarter of the limit
    assert highs_time_limit(0.0, 10) == 0.01
