"""Optimal randomized attacks on classifier ensembles and (eps, alpha)-robustness proofs
(Gross et al. 2022, ``papers/gross2022-robustness-verification-classifier-ensembles.md``).

Given classifiers C, a labelled set X, |A| and an eps-budget, ``randomized_attack`` finds a
randomized attack (A, P) with misclassification value Val (eq. 1) >= alpha, computes the optimal
value, or proves that no such attack exists (Def. 6). Three backends:

- ``decomposition`` (not in the paper): per point, the *fooling patterns* (subsets of classifiers
  one perturbation fools together, ``randomized.patterns``); then the optimal attack is a small
  LP / MILP over patterns with no network inside (``objectives.optimal_pattern_attack``);
- ``milp``: the paper's monolithic MILP, eqs. (4)-(8) (``milp``);
- ``smt``: the paper's z3 encoding, the baseline (``smt``).

Shortcuts: Lemma 2 (alpha = 1: Val = 1 iff one deterministic attack fools every classifier on
every point — decided point by point) and Prop. 1 / ``sufficient_num_attacks`` to choose |A|.
Every returned attack is re-checked by the float64 PyTorch models and its Val recomputed from the
returned probabilities; robustness is only claimed from proofs (bounds, infeasible models, closed
gaps), never from a time limit. Also the paper's comparison attackers (table 3):
``comparison_attackers`` gives the uniform attacker (UA) and the best deterministic attacker (BDA).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from phalanx.errors import PhalanxError
from phalanx.randomized.objectives import (
    PatternAttack,
    clean_probabilities,
    expected_losses,
    misclassification_value,
    num_distinct_pattern_loss_vectors,
    optimal_pattern_attack,
    prop1_attack_bound,
    sufficient_num_attacks,
)
from phalanx.randomized.patterns import PointPatterns
from phalanx.randomized.problem import (
    BACKENDS,
    VALUE_TOL,
    Classifiers,
    RandomizedAttackConfig,
    RandomizedAttackResult,
    Verdict,
    into_ball,
    prepare_classifiers,
    recheck_attack,
)
from phalanx.types import Norm

log = logging.getLogger(__name__)

PROOF_TOL = 1e-6  # a solver's upper bound must be below alpha by this much to claim robustness

__all__ = [
    "BACKENDS", "PatternAttack", "PointPatterns", "RandomizedAttackConfig", "RandomizedAttackResult", "Verdict",
    "comparison_attackers", "expected_losses", "fooling_patterns", "misclassification_value", "optimal_pattern_attack",
    "prop1_attack_bound", "randomized_attack", "recheck_attack", "sufficient_num_attacks",
]


def proven_status(status: str, value: float | None, upper: float | None, proven_below_alpha: bool = False) -> str:
    """The status a result may carry: ``optimal`` exactly when the float64 re-checked Val reaches
    a proven upper bound (whatever the solver said: a solver's optimum over tie-only patterns is
    no attack, and an incomplete pattern search whose attack meets the bound is optimal);
    a solver's ``optimal`` otherwise becomes ``feasible`` (an attack, optimality unproven),
    ``infeasible`` (a robustness proof) or ``unknown``; other statuses (``incomplete``,
    ``timeout``, ...) stay."""
    if value is not None and upper is not None and value >= upper - VALUE_TOL and status != "error":
        return "optimal"
    if status == "optimal":
        return "feasible" if value is not None else ("infeasible" if proven_below_alpha else "unknown")
    return status


def _as_arrays(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | Sequence[int],
               config: RandomizedAttackConfig) -> tuple[np.ndarray, np.ndarray]:
    xa = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    ya = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    ya = ya.astype(np.int64).reshape(-1)
    if xa.ndim < 2 or xa.shape[0] != ya.shape[0] or xa.shape[0] < 1:
        raise PhalanxError(f"x must be (N, *in_shape) with one label per point, got {xa.shape} and {ya.shape}")
    if config.bounds is not None and ((xa < config.bounds[0]).any() or (xa > config.bounds[1]).any()):
        raise PhalanxError(f"data points lie outside the input bounds {config.bounds}")
    return xa, ya


class _Run:
    """One query's state: prepared classifiers, pattern solver, deadline, bookkeeping."""

    def __init__(self, classifiers: Sequence[nn.Module], x: np.ndarray, y: np.ndarray,
                 config: RandomizedAttackConfig, progress: bool) -> None:
        from phalanx.randomized.patterns import PatternSolver

        self.t0 = time.perf_counter()
        self.cfg = config
        self.clf: Classifiers = prepare_classifiers(classifiers, x.shape[1:])
        if (y < 0).any() or (y >= self.clf.num_classes).any():
            raise PhalanxError(f"labels must be in 0..{self.clf.num_classes - 1}, got {sorted(set(y.tolist()))}")
        self.x, self.y = x, y
        self.n, self.cn = x.shape[0], len(self.clf)
        self.solver = PatternSolver(self.clf, x, y, config)
        self.deadline = self.t0 + config.time_limit_s
        self.progress = progress
        self.notes: list[str] = []
        self.stats: dict[str, Any] = {}

    # --- final assembly ------------------------------------------------------------------------
    def finish(self, status: str, attacks: np.ndarray | None, probs: np.ndarray | None,
               upper: float | None, num_attacks: int, sufficient: int, *,
               solver_value: float | None = None, proven_below_alpha: bool = False) -> RandomizedAttackResult:
        cfg = self.cfg
        value: float | None = None
        losses = np.zeros((0, self.cn, self.n), dtype=np.int64)
        per_c = np.zeros(self.cn)
        rechecked = False
        if attacks is not None and probs is not None and len(probs) > 0:
            keep = clean_probabilities(probs) > 0
            attacks, probs = attacks[keep], clean_probabilities(probs[keep])
            rc = recheck_attack(self.clf, self.x, self.y, attacks, probs, cfg)
            losses, per_c = rc.losses, rc.per_classifier
            if rc.in_ball:
                value, rechecked = rc.value, True
                if solver_value is not None and rc.value + VALUE_TOL < solver_value:
                    self.notes.append(f"re-check gives Val {rc.value:.6g} below the solver's {solver_value:.6g}")
            else:
                self.notes.append(f"returned attack leaves the eps-ball or box (max norm {rc.max_norm:.6g}); rejected")
        else:
            attacks = np.zeros((0, *self.x.shape))
            probs = np.zeros(0)
        if upper is not None and value is not None and value > upper + PROOF_TOL:
            # a real attack beats the "proven" bound: the bound is wrong, so it proves nothing
            self.notes.append(f"re-checked Val {value:.6g} exceeds the solver's upper bound {upper:.6g}; bound dropped")
            upper = None
        before, status = status, proven_status(status, value, upper, proven_below_alpha)
        if before == "optimal" and status != "optimal":
            self.notes.append(f"status {status}, not optimal: no re-checked Val reaches a proven upper bound")
        if value is not None and value >= cfg.alpha - VALUE_TOL:
            verdict = Verdict.NOT_ROBUST
        elif proven_below_alpha or (upper is not None and upper < cfg.alpha - PROOF_TOL):
            verdict = Verdict.ROBUST if num_attacks >= sufficient else Verdict.ROBUST_FOR_NUM_ATTACKS
        else:
            verdict = Verdict.UNKNOWN
        self.stats["milp_pattern_queries"] = self.solver.num_milp
        return RandomizedAttackResult(
            verdict=verdict, value=value, upper_bound=upper, alpha=float(cfg.alpha), eps=float(cfg.eps),
            norm=Norm.parse(cfg.norm).value, num_attacks=int(num_attacks), sufficient_num_attacks=int(sufficient),
            probabilities=probs, attacks=attacks.reshape(len(probs), *self.x.shape), losses=losses,
            per_classifier=per_c, backend=cfg.backend, objective=cfg.objective, status=status,
            wall_time_s=time.perf_counter() - self.t0, solver_value=solver_value, rechecked=rechecked,
            notes=self.notes, stats=self.stats)

    def repair(self, attacks: np.ndarray, patterns: list[list[frozenset[int]]]) -> np.ndarray:
        """Solvers answer with margin 0, so a witness may sit on a tie; re-solve those (attack,
        point) pairs as pattern queries with the attack margin (the networks are small MILPs)."""
        from phalanx.randomized.patterns import fooled_set

        out = attacks.copy()
        fixed = failed = 0
        for i, row in enumerate(patterns):
            for j, s in enumerate(row):
                if not s or s <= fooled_set(self.clf, out[i, j].reshape(-1), int(self.y[j])):
                    continue
                w = self.solver.witness_with_margin(j, s, self.deadline)
                if w is not None:
                    out[i, j] = w.reshape(out[i, j].shape)
                    fixed += 1
                else:
                    failed += 1
        if fixed or failed:
            self.stats["tie_repairs"] = {"fixed": fixed, "failed": failed}
        return out

    # --- Lemma 2 ---------------------------------------------------------------------------------
    def lemma2(self) -> RandomizedAttackResult | None:
        """alpha = 1: Val = 1 iff a deterministic attack fools all classifiers on all points
        (Gross et al. Lemma 2), i.e. iff the full pattern is feasible at every point."""
        from phalanx.randomized.patterns import enumerate_patterns

        full = frozenset(range(self.cn))
        witnesses, proven_out = [], False
        for j in range(self.n):
            pp = enumerate_patterns(self.solver, j, self.deadline, stop_unless_full=True)
            st = pp.status(full)
            if st == "feasible":
                witnesses.append(pp.witness(full))
            else:
                proven_out = proven_out or st == "infeasible"
                break
        suff = sufficient_num_attacks(self.n, self.cn)
        a = self.cfg.num_attacks or suff
        self.stats["lemma2"] = "value 1" if len(witnesses) == self.n else ("refuted" if proven_out else "undecided")
        if len(witnesses) == self.n:
            atk = np.stack(witnesses)[None]
            return self.finish("optimal", atk, np.ones(1), 1.0, a, suff, solver_value=1.0)
        if proven_out:
            # some point has a classifier that no perturbation fools together with the others:
            # summed over classifiers its expected losses are <= |C| - 1, so Val <= 1 - 1/(N |C|)
            self.notes.append("Lemma 2: the full pattern is infeasible at a point, so Val < 1 for every |A|")
            return self.finish("infeasible", None, None, 1.0 - 1.0 / (self.n * self.cn), suff, suff,
                               proven_below_alpha=True)
        return None

    # --- backends -------------------------------------------------------------------------------
    def decomposition(self) -> RandomizedAttackResult:
        from phalanx.randomized.patterns import enumerate_patterns

        cfg = self.cfg
        it: Any = range(self.n)
        if self.progress:
            from tqdm import tqdm

            it = tqdm(it, desc="fooling patterns", unit="point")
        pts = [enumerate_patterns(self.solver, j, self.deadline) for j in it]
        lower = [pp.lower() for pp in pts]
        upper_p = [pp.upper() for pp in pts]
        complete = all(pp.complete for pp in pts)
        distinct = num_distinct_pattern_loss_vectors(upper_p, self.cn)
        suff = sufficient_num_attacks(self.n, self.cn, distinct)
        a = cfg.num_attacks or suff
        self.stats.update(
            patterns=[[sorted(s) for s in pl] for pl in lower], patterns_complete=complete,
            unknown_patterns=[[sorted(s) for s in pp.unknown] for pp in pts],
            pattern_queries=sum(len(pp.records) for pp in pts), distinct_loss_vectors=distinct,
            pattern_time_s=time.perf_counter() - self.t0)
        left = max(self.deadline - time.perf_counter(), 1.0)
        pa = optimal_pattern_attack(lower, self.cn, a, objective=cfg.objective, alpha=cfg.alpha, time_limit_s=left)
        self.stats["pattern_solver"] = pa.method
        upper: float | None = pa.upper_bound if complete else None
        proven = complete and cfg.objective == "feasibility" and pa.status == "infeasible"
        if cfg.objective != "max-min" or not complete:
            ub = optimal_pattern_attack(upper_p, self.cn, a, objective="max-min",
                                        time_limit_s=max(self.deadline - time.perf_counter(), 1.0))
            if ub.upper_bound is not None:
                upper = ub.upper_bound if upper is None else min(upper, ub.upper_bound)
        attacks = None
        if len(pa.probabilities):
            attacks = np.stack([np.stack([pts[j].witness(lower[j][int(pa.choices[i, j])]) for j in range(self.n)])
                                for i in range(len(pa.probabilities))])
        status = "optimal" if complete and pa.status in ("optimal", "infeasible") else (
            "incomplete" if not complete else pa.status)
        return self.finish(status, attacks, pa.probabilities, upper, a, suff, solver_value=pa.value,
                           proven_below_alpha=proven)

    def milp(self) -> RandomizedAttackResult:
        """The monolithic MILP at margin 0 (its optimum is the proven upper bound, its
        infeasibility the robustness proof); when the re-check of its attack falls short of what
        it claimed (patterns that hold only at exact ties), once more at the attack margin, whose
        attacks re-check; the better re-checked attack is returned."""
        from phalanx.randomized.milp import solve_monolithic_milp

        cfg = self.cfg
        suff = sufficient_num_attacks(self.n, self.cn)
        a = cfg.num_attacks or suff
        raw = solve_monolithic_milp(self.solver, a, cfg.objective, cfg.alpha, self.deadline)
        self.stats.update(raw.stats)
        best = self._milp_candidate(raw, a)
        chosen = raw
        if (best is not None and best[3] + VALUE_TOL < best[2] and cfg.margin > 0
                and time.perf_counter() < self.deadline):
            again = solve_monolithic_milp(self.solver, a, cfg.objective, cfg.alpha, self.deadline, margin=cfg.margin)
            self.stats["margin_solve"] = again.stats
            other = self._milp_candidate(again, a)
            self.notes.append(f"the margin-0 attack re-checks at Val {best[3]:.6g} below its claimed {best[2]:.6g} "
                              f"(exact ties); re-solved at margin {cfg.margin:g}: "
                              + (f"Val {other[3]:.6g}" if other is not None else again.status))
            if other is not None and other[3] > best[3]:
                best, chosen = other, again
        proven = cfg.objective == "feasibility" and raw.status == "infeasible"
        attacks, probs, claimed = (best[0], best[1], best[2]) if best is not None else (None, None, None)
        return self.finish(chosen.status, attacks, probs, raw.upper_bound, a, suff,
                           solver_value=claimed, proven_below_alpha=proven)

    def _milp_candidate(self, raw: Any, a: int) -> tuple[np.ndarray, np.ndarray, float, float] | None:
        """``(attacks, probabilities, claimed Val, re-checked Val)`` of a MILP answer: the attack
        moved into the ball against round-off and its tie witnesses repaired to the margin."""
        from phalanx.randomized.objectives import misclassification_value

        if raw.attacks is None or raw.patterns is None or raw.probabilities is None:
            return None
        cfg = self.cfg
        probs = clean_probabilities(raw.probabilities)
        loss = np.zeros((a, self.cn, self.n))
        for i, row in enumerate(raw.patterns):
            for j, s in enumerate(row):
                loss[i, list(s), j] = 1
        claimed = misclassification_value(loss, probs)
        flat = raw.attacks.reshape(a, self.n, -1)
        flat = np.stack([np.stack([into_ball(self.x[j].reshape(-1), flat[i, j], cfg.eps, Norm.parse(cfg.norm),
                                             cfg.bounds) for j in range(self.n)]) for i in range(a)])
        attacks = self.repair(flat, raw.patterns)
        value = recheck_attack(self.clf, self.x, self.y, attacks, raw.probabilities, cfg).value
        return attacks, raw.probabilities, claimed, value

    def smt(self) -> RandomizedAttackResult:
        from phalanx.randomized.smt import solve_smt

        cfg = self.cfg
        suff = sufficient_num_attacks(self.n, self.cn)
        a = cfg.num_attacks or suff
        raw = solve_smt(self.solver, a, self.deadline)
        self.stats.update(raw.stats)
        proven = raw.status == "infeasible"
        return self.finish(raw.status, raw.attacks, raw.probabilities, raw.upper_bound, a, suff,
                           solver_value=raw.solver_value, proven_below_alpha=proven)


