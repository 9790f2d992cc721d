"""Cross-check against an independent solver: for random linear binary classifiers the fooling
patterns are LPs (scipy), and the optimal Val follows by brute force over pattern assignments."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from phalanx.randomized.attack import RandomizedAttackConfig, Verdict, randomized_attack
from phalanx.randomized.objectives import maximal_patterns


def _pattern_feasible(w: np.ndarray, b: np.ndarray, x0: np.ndarray, eps: float, subset: tuple[int, ...],
                      margin: float = 1e-6) -> bool:
    """exists x' : ||x' - x0||_1 <= eps, w_c . x' + b_c >= margin for c in subset (scipy LP, with
    x' = x0 + u - v, u, v >= 0)."""
    from scipy.optimize import linprog

    if not subset:
        return True
    d = x0.size
    a_ub = [np.r_[np.ones(d), np.ones(d)]]
    b_ub = [eps]
    for c in subset:  # -(w (x0 + u - v) + b) <= -1e-6
        a_ub.append(np.r_[-w[c], w[c]])
        b_ub.append(w[c] @ x0 + b[c] - margin)
    res = linprog(np.zeros(2 * d), A_ub=np.array(a_ub), b_ub=np.array(b_ub), bounds=[(0, None)] * (2 * d))
    return bool(res.status == 0)


def _optimum(pats: list[list[frozenset[int]]], cn: int, a: int) -> float:
    from scipy.optimize import linprog

    n = len(pats)
    best = 0.0
    for combo in itertools.combinations_with_replacement(list(itertools.product(*[range(len(p)) for p in pats])), a):
        counts = np.array([[sum(c in pats[j][ch[j]] for j in range(n)) for c in range(cn)] for ch in combo])
        k = len(combo)
        res = linprog(np.r_[np.zeros(k), -1.0], A_ub=np.c_[-counts.T, np.full(cn, n)], b_ub=np.zeros(cn),
                      A_eq=np.r_[np.ones(k), 0.0][None], b_eq=[1.0], bounds=[(0, 1)] * (k + 1))
        best = max(best, -res.fun)
    return best


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 3), st.integers(1, 2), st.floats(0.3, 2.0))
def test_random_linear_classifiers(seed: int, cn: int, n: int, eps: float) -> None:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(cn, 2))
    b = -np.abs(rng.normal(size=cn)) - 0.05  # every classifier is right at the points (logit diff < 0)
    x0 = rng.normal(scale=0.1, size=(n, 2))
    b = b - np.maximum(0, (x0 @ w.T).max(0))  # keep w.x0 + b < 0 at every point
    models = []
    for c in range(cn):  # logits (0, w_c . x + b_c): label 0 is right iff w_c . x + b_c < 0
        m = nn.Sequential(nn.Linear(2, 2)).double()
        with torch.no_grad():
            m[0].weight.copy_(torch.tensor(np.stack([np.zeros(2), w[c]])))
            m[0].bias.copy_(torch.tensor([0.0, b[c]]))
        models.append(m)
    pats = [maximal_patterns([frozenset(s) for k in range(cn + 1) for s in itertools.combinations(range(cn), k)
                              if _pattern_feasible(w, b, x0[j], eps, s)]) for j in range(n)]
    x = torch.tensor(x0)
    y = torch.zeros(n, dtype=torch.long)
    for a in (1, cn):
        want = _optimum(pats, cn, a)
        for backend in ("decomposition", "milp"):
            res = randomized_attack(models, x, y, RandomizedAttackConfig(
                eps=eps, alpha=1.0, num_attacks=a, bounds=None, backend=backend, lemma2_shortcut=False,
                time_limit_s=60))
            assert res.value == pytest.approx(want, abs=1e-6), (backend, a)
            # a sound bound (never below the optimum), tight up to HiGHS's feasibility tolerance (1e-6)
            assert want - 1e-9 <= res.upper_bound <= want + 1e-5, (backend, a, res.upper_bound)
            if want < 1.0:
                assert res.verdict in (Verdict.ROBUST, Verdict.ROBUST_FOR_NUM_ATTACKS)


def _linear_models(w: np.ndarray, b: np.ndarray) -> list[nn.Module]:
    models = []
    for c in range(len(w)):  # logits (0, w_c . x + b_c): label 0 is right iff w_c . x + b_c < 0
        m = nn.Sequential(nn.Linear(w.shape[1], 2)).double()
        with torch.no_grad():
            m[0].weight.copy_(torch.tensor(np.stack([np.zeros(w.shape[1]), w[c]])))
            m[0].bias.copy_(torch.tensor([0.0, b[c]]))
        models.append(m)
    return models


def _patterns(w, b, x0, eps, margin):  # type: ignore[no-untyped-def]
    cn = len(w)
    return [maximal_patterns([frozenset(s) for k in range(cn + 1) for s in itertools.combinations(range(cn), k)
                              if _pattern_feasible(w, b, x0[j], eps, s, margin)]) for j in range(len(x0))]


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 3), st.integers(1, 2), st.sampled_from([1.0, 2.0, 3.0]))
def test_milp_and_decomposition_agree_with_ties(seed: int, cn: int, n: int, eps: float) -> None:
    """Axis-aligned classifiers at integer thresholds, integer points and budgets: some patterns
    are reachable only at exact ties (Def. 4 counts them; no float64 re-check can). Both backends
    must return the best attack that re-checks (the optimum over patterns with a margin), the
    bound over patterns with ties, and say "optimal" only when the two meet."""
    rng = np.random.default_rng(seed)
    w = np.zeros((cn, 2))
    w[np.arange(cn), rng.integers(0, 2, cn)] = rng.choice([-1.0, 1.0], cn)
    b = -rng.integers(1, 3, cn).astype(np.float64)  # fooled iff +-x_k >= 1 or 2
    x0 = rng.integers(-1, 1, (n, 2)).astype(np.float64) * (rng.random((n, 2)) < 0.5)
    b = b - np.maximum(0, (x0 @ w.T).max(0))  # every classifier is right at every point
    strict, ties = _patterns(w, b, x0, eps, 1e-6), _patterns(w, b, x0, eps, 0.0)
    x, y = torch.tensor(x0), torch.zeros(n, dtype=torch.long)
    for a in sorted({1, cn}):
        lo, hi = _optimum(strict, cn, a), _optimum(ties, cn, a)
        out = {}
        for backend in ("decomposition", "milp"):
            res = randomized_attack(_linear_models(w, b), x, y, RandomizedAttackConfig(
                eps=eps, alpha=1.0, num_attacks=a, bounds=None, backend=backend, lemma2_shortcut=False,
                time_limit_s=60))
            assert res.rechecked and res.value == pytest.approx(lo, abs=1e-6), (backend, a, res.notes)
            assert res.upper_bound == pytest.approx(hi, abs=1e-6), (backend, a)
            assert (res.status == "optimal") == (lo >= hi - 1e-9), (backend, res.status, lo, hi)
            out[backend] = res.value
        assert out["milp"] == pytest.approx(out["decomposition"], abs=1e-6)
