"""Optimal randomized attacks on classifier ensembles and (eps, alpha)-robustness proofs (Gross et al. 2022).

Modules: ``attack`` (the entry point, :func:`randomized_attack`), ``problem`` (configuration, results, the
float64 re-check), ``objectives`` (misclassification values, Proposition 1, the pattern LP/MILP), ``patterns``
(fooling patterns per point), ``encoding`` (per-member MILP constraints, on :mod:`phalanx.verification`'s IR and
encoder), ``milp`` and ``smt`` (the paper's monolithic encodings), ``digits`` (the binary digits benchmark) and
``report``. The IR, bounds and MILP encoder are shared with :mod:`phalanx.verification` through its public names.
"""

from phalanx.randomized.attack import (
    BACKENDS,
    PatternAttack,
    PointPatterns,
    RandomizedAttackConfig,
    RandomizedAttackResult,
    Verdict,
    comparison_attackers,
    expected_losses,
    fooling_patterns,
    misclassification_value,
    optimal_pattern_attack,
    prop1_attack_bound,
    randomized_attack,
    recheck_attack,
    sufficient_num_attacks,
)

__all__ = [
    "BACKENDS",
    "PatternAttack",
    "PointPatterns",
    "RandomizedAttackConfig",
    "RandomizedAttackResult",
    "Verdict",
    "comparison_attackers",
    "expected_losses",
    "fooling_patterns",
    "misclassification_value",
    "optimal_pattern_attack",
    "prop1_attack_bound",
    "randomized_attack",
    "recheck_attack",
    "sufficient_num_attacks",
]