def randomized_attack(
    classifiers: Sequence[nn.Module], x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | Sequence[int],
    config: RandomizedAttackConfig, *, progress: bool = False,
) -> RandomizedAttackResult:
    """Find an (optimal) eps-bounded randomized attack on ``classifiers`` over the labelled points
    ``(x, y)``, or prove the ensemble (eps, alpha)-robust (Gross et al. Def. 6).

    ``x``: (N, *in_shape) points (the models' input space, e.g. [0, 1] pixels); ``y``: (N,)
    labels. The inputs and models are not modified. See :class:`RandomizedAttackConfig`."""
    xa, ya = _as_arrays(x, y, config)
    run = _Run(classifiers, xa, ya, config, progress)
    if config.lemma2_shortcut and config.alpha >= 1.0 and config.backend != "smt":
        res = run.lemma2()
        if res is not None:
            return res
    if config.backend == "decomposition":
        return run.decomposition()
    if config.backend == "milp":
        return run.milp()
    return run.smt()


def fooling_patterns(
    classifiers: Sequence[nn.Module], x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | Sequence[int],
    config: RandomizedAttackConfig, *, progress: bool = False,
) -> list[PointPatterns]:
    """Per point, which subsets of the classifiers one eps-bounded perturbation fools together
    (with a witness for each feasible pattern): the network part of the decomposition."""
    from phalanx.randomized.patterns import enumerate_patterns

    xa, ya = _as_arrays(x, y, config)
    run = _Run(classifiers, xa, ya, config, progress)
    it: Any = range(run.n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="fooling patterns", unit="point")
    return [enumerate_patterns(run.solver, j, run.deadline) for j in it]


