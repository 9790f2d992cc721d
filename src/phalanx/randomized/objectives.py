"""Pure mathematics of randomized attacks on classifier ensembles (Gross et al. 2022).

Notation of ``papers/gross2022-robustness-verification-classifier-ensembles.md``: a labelled
set X of N points, classifiers C, a randomized attack (A, P) of |A| deterministic attacks
with probabilities ``p``. A 0-1 loss tensor ``losses`` has shape (A, C, N):
``losses[i, c, j] = l_{0-1}(c, x^j, delta_i^j)`` (Def. 4).

Everything here is network-free: the misclassification value (eq. 1), the bounds on the number
of attacks (Prop. 1 and a sharper LP-basis count), the coupling of per-point pattern
distributions into attacks, and the small LP / MILP over *fooling patterns* that the
decomposition solves instead of the monolithic network MILP (see ``optimal_pattern_attack``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phalanx.errors import PhalanxError

Pattern = frozenset[int]
PROB_TOL = 1e-12


# ---------------------------------------------------------------------------------------------
# the misclassification value (Def. 5, eq. (1)) and the attack-count bounds (Prop. 1)
# ---------------------------------------------------------------------------------------------


def _check_losses(losses: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    loss = np.asarray(losses, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    if loss.ndim != 3 or loss.shape[0] != p.shape[0] or p.ndim != 1:
        raise PhalanxError(f"losses must have shape (A, C, N) and probabilities (A,), got "
                           f"{loss.shape} and {p.shape}")
    if loss.shape[1] < 1 or loss.shape[2] < 1:
        raise PhalanxError(f"need at least one classifier and one point, got losses {loss.shape}")
    if (p < -PROB_TOL).any() or abs(p.sum() - 1.0) > 1e-9:
        raise PhalanxError(f"probabilities must be >= 0 and sum to 1, got {p.tolist()}")
    return loss, p


def expected_losses(losses: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """(C,) mean expected 0-1 loss of every classifier: ``1/N sum_j E_{delta~P} l(c, x^j, delta)``."""
    loss, p = _check_losses(losses, probabilities)
    return np.einsum("a,acn->c", p, loss) / loss.shape[2]  # type: ignore[no-any-return]


def misclassification_value(losses: np.ndarray, probabilities: np.ndarray) -> float:
    """Val(A, P), Gross et al. eq. (1): the minimum over classifiers of the mean expected loss."""
    return float(expected_losses(losses, probabilities).min())


def loss_counts(losses: np.ndarray) -> np.ndarray:
    """(A, C) integer vectors ``M_c(delta_i) = sum_j l(c, x^j, delta_i^j)`` (section 4.1)."""
    return np.asarray(losses).sum(axis=2).astype(np.int64)  # type: ignore[no-any-return]


def prop1_attack_bound(num_points: int, num_classifiers: int) -> int:
    """Gross et al. Prop. 1: some optimal randomized attack has ``|A| <= (|X| + 1)^|C|``."""
    if num_points < 1 or num_classifiers < 1:
        raise PhalanxError(f"need >= 1 point and classifier, got {num_points}, {num_classifiers}")
    return int((num_points + 1) ** num_classifiers)


def sufficient_num_attacks(num_points: int, num_classifiers: int,
                           num_distinct_loss_vectors: int | None = None) -> int:
    """A number of attacks that suffices for the optimal value (hence for robustness proofs).

    The minimum of three counts, each sufficient on its own:

    - Prop. 1: ``(|X| + 1)^|C|`` (the number of possible loss vectors ``M(delta)``);
    - the number of *distinct* achievable loss vectors when it is known (the proof of Prop. 1
      merges attacks with equal ``M``, so only distinct achievable vectors matter);
    - ``|C|`` (not in the paper): by eq. (3) the optimal value is the LP
      ``max t  s.t.  sum_i p_i M_c(delta_i) >= |X| t  (c in C),  sum_i p_i = 1,  p >= 0``
      over the finitely many distinct vectors ``M(delta)``. It has ``|C| + 1`` rows, so a basic
      optimal solution has at most ``|C| + 1`` positive variables; when ``t > 0`` one of them is
      ``t``, leaving at most ``|C|`` positive ``p_i``; when ``t = 0`` one attack suffices.
    """
    bounds = [prop1_attack_bound(num_points, num_classifiers), num_classifiers]
    if num_distinct_loss_vectors is not None:
        if num_distinct_loss_vectors < 1:
            raise PhalanxError(f"num_distinct_loss_vectors must be >= 1, got {num_distinct_loss_vectors}")
        bounds.append(int(num_distinct_loss_vectors))
    return max(1, min(bounds))


def clean_probabilities(p: np.ndarray) -> np.ndarray:
    """Clip solver round-off (tiny negatives) and renormalise to an exact distribution."""
    q = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    q[q < 1e-10] = 0.0
    s = q.sum()
    if not s > 0:
        raise PhalanxError("probabilities are all zero")
    return q / s  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# fooling patterns: which subsets of classifiers one perturbation of one point can fool together
# ---------------------------------------------------------------------------------------------


def maximal_patterns(feasible: Sequence[Pattern]) -> list[Pattern]:
    """The inclusion-maximal sets among ``feasible`` (sorted: larger first, then lexicographic).

    Since the 0-1 loss only helps the attacker, an optimal attack can always be taken to fool
    a maximal feasible pattern at every point (more misclassification never lowers eq. (1))."""
    sets = {frozenset(s) for s in feasible} or {frozenset()}
    out = [s for s in sets if not any(s < t for t in sets)]
    return sorted(out, key=lambda s: (-len(s), sorted(s)))


def pattern_indicator(patterns: Sequence[Pattern], num_classifiers: int) -> np.ndarray:
    """(K, C) 0/1 matrix: row k has a one for every classifier fooled by pattern k."""
    m = np.zeros((len(patterns), num_classifiers), dtype=np.float64)
    for k, s in enumerate(patterns):
        for c in s:
            if not 0 <= c < num_classifiers:
                raise PhalanxError(f"pattern {sorted(s)} names classifier {c}; accepted 0..{num_classifiers - 1}")
            m[k, c] = 1.0
    return m


def num_distinct_pattern_loss_vectors(patterns: Sequence[Sequence[Pattern]], num_classifiers: int,
                                      cap: int = 100_000) -> int:
    """How many distinct loss vectors ``M(delta)`` deterministic attacks built from the given
    per-point patterns can produce (a sharper count for Prop. 1); ``cap`` bounds the work."""
    sums: set[tuple[int, ...]] = {tuple([0] * num_classifiers)}
    for pats in patterns:
        rows = pattern_indicator(list(pats), num_classifiers).astype(np.int64)
        sums = {tuple(int(a + b) for a, b in zip(s, r, strict=True)) for s in sums for r in rows}
        if len(sums) > cap:
            return cap
    return len(sums)


def couple_distributions(dists: Sequence[Sequence[float] | np.ndarray]) -> list[tuple[float, tuple[int, ...]]]:
    """Quantile coupling of one distribution per point into a list of ``(prob, choice)`` atoms.

    ``dists[j][k]`` is the probability of option ``k`` at point ``j``. Each atom picks one
    option per point; the atoms' marginals equal ``dists`` exactly, and there are at most
    ``sum_j (|supp_j| - 1) + 1`` atoms (the breakpoints of the cumulative sums)."""
    cums = []
    for j, d in enumerate(dists):
        q = np.asarray(d, dtype=np.float64)
        if q.ndim != 1 or (q < -PROB_TOL).any() or abs(q.sum() - 1) > 1e-7:
            raise PhalanxError(f"distribution of point {j} is not a distribution: {q.tolist()}")
        cums.append(np.cumsum(np.clip(q, 0, None)) / np.clip(q, 0, None).sum())
    cuts = sorted({0.0, 1.0, *(float(v) for c in cums for v in c[:-1])})
    atoms: list[tuple[float, tuple[int, ...]]] = []
    for lo, hi in itertools.pairwise(cuts):
        if hi - lo <= 1e-12:
            continue
        mid = 0.5 * (lo + hi)
        choice = tuple(min(int(np.searchsorted(c, mid, side="right")), len(c) - 1) for c in cums)
        atoms.append((hi - lo, choice))
    return merge_atoms(atoms)


def merge_atoms(atoms: Sequence[tuple[float, Hashable]]) -> list[tuple[float, Any]]:
    """Merge atoms with equal choices (Prop. 1's proof step) and drop zero-probability ones."""
    merged: dict[Hashable, float] = {}
    for prob, key in atoms:
        if prob > PROB_TOL:
            merged[key] = merged.get(key, 0.0) + prob
    return [(p, k) for k, p in merged.items()]


# ---------------------------------------------------------------------------------------------
# the decomposition: the optimal randomized attack as an LP / small MILP over fooling patterns
# ---------------------------------------------------------------------------------------------

OBJECTIVES = ("max-min", "max-sum", "feasibility")


@dataclass
class PatternAttack:
    """An optimal (or best found) randomized attack over fooling patterns.

    ``choices[i, j]`` is the index (into ``patterns[j]``) of the pattern attack ``i`` uses at
    point ``j``; ``probabilities[i]`` is ``P(delta_i)``. ``value`` is Val of this attack computed
    from the patterns; ``upper_bound`` is a proven upper bound on the objective's best Val (for
    ``max-sum`` it bounds Val via ``Val <= sum / (|C| |X|)``), ``None`` when nothing was proven.
    ``status`` is ``optimal``, ``infeasible`` (feasibility objective only), ``timeout`` or ``error``.
    """

    status: str
    value: float
    probabilities: np.ndarray
    choices: np.ndarray
    upper_bound: float | None
    method: str
    stats: dict[str, Any] = field(default_factory=dict)


def pattern_losses(patterns: Sequence[Sequence[Pattern]], choices: np.ndarray, num_classifiers: int) -> np.ndarray:
    """(A, C, N) 0-1 losses of attacks that fool ``patterns[j][choices[i, j]]`` at point j."""
    a, n = choices.shape
    out = np.zeros((a, num_classifiers, n), dtype=np.int64)
    for i in range(a):
        for j in range(n):
            for c in patterns[j][int(choices[i, j])]:
                out[i, c, j] = 1
    return out


def _check_patterns(patterns: Sequence[Sequence[Pattern]], num_classifiers: int) -> list[list[Pattern]]:
    if len(patterns) < 1:
        raise PhalanxError("need patterns for at least one point")
    out = []
    for j, pats in enumerate(patterns):
        ps = [frozenset(s) for s in pats]
        if not ps:
            raise PhalanxError(f"point {j} has no pattern (the empty pattern is always feasible; pass it)")
        pattern_indicator(ps, num_classifiers)  # validates classifier indices
        out.append(ps)
    return out


def optimal_pattern_attack(
    patterns: Sequence[Sequence[Pattern]], num_classifiers: int, num_attacks: int, *,
    objective: str = "max-min", alpha: float | None = None, time_limit_s: float = 60.0,
    force_milp: bool = False,
) -> PatternAttack:
    """The best randomized attack with at most ``num_attacks`` attacks, given per point the
    (maximal) fooling patterns, with no network inside.

    Exact reformulation. A deterministic attack picks at point j a perturbation, whose set of
    fooled classifiers is a feasible pattern; by monotonicity of eq. (1) it may be taken maximal.
    So (A, P) is a choice ``S_ij`` of pattern per attack and point plus ``p``, with
    ``Val = min_c 1/N sum_j sum_i p_i [c in S_ij]``.

    - With ``|A| >= |C|`` (enough by ``sufficient_num_attacks``) only the per-point marginals
      ``q_j(S) = sum_{i: S_ij = S} p_i`` matter, so the optimum is the LP
      ``max t  s.t.  1/N sum_j sum_S q_j(S) [c in S] >= t (c in C),  q_j in simplex``.
      Its solution is turned into attacks by quantile coupling (``couple_distributions``), then
      reduced to at most ``|C|`` attacks by the attack-level LP of ``sufficient_num_attacks``
      (a basic solution over the coupled attacks' loss vectors; the value does not change).
    - With fewer attacks, a small MILP: binaries ``z_ijS`` (one pattern per attack and point),
      ``w_ijS = p_i z_ijS`` linearised exactly by ``sum_S w_ijS = p_i, 0 <= w_ijS <= z_ijS``, and
      ``p_1 >= ... >= p_|A|`` to break the symmetry between attacks.

    ``objective``: ``max-min`` maximises Val (eq. 1); ``max-sum`` the paper's MaxMILP objective
    ``sum_c sum_j sum_i p_i l_ijc`` (section 6.1); ``feasibility`` finds any attack with
    ``Val >= alpha`` (eqs. (4)-(7)) or proves there is none (status ``infeasible``).
    """
    from phalanx.verification.milp import MilpModel

    if objective not in OBJECTIVES:
        raise PhalanxError(f"unknown objective {objective!r}; accepted: {', '.join(OBJECTIVES)}")
    if objective == "feasibility" and alpha is None:
        raise PhalanxError("the feasibility objective needs alpha")
    if not isinstance(num_attacks, int) or num_attacks < 1:
        raise PhalanxError(f"num_attacks must be an integer >= 1, got {num_attacks!r}")
    pats = _check_patterns(patterns, num_classifiers)
    n, cn = len(pats), num_classifiers
    use_lp = (num_attacks >= cn and not force_milp) or all(len(p) == 1 for p in pats)
    a = num_attacks

    model = MilpModel()
    t = model.add_var(0.0, 1.0)
    # q[j][k]: the LP marginals, or w[i][j][k] = p_i z_ijk in the MILP
    if use_lp:
        q = [model.add_vars(np.zeros(len(p)), np.ones(len(p))) for p in pats]
        for j in range(n):
            model.add_row(list(q[j]), [1.0] * len(pats[j]), 1.0, 1.0)
        terms = [(q[j][k], pats[j][k]) for j in range(n) for k in range(len(pats[j]))]
        p_ids: np.ndarray = np.zeros(0, dtype=np.int64)
        z_ids: list[list[np.ndarray]] = []
        w_ids: list[list[np.ndarray]] = []
    else:
        p_ids = model.add_vars(np.zeros(a), np.ones(a))
        model.add_row(list(p_ids), [1.0] * a, 1.0, 1.0)
        for i in range(a - 1):  # symmetry breaking: p_1 >= p_2 >= ...
            model.add_row([int(p_ids[i]), int(p_ids[i + 1])], [1.0, -1.0], 0.0, math.inf)
        z_ids, w_ids, terms = [], [], []
        for i in range(a):
            zi, wi = [], []
            for j in range(n):
                k = len(pats[j])
                z = model.add_vars(np.zeros(k), np.ones(k), integer=True)
                w = model.add_vars(np.zeros(k), np.ones(k))
                model.add_row(list(z), [1.0] * k, 1.0, 1.0)
                model.add_row([*w, int(p_ids[i])], [1.0] * k + [-1.0], 0.0, 0.0)
                for kk in range(k):
                    model.add_row([int(w[kk]), int(z[kk])], [1.0, -1.0], -math.inf, 0.0)
                    terms.append((w[kk], pats[j][kk]))
                zi.append(z)
                wi.append(w)
            z_ids.append(zi)
            w_ids.append(wi)
    # t <= 1/N sum over terms fooling c   (for every classifier c)
    for c in range(cn):
        idx = [int(v) for v, s in terms if c in s]
        model.add_row([*idx, t], [1.0 / n] * len(idx) + [-1.0], 0.0, math.inf)
    if objective == "max-min":
        model.set_objective([t], [1.0], sense="max")
    elif objective == "max-sum":
        idx = [int(v) for v, s in terms if s]
        model.set_objective(idx, [float(len(s)) for v, s in terms if s], sense="max")
    else:
        model.add_row([t], [1.0], float(alpha), math.inf)  # type: ignore[arg-type]
        model.set_objective([t], [0.0], sense="max")
    out = model.solve(time_limit_s)
    method = "pattern-lp" if use_lp else "pattern-milp"
    if out.status == "infeasible":  # only the feasibility objective can be infeasible
        return PatternAttack("infeasible", 0.0, np.zeros(0), np.zeros((0, n), dtype=np.int64), None, method)
    if out.values is None or out.status not in ("optimal", "timeout"):
        return PatternAttack(out.status if out.status != "optimal" else "error", 0.0, np.zeros(0),
                             np.zeros((0, n), dtype=np.int64), None, method)
    vals = np.asarray(out.values, dtype=np.float64)
    if use_lp:
        dists = [clean_probabilities(vals[q[j]]) for j in range(n)]
        atoms = couple_distributions(dists)
        probs = np.array([pr for pr, _ in atoms])
        choices = np.array([ch for _, ch in atoms], dtype=np.int64).reshape(len(atoms), n)
        if len(atoms) > num_attacks or len(atoms) > cn:
            probs, choices = _reduce_attacks(probs, choices, pats, cn, objective)
        if len(probs) > num_attacks:  # only when the optimal value is 0 or the LP was degenerate
            return optimal_pattern_attack(pats, cn, num_attacks, objective=objective, alpha=alpha,
                                          time_limit_s=time_limit_s, force_milp=True)
    else:
        probs = clean_probabilities(vals[p_ids])
        choices = np.array([[int(np.argmax(vals[z_ids[i][j]])) for j in range(n)] for i in range(a)],
                           dtype=np.int64).reshape(a, n)
        keep = probs > 0
        probs, choices = clean_probabilities(probs[keep]), choices[keep]
    losses = pattern_losses(pats, choices, cn)
    value = misclassification_value(losses, probs)
    upper: float | None = None
    if out.status == "optimal" and out.objective is not None:
        if objective == "max-min":
            upper = float(out.objective)
        elif objective == "max-sum":
            upper = float(out.objective) / (cn * n)
    stats: dict[str, Any] = {"num_patterns": [len(p) for p in pats], "solver_status": out.status}
    if out.status != "optimal" and out.dual_bound is not None and math.isfinite(out.dual_bound):
        # recorded only: a bound after a time limit is never used for a verdict (DESIGN.md)
        stats["dual_bound_at_timeout"] = float(out.dual_bound) / (1.0 if objective == "max-min" else cn * n)
    return PatternAttack(out.status, value, probs, choices, upper, method, stats)


def _reduce_attacks(probs: np.ndarray, choices: np.ndarray, pats: Sequence[Sequence[Pattern]],
                    cn: int, objective: str) -> tuple[np.ndarray, np.ndarray]:
    """Re-weight coupled attacks by the attack-level LP of ``sufficient_num_attacks``; the basic
    solution HiGHS returns keeps at most ``|C|`` attacks when the value is positive."""
    from phalanx.verification.milp import MilpModel

    counts = loss_counts(pattern_losses(pats, choices, cn)).astype(np.float64)  # (K, C)
    k = counts.shape[0]
    model = MilpModel()
    t = model.add_var(0.0, float(len(pats)))
    p = model.add_vars(np.zeros(k), np.ones(k))
    model.add_row(list(p), [1.0] * k, 1.0, 1.0)
    for c in range(cn):
        model.add_row([*p, t], [*counts[:, c], -1.0], 0.0, math.inf)
    if objective == "max-sum":
        model.set_objective(list(p), list(counts.sum(1)), sense="max")
    else:
        model.set_objective([t], [1.0], sense="max")
    out = model.solve(30.0)
    if out.status != "optimal" or out.values is None:
        return probs, choices
    new = clean_probabilities(np.asarray(out.values, dtype=np.float64)[p])
    keep = new > 0
    old_val = misclassification_value(pattern_losses(pats, choices, cn), probs)
    cand = clean_probabilities(new[keep])
    if misclassification_value(pattern_losses(pats, choices[keep], cn), cand) + 1e-9 < old_val:
        return probs, choices
    return cand, choices[keep]
