"""Randomized attacks on hand-built linear classifiers (Gross et al. Fig. 1) for every backend."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from phalanx.errors import PhalanxError
from phalanx.randomized.attack import (
    RandomizedAttackConfig,
    Verdict,
    comparison_attackers,
    fooling_patterns,
    randomized_attack,
)
from phalanx.randomized.problem import recheck_attack

HAS_Z3 = importlib.util.find_spec("z3") is not None
requires_z3 = pytest.mark.skipif(not HAS_Z3, reason="z3 not installed")


def linear(w: list[list[float]], b: list[float]) -> nn.Module:
    m = nn.Sequential(nn.Linear(len(w[0]), len(w)))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor(w))
        m[0].bias.copy_(torch.tensor(b))
    return m


def figure1() -> tuple[list[nn.Module], torch.Tensor, torch.Tensor]:
    """One point (0, 0) with label 0; classifier 0 says 1 left of x1 = -1, classifier 1 right of x1 = 1."""
    c0 = linear([[0.0, 0.0], [-1.0, 0.0]], [0.0, -1.0])
    c1 = linear([[0.0, 0.0], [1.0, 0.0]], [0.0, -1.0])
    return [c0, c1], torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)


def cfg(**kw: object) -> RandomizedAttackConfig:
    base: dict[str, object] = {"eps": 2.0, "alpha": 0.5, "bounds": None, "time_limit_s": 30.0}
    base.update(kw)
    return RandomizedAttackConfig(**base)  # type: ignore[arg-type]


def assert_rechecks(res, clfs, x, y, config) -> None:  # type: ignore[no-untyped-def]
    """The returned attack's value and losses are what the PyTorch models say."""
    from phalanx.randomized.problem import prepare_classifiers

    assert res.rechecked
    rc = recheck_attack(prepare_classifiers(clfs, x.shape[1:]), x.double().numpy(), y.numpy(),
                        res.attacks, res.probabilities, config)
    assert rc.in_ball
    assert rc.value == pytest.approx(res.value)
    np.testing.assert_array_equal(rc.losses, res.losses)


@pytest.mark.parametrize("backend", ["decomposition", "milp"])
def test_figure1_values(backend: str) -> None:
    clfs, x, y = figure1()
    two = randomized_attack(clfs, x, y, cfg(num_attacks=2, backend=backend))
    assert two.value == pytest.approx(0.5) and two.upper_bound == pytest.approx(0.5)
    assert two.verdict is Verdict.NOT_ROBUST
    assert sorted(two.probabilities.tolist()) == pytest.approx([0.5, 0.5])
    assert_rechecks(two, clfs, x, y, cfg(num_attacks=2, backend=backend))
    one = randomized_attack(clfs, x, y, cfg(num_attacks=1, backend=backend))
    assert one.value == pytest.approx(0.0) and one.upper_bound == pytest.approx(0.0)
    assert one.verdict is Verdict.ROBUST_FOR_NUM_ATTACKS  # only a proof for |A| = 1
    # with |A| left to Prop. 1 the optimum (1/2) is found and a higher alpha is proven out
    auto = randomized_attack(clfs, x, y, cfg(alpha=0.6, backend=backend))
    assert auto.value == pytest.approx(0.5) and auto.verdict is Verdict.ROBUST
    assert auto.num_attacks >= auto.sufficient_num_attacks


@requires_z3
def test_figure1_smt() -> None:
    clfs, x, y = figure1()
    two = randomized_attack(clfs, x, y, cfg(num_attacks=2, backend="smt", objective="feasibility"))
    assert two.verdict is Verdict.NOT_ROBUST and two.value == pytest.approx(0.5)
    assert_rechecks(two, clfs, x, y, cfg(num_attacks=2, backend="smt", objective="feasibility"))
    one = randomized_attack(clfs, x, y, cfg(num_attacks=1, backend="smt", objective="feasibility"))
    assert one.verdict is Verdict.ROBUST_FOR_NUM_ATTACKS and one.value is None


def test_figure1_feasibility_and_maxsum() -> None:
    clfs, x, y = figure1()
    f = randomized_attack(clfs, x, y, cfg(num_attacks=2, objective="feasibility", backend="milp"))
    assert f.verdict is Verdict.NOT_ROBUST and f.value >= 0.5
    # the paper's MaxMILP sums over classifiers: its optimum need not maximise Val
    s = randomized_attack(clfs, x, y, cfg(num_attacks=2, objective="max-sum", backend="milp"))
    assert s.value is not None and s.value <= 0.5 + 1e-9
    assert s.verdict is not Verdict.ROBUST