def comparison_attackers(
    classifiers: Sequence[nn.Module], x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | Sequence[int],
    config: RandomizedAttackConfig,
) -> dict[str, RandomizedAttackResult]:
    """The paper's alternative attackers (section 6.1, table 3).

    For every classifier c an optimal single-classifier attack ``delta_c`` (per point, a
    perturbation misclassified by c whenever one exists: the pattern query {c}); the *uniform
    attacker* plays ``{delta_c : c in C}`` uniformly; the *best deterministic attacker* plays the
    ``delta_c`` with the largest Val. Both are re-checked like every other attack."""
    xa, ya = _as_arrays(x, y, config)
    run = _Run(classifiers, xa, ya, config, progress=False)
    n, cn = run.n, run.cn
    deltas = np.zeros((cn, n, xa[0].size))
    for c in range(cn):
        for j in range(n):
            status, w, _ = run.solver.query(j, frozenset({c}), run.deadline)
            deltas[c, j] = w if status == "feasible" and w is not None else xa[j].reshape(-1)
    suff = sufficient_num_attacks(n, cn)
    ua = run.finish("heuristic", deltas, np.full(cn, 1.0 / cn), None, cn, suff)
    ua.backend, ua.objective = "uniform-attacker", "uniform"
    vals = [recheck_attack(run.clf, xa, ya, deltas[c:c + 1], np.ones(1), config).value for c in range(cn)]
    best = int(np.argmax(vals))
    run2 = _Run(classifiers, xa, ya, config, progress=False)
    bda = run2.finish("heuristic", deltas[best:best + 1], np.ones(1), None, 1, suff)
    bda.backend, bda.objective = "best-deterministic-attacker", "deterministic"
    bda.stats["chosen_classifier"] = best
    return {"uniform": ua, "best_deterministic": bda}
