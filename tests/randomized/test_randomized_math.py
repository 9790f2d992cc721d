"""Pure mathematics of randomized attacks: eq. (1), Prop. 1, coupling, the pattern LP/MILP."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phalanx.errors import PhalanxError
from phalanx.randomized.objectives import (
    couple_distributions,
    loss_counts,
    maximal_patterns,
    misclassification_value,
    num_distinct_pattern_loss_vectors,
    optimal_pattern_attack,
    pattern_losses,
    prop1_attack_bound,
    sufficient_num_attacks,
)

F = frozenset


def test_value_by_hand() -> None:
    # 2 attacks, 2 classifiers, 2 points
    losses = np.array([[[1, 0], [0, 0]],    # attack 0: c0 wrong on x0
                       [[0, 0], [1, 1]]])   # attack 1: c1 wrong on both
    p = np.array([0.25, 0.75])
    # c0: (0.25 * 1 + 0) / 2 = 0.125 ; c1: 0.75 * 2 / 2 = 0.75
    assert misclassification_value(losses, p) == pytest.approx(0.125)
    assert loss_counts(losses).tolist() == [[1, 0], [0, 2]]
    with pytest.raises(PhalanxError):
        misclassification_value(losses, np.array([0.5, 0.6]))


def test_attack_count_bounds() -> None:
    assert prop1_attack_bound(4, 3) == 125
    assert sufficient_num_attacks(4, 3) == 3  # the LP-basis count |C|
    assert sufficient_num_attacks(4, 3, num_distinct_loss_vectors=2) == 2
    assert sufficient_num_attacks(1, 1) == 1


def test_maximal_patterns() -> None:
    pats = [F(), F({0}), F({1}), F({0, 1}), F({2})]
    assert maximal_patterns(pats) == [F({0, 1}), F({2})]
    assert maximal_patterns([]) == [F()]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=4), min_size=1, max_size=4))
def test_coupling_keeps_marginals(raw: list[list[float]]) -> None:
    dists = [np.asarray(d) / np.sum(d) for d in raw]
    atoms = couple_distributions(dists)
    assert sum(p for p, _ in atoms) == pytest.approx(1.0)
    assert len(atoms) <= sum(len(d) - 1 for d in dists) + 1
    for j, d in enumerate(dists):
        marg = np.zeros(len(d))
        for p, ch in atoms:
            marg[ch[j]] += p
        np.testing.assert_allclose(marg, d, atol=1e-9)


def test_figure1_patterns() -> None:
    """Gross et al. Fig. 1: one point, each classifier foolable alone, never both."""
    pats = [[F({0}), F({1})]]
    two = optimal_pattern_attack(pats, 2, 2)
    assert two.value == pytest.approx(0.5) and two.upper_bound == pytest.approx(0.5)
    assert sorted(two.probabilities.tolist()) == pytest.approx([0.5, 0.5])
    one = optimal_pattern_attack(pats, 2, 1)
    assert one.value == pytest.approx(0.0) and one.upper_bound == pytest.approx(0.0)
    feas = optimal_pattern_attack(pats, 2, 1, objective="feasibility", alpha=0.5)
    assert feas.status == "infeasible"
    # the paper's summed MaxMILP objective: one attack fooling one classifier is already optimal
    ms = optimal_pattern_attack(pats, 2, 2, objective="max-sum")
    assert ms.upper_bound == pytest.approx(0.5) and ms.value <= 0.5


def _brute_force(pats: list[list[frozenset[int]]], cn: int, a: int) -> float:
    """Optimal Val with at most ``a`` attacks: every assignment of patterns, then the p-LP by scipy."""
    from scipy.optimize import linprog

    n = len(pats)
    per_attack = list(itertools.product(*[range(len(p)) for p in pats]))
    best = 0.0
    for combo in itertools.combinations_with_replacement(per_attack, a):
        counts = np.array([[sum(c in pats[j][ch[j]] for j in range(n)) for c in range(cn)] for ch in combo])
        # max t  s.t.  counts^T p >= n t,  sum p = 1
        k = len(combo)
        res = linprog(np.r_[np.zeros(k), -1.0], A_ub=np.c_[-counts.T, np.full(cn, n)], b_ub=np.zeros(cn),
                      A_eq=np.r_[np.ones(k), 0.0][None], b_eq=[1.0], bounds=[(0, 1)] * k + [(0, 1)])
        best = max(best, -res.fun)
    return best


patterns_st = st.integers(2, 3).flatmap(lambda cn: st.tuples(
    st.just(cn),
    st.lists(st.lists(st.sets(st.integers(0, cn - 1), max_size=cn), min_size=1, max_size=3), min_size=1, max_size=3)))


@settings(max_examples=25, deadline=None)
@given(patterns_st)
def test_pattern_optimum_matches_brute_force(case: tuple[int, list[list[set[int]]]]) -> None:
    cn, raw = case
    pats = [maximal_patterns([F(s) for s in p]) for p in raw]
    for a in (1, 2, cn):
        got = optimal_pattern_attack(pats, cn, a)
        want = _brute_force(pats, cn, a)
        assert got.status == "optimal"
        assert got.upper_bound == pytest.approx(want, abs=1e-7)
        assert got.value == pytest.approx(want, abs=1e-7)
        assert len(got.probabilities) <= a
        # the attack's value recomputed from its own pattern losses
        losses = pattern_losses(pats, got.choices, cn)
        assert misclassification_value(losses, got.probabilities) == pytest.approx(got.value)
    # enough attacks: the LP route equals the MILP route with |A| = |C|
    lp = optimal_pattern_attack(pats, cn, cn)
    milp = optimal_pattern_attack(pats, cn, cn, force_milp=True)
    assert lp.value == pytest.approx(milp.value, abs=1e-7)
    assert num_distinct_pattern_loss_vectors(pats, cn) >= 1


def test_lemma2_full_patterns_give_value_one() -> None:
    pats = [[F({0, 1, 2})], [F({0, 1, 2})]]
    res = optimal_pattern_attack(pats, 3, 3)
    assert res.value == pytest.approx(1.0) and len(res.probabilities) == 1