def test_figure1_budget_and_linf() -> None:
    clfs, x, y = figure1()
    small = randomized_attack(clfs, x, y, cfg(eps=0.9))  # the lines are 1 away
    assert small.value == pytest.approx(0.0) and small.verdict is Verdict.ROBUST
    linf = randomized_attack(clfs, x, y, cfg(eps=1.1, norm="linf"))
    assert linf.value == pytest.approx(0.5)
    assert np.abs(linf.attacks - x.numpy()[None]).max() <= 1.1 + 1e-12
    # at eps = 1 only exact ties misclassify: no attack is reported, and no proof either
    tie = randomized_attack(clfs, x, y, cfg(eps=1.0, norm="linf"))
    assert tie.value == pytest.approx(0.0) and tie.verdict is Verdict.UNKNOWN
    assert tie.upper_bound == pytest.approx(0.5)


def test_comparison_attackers_figure1() -> None:
    clfs, x, y = figure1()
    out = comparison_attackers(clfs, x, y, cfg())
    assert out["uniform"].value == pytest.approx(0.5)  # uniform over the two single-classifier attacks
    assert out["best_deterministic"].value == pytest.approx(0.0)
    assert out["uniform"].verdict is Verdict.NOT_ROBUST
    assert out["best_deterministic"].verdict is Verdict.UNKNOWN  # heuristics never prove robustness


def lemma2_case() -> tuple[list[nn.Module], torch.Tensor, torch.Tensor]:
    """Two points; classifier 0 errs when x1 <= -1, classifier 1 when x2 <= -1: (-1, -1) fools both."""
    c0 = linear([[0.0, 0.0], [-1.0, 0.0]], [0.0, -1.0])
    c1 = linear([[0.0, 0.0], [0.0, -1.0]], [0.0, -1.0])
    return [c0, c1], torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)


@pytest.mark.parametrize("backend", ["decomposition", "milp"])
def test_lemma2_shortcut(backend: str) -> None:
    clfs, x, y = lemma2_case()
    hit = randomized_attack(clfs, x, y, cfg(alpha=1.0, eps=2.2, backend=backend))
    assert hit.value == pytest.approx(1.0) and len(hit.probabilities) == 1
    assert hit.verdict is Verdict.NOT_ROBUST and hit.stats["lemma2"] == "value 1"
    miss = randomized_attack(clfs, x, y, cfg(alpha=1.0, eps=1.5, backend=backend))
    assert miss.verdict is Verdict.ROBUST and miss.stats["lemma2"] == "refuted"
    # without the shortcut the full solve agrees: each classifier alone can be fooled
    full = randomized_attack(clfs, x, y, cfg(alpha=1.0, eps=1.5, backend=backend, lemma2_shortcut=False))
    assert full.verdict is Verdict.ROBUST and full.value == pytest.approx(0.5)


@pytest.mark.parametrize("backend", ["decomposition", "milp"])
def test_timeouts_never_prove_robustness(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from phalanx.verification import milp

    def timeout(self, time_limit_s, *, threads=1):  # type: ignore[no-untyped-def]
        return milp.MilpOutcome("timeout", None, None, dual_bound=0.0, mip_gap=1.0)

    monkeypatch.setattr(milp.MilpModel, "solve", timeout)
    clfs, x, y = figure1()
    for alpha in (0.5, 0.6, 1.0):
        res = randomized_attack(clfs, x, y, cfg(alpha=alpha, backend=backend))
        assert res.verdict is Verdict.UNKNOWN
        assert res.upper_bound is None or res.upper_bound >= alpha


def test_bad_inputs() -> None:
    clfs, x, y = figure1()
    with pytest.raises(PhalanxError, match="alpha"):
        cfg(alpha=1.5)
    with pytest.raises(PhalanxError, match="backend"):
        cfg(backend="gurobi")
    with pytest.raises(PhalanxError, match="norm"):
        cfg(norm="l2")
    with pytest.raises(PhalanxError, match="feasibility"):
        cfg(backend="smt")
    with pytest.raises(PhalanxError, match="labels"):
        randomized_attack(clfs, x, torch.tensor([5]), cfg())
    with pytest.raises(PhalanxError, match="bounds"):
        randomized_attack(clfs, x - 1.0, y, cfg(bounds=(0.0, 1.0)))


def test_result_json_and_inputs_untouched() -> None:
    clfs, x, y = figure1()
    before = [p.detach().clone() for m in clfs for p in m.parameters()]
    res = randomized_attack(clfs, x, y, cfg())
    doc = json.loads(json.dumps(res.to_json()))
    assert doc["verdict"] == "not-robust" and doc["value"] == pytest.approx(0.5)
    assert len(doc["attacks"]) == len(doc["probabilities"])
    after = [p for m in clfs for p in m.parameters()]
    assert all(torch.equal(a, b) and b.dtype == torch.float32 for a, b in zip(before, after, strict=True))


def three_class() -> tuple[list[nn.Module], torch.Tensor, torch.Tensor]:
    """3 classes, label 0 at the origin; classifier 0 errs when |x1| >= 1 (labels 1 or 2 win),
    classifier 1 when |x2| >= 1: the wrong-label disjunction of the encodings is exercised."""
    c0 = linear([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], [0.0, -1.0, -1.0])
    c1 = linear([[0.0, 0.0], [0.0, 1.0], [0.0, -1.0]], [0.0, -1.0, -1.0])
    return [c0, c1], torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)


@pytest.mark.parametrize("backend", ["decomposition", "milp"])
def test_multiclass_disjunction(backend: str) -> None:
    clfs, x, y = three_class()
    both = randomized_attack(clfs, x, y, cfg(eps=2.2, alpha=1.0, backend=backend, lemma2_shortcut=False))
    assert both.value == pytest.approx(1.0) and both.verdict is Verdict.NOT_ROBUST
    one_each = randomized_attack(clfs, x, y, cfg(eps=1.5, alpha=0.5, backend=backend))
    assert one_each.value == pytest.approx(0.5) and one_each.upper_bound == pytest.approx(0.5)
    assert_rechecks(one_each, clfs, x, y, cfg(eps=1.5, alpha=0.5, backend=backend))


@requires_z3
def test_multiclass_smt() -> None:
    clfs, x, y = three_class()
    res = randomized_attack(clfs, x, y, cfg(eps=1.5, alpha=0.5, num_attacks=2, backend="smt", objective="feasibility"))
    assert res.verdict is Verdict.NOT_ROBUST and res.value == pytest.approx(0.5)
    no = randomized_attack(clfs, x, y, cfg(eps=1.5, alpha=0.75, num_attacks=2, backend="smt", objective="feasibility"))
    assert no.verdict is Verdict.ROBUST and no.value is None  # |A| = 2 = |C| is sufficient


def test_fooling_patterns_figure1() -> None:
    clfs, x, y = figure1()
    (pp,) = fooling_patterns(clfs, x, y, cfg())
    assert pp.complete and pp.lower() == [frozenset({0}), frozenset({1})]
    assert frozenset({0, 1}) in pp.infeasible
    w = pp.witness(frozenset({0}))
    assert np.abs(w - x.numpy()[0]).sum() <= 2.0 + 1e-12 and w[0] <= -1.0


def three_lines() -> tuple[list[nn.Module], torch.Tensor, torch.Tensor]:
    """Three classifiers in the plane fooled by x1 < -1, x1 > 1 and x2 > 1; the point 0. With L1
    eps 2 a pair ({x1 < -1, x2 > 1} or {x1 > 1, x2 > 1}) is fooled together only at an exact tie
    (|x1| = |x2| = 1), so the best attack that re-checks is uniform over the three singletons
    (Val 1/3), while the tie-inclusive bound is 1/2."""
    c0 = linear([[0.0, 0.0], [-1.0, 0.0]], [0.0, -1.0])
    c1 = linear([[0.0, 0.0], [1.0, 0.0]], [0.0, -1.0])
    c2 = linear([[0.0, 0.0], [0.0, 1.0]], [0.0, -1.0])
    return [c0, c1, c2], torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)


@pytest.mark.parametrize("backend", ["decomposition", "milp"])
def test_tie_only_patterns_are_not_an_optimal_attack(backend: str) -> None:
    """The monolithic MILP (ties count) claimed 1/2, its attack re-checked at 0, and it said
    "optimal"; now it returns the 1/3 attack and does not call it optimal (1/3 < the bound 1/2)."""
    clfs, x, y = three_lines()
    config = cfg(num_attacks=3, backend=backend)
    res = randomized_attack(clfs, x, y, config)
    assert res.value == pytest.approx(1 / 3, abs=1e-9) and res.upper_bound == pytest.approx(0.5)
    assert res.status != "optimal" and res.verdict is Verdict.UNKNOWN
    assert_rechecks(res, clfs, x, y, config)
    assert sorted(res.probabilities.tolist()) == pytest.approx([1 / 3] * 3)
    # with a budget where the pairs hold with room to spare, the bound is met: optimal
    roomy = randomized_attack(clfs, x, y, cfg(eps=2.5, num_attacks=3, backend=backend))
    assert roomy.status == "optimal" and roomy.value == pytest.approx(0.5) and roomy.upper_bound == pytest.approx(0.5)


def test_status_optimal_needs_a_proven_and_rechecked_value() -> None:
    from phalanx.randomized.attack import proven_status

    assert proven_status("optimal", 0.5, 0.5) == "optimal"
    assert proven_status("optimal", 0.0, 0.5) == "feasible"  # the solver's optimum did not re-check
    assert proven_status("optimal", 0.5, None) == "feasible"  # nothing proven
    assert proven_status("optimal", None, 0.3, proven_below_alpha=True) == "infeasible"
    assert proven_status("optimal", None, None) == "unknown"
    assert proven_status("incomplete", 0.5, 0.5) == "optimal"  # an attack meeting a proven bound
    assert proven_status("incomplete", 0.4, 0.5) == "incomplete" and proven_status("timeout", None, None) == "timeout"
    assert proven_status("error", 0.5, 0.5) == "error"
