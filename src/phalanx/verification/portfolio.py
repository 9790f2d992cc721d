"""The joint-attack verifier (SAT only) and the portfolio: an ordered, configurable list of
stages (forward bounds, joint CROWN bounds, attack, member-wise proofs, the exact MILP, a complete
backend) sharing one time limit.

The portfolio is never less sound than its parts: the attack can only answer SAT with a witness
that re-checks in float64 PyTorch, the bounds only UNSAT from a sound over-approximation, and
whatever is left goes to a complete backend (``bab`` by default) with the remaining time.

**Stages.** A stage is anything with a ``name``, a ``claim(query, state)`` and a
``run(query, state, time_limit_s)`` (:class:`Stage`); the portfolio runs its stages in order and
stops at the first decided verdict. Time is shared by what each stage has left to gain, not by
fixed fractions: a stage whose claim is ``None`` is cheap and bounded by its own work (bounds, a
fixed number of attack steps) and gets whatever time is left; the others get the time left in
proportion to their claims against the claims of the stages still to come (a claim of 0 skips the
stage). The member-wise stage claims the share of the joint problem's unstable ReLUs that the
member proofs it still needs would branch on (0 when cached verdicts already settle whether it
can help); the exact MILP claims 1 (0 above ``EXACT_MAX_UNSTABLE`` unstable ReLUs, where branch
and bound, which ends with the MILP on its tighter bounds, gets the time); the complete backend
claims its decision rate on the queries that reached it so far (:func:`decision_rate`), so where
branch and bound keeps failing after the MILP the MILP gets nearly all the time: a query the MILP
alone solves within the limit is not lost to a fixed split.

**Order.** Stages run by cost per decision: the forward linear bounds' disjunct pass takes
milliseconds and alone decides most easy queries (cached per member, point and eps across queries,
it stops at the first member that settles the query), joint CROWN bounds decide more at a higher
cost, the attack finds SAT, then the member proofs, the exact MILP on the joint query (with the
bounds found so far; only when the complete backend is not the MILP) and the complete backend.
After the first stage, a stage that decides from cached work (``free``: member verdicts cached by
earlier pairs) runs next.

**Member facts.** What is proven about a single member at a point carries over to other eps
(:func:`member_fact`): robust at eps (its whole error group refuted, by the bounds stage or a
member proof) means robust at every smaller eps, an error proven at eps means one at every larger
eps, since with the same point, label and input bounds the smaller ball lies inside the larger.
The bounds stage answers a query settled by facts before computing any bound (a dictionary look-up
where the pass costs milliseconds), bounds members known to err last, and the member stage skips
members with a fact; on all pairs of an ensemble at several eps most member questions recur.

New backends slot in with :data:`STAGES` (``STAGES.add("name", factory)``, factory
``(**options) -> Stage``) and a ``stages=("bounds", "crown", "attack", "members", "exact",
"complete")`` list; :class:`VerifierStage` wraps any
:class:`~phalanx.verification.backends.Verifier` as a stage.
"""

from __future__ import annotations

import copy
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from phalanx.errors import PhalanxError
from phalanx.registry import Registry
from phalanx.verification.backends import (
    BOUND_TOL,
    BoundCache,
    MilpVerifier,
    QueryBounds,
    Verifier,
    query_bounds,
)
from phalanx.verification.ir import NetworkIR
from phalanx.verification.query import Query, QueryKind, Verdict, VerificationResult, point_fingerprint, recheck


def _in_common_dtype(models: Sequence[torch.nn.Module]) -> tuple[list[torch.nn.Module], torch.dtype, torch.device]:
    """The members in one floating dtype (the promotion of theirs: float64 members are attacked
    in float64, a float32/float64 mix in float64 on cast copies) and their device."""
    tensors = [t for m in models for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    dtype = torch.get_default_dtype()
    if tensors:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[0].device if tensors else torch.device("cpu")
    same = [all(t.dtype == dtype for t in (*m.parameters(), *m.buffers()) if t.is_floating_point())
            for m in models]
    return [m if ok else copy.deepcopy(m).to(dtype) for m, ok in zip(models, same, strict=True)], dtype, device


def _attack_candidates(query: Query, attacks: Sequence[str], steps: int, restarts: int,
                       seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """Adversarial candidates (lazily, one attack at a time) from the joint gradient attacks of
    ``phalanx.attacks``: G.A. 1-3 for member properties, PGD for composites."""
    from phalanx.attacks import create_attack
    from phalanx.ensembles import Ensemble
    from phalanx.types import Norm, ThreatModel

    members, dtype, device = _in_common_dtype(query.models)
    ens = Ensemble(members, "mean-logits").eval()
    shape = query.nets[0].in_shape
    x = torch.as_tensor(query.x0.reshape(1, *shape), dtype=dtype, device=device)
    y = torch.tensor([query.label], device=device)
    threat = ThreatModel(Norm.LINF, float(query.eps), query.input_bounds)
    gen = torch.Generator().manual_seed(seed)
    for name in attacks:
        if name in ("ga1", "ga2", "ga3") and query.kind is QueryKind.MEAN_LOGITS:
            continue  # the joint attacks aim at every member erring, not at the mean
        opts: dict[str, object] = {}
        if name in ("ga2", "ga3", "pgd"):
            opts["steps"] = steps
        if name == "pgd":
            opts["restarts"] = restarts
            opts["loss"] = "cw"
        atk = create_attack(name, **opts)
        with torch.enable_grad():
            adv = atk(ens, x, y, threat, generator=gen)
        yield name, adv.detach().to(torch.float64).reshape(-1).numpy()


class AttackVerifier(Verifier):
    """Incomplete: SAT when falsification (:mod:`phalanx.verification.falsify`: APGD on the
    property's margin, restarts, inside the box) or, with ``attacks``, the named joint gradient
    attacks find a witness that re-checks; else TIMEOUT. Falsification stops after ``rounds``
    rounds of ``restarts`` batched starts or ``time_share`` of the time limit."""

    name = "attack"
    complete = False

    def __init__(self, attacks: Sequence[str] | None = None, steps: int = 50, restarts: int = 8,
                 seed: int = 0, rounds: int = 2, time_share: float = 0.1) -> None:
        self.attacks = tuple(attacks) if attacks is not None else None
        self.steps, self.restarts, self.seed = steps, restarts, seed
        self.rounds, self.time_share = rounds, time_share

    def verify(self, query: Query, *, time_limit_s: float = 0.0) -> VerificationResult:
        t0 = time.perf_counter()
        if self.attacks is None:
            from phalanx.verification.falsify import FalsifyConfig, falsify

            cfg = FalsifyConfig(self.steps, self.restarts, self.rounds, self.time_share * time_limit_s, self.seed)
            out = falsify(query, cfg)
            det = {**out.details, "attack": "falsify", "rounds": out.rounds, "best_margin": out.best_margin}
            if out.witness is not None:
                return self._result(Verdict.SAT, t0, counterexample=out.witness, message="falsify: re-checked in "
                                    "float64 PyTorch", details=det)
            return self._result(Verdict.TIMEOUT, t0, message="falsification found no witness (incomplete method)",
                                details=det)
        if query.kind is QueryKind.PROPERTY:
            raise PhalanxError("named attacks aim at labels; a property query needs the default falsification")
        names = self.attacks
        for name, cand in _attack_candidates(query, names, self.steps, self.restarts, self.seed):
            w, msg, det = recheck(query, cand)
            if w is not None:
                det["attack"] = name
                return self._result(Verdict.SAT, t0, counterexample=w, message=f"{name}: {msg}", details=det)
        return self._result(Verdict.TIMEOUT, t0, message="attack found no witness (incomplete method)")


#: member-robustness verdicts cached per process: (member fingerprint, point, eps, label, box) ->
#: (verdict, time limit it had); an undecided one is retried only with a larger limit
_MEMBER_CACHE: dict[tuple[str, str, float, int, tuple[float, float]], tuple[Verdict, float]] = {}


#: the bounds stage's disjunct bounds per network, box and disjunct rows (``query_bounds``'s cache)
_BOUND_CACHE: BoundCache = weakref.WeakKeyDictionary()


#: member-stage outcomes in this process (runs that solved a member query, and of those, decided)
_MEMBER_STATS = {"runs": 0, "decided": 0}

#: a point (its fingerprint, as the member cache keys it), a label and the input bounds
FactKey = tuple[str, int, tuple[float, float]]

#: what is proven about single members, per network (weakly keyed by its immutable IR): (point,
#: label, input bounds) -> [largest eps at which it is proven robust, smallest eps at which it is
#: proven to err]; see :func:`member_fact`
_MEMBER_FACTS: weakref.WeakKeyDictionary[NetworkIR, dict[FactKey, list[float]]] = (
    weakref.WeakKeyDictionary())


def clear_caches() -> None:
    """Forget every cross-query cache of this process (member verdicts and facts, bounds)."""
    _MEMBER_CACHE.clear()
    _MEMBER_FACTS.clear()
    _BOUND_CACHE.clear()


def _member_groups(query: Query) -> bool:
    """Whether group ``i`` of the query is exactly member ``i``'s errors at the query's label (all
    of them: mutual-error or majority, no runner-up simplification), so that refuting it proves
    member ``i`` robust in the ball."""
    return query.kind in (QueryKind.MUTUAL_ERROR, QueryKind.MAJORITY) and query.runner_up is None


def _fact_key(query: Query) -> FactKey:
    return point_fingerprint(query.x0), query.label, query.input_bounds


def member_fact(query: Query, i: int, key: FactKey | None = None) -> Verdict | None:
    """What is already proven about member ``i`` alone in the query's ball: UNSAT (robust) when it
    was proven robust at an eps at least this query's, SAT (it errs) when an error was proven at
    an eps at most this one, else None. Sound by monotonicity: with the same point, label and
    input bounds, the ball of a smaller eps lies inside the ball of a larger one."""
    if not _member_groups(query):
        return None
    f = _MEMBER_FACTS.get(query.nets[i], {}).get(key if key is not None else _fact_key(query))
    if f is None:
        return None
    if f[0] >= query.eps:
        return Verdict.UNSAT
    return Verdict.SAT if f[1] <= query.eps else None


def record_member(query: Query, i: int, verdict: Verdict, key: FactKey | None = None
                  ) -> None:
    """Remember a proven verdict of member ``i`` alone at the query's eps (UNSAT: robust, SAT: a
    re-checked error); undecided verdicts are not facts and are ignored."""
    if not (verdict.decided and _member_groups(query)):
        return
    f = _MEMBER_FACTS.setdefault(query.nets[i], {}).setdefault(key if key is not None else _fact_key(query),
                                                                [-np.inf, np.inf])
    if verdict is Verdict.UNSAT:
        f[0] = max(f[0], query.eps)
    else:
        f[1] = min(f[1], query.eps)


def _member_key(query: Query, i: int) -> tuple[str, str, float, int, tuple[float, float]]:
    from phalanx.verification.query import model_fingerprint

    # hashed afresh every time: a module object whose weights changed in place is another network
    fp = model_fingerprint(query.models[i])
    return fp, point_fingerprint(query.x0), float(query.eps), query.label, query.input_bounds


def _member_wise(query: Query) -> bool:
    """Whether member-wise robustness can settle the query: only the argmax properties whose
    groups are the members' own errors at the query's label (mutual-error, majority), without a
    runner-up simplification, and with at least two members. Never for mean-logits or an explicit
    ``property`` (VNN-LIB) query, whose groups say nothing about the members' labels."""
    return (query.complete and query.kind in (QueryKind.MUTUAL_ERROR, QueryKind.MAJORITY)
            and len(query.nets) >= 2)


def _members_needed(query: Query) -> int:
    """How many members must be proven robust alone before fewer than ``quorum`` can err."""
    return len(query.nets) - query.required + 1


def _cached_members(query: Query) -> tuple[int, list[int]]:
    """Members cached as robust, and those not cached as decided (still worth a proof)."""
    robust, todo = 0, []
    fk = _fact_key(query)
    for i in range(len(query.nets)):
        fact = member_fact(query, i, fk)
        if fact is not None:
            robust += fact is Verdict.UNSAT
            continue
        cached = _MEMBER_CACHE.get(_member_key(query, i))
        if cached is not None and cached[0] is Verdict.UNSAT:
            robust += 1
        elif cached is None or not cached[0].decided:
            todo.append(i)
    return robust, todo


def robust_members(query: Query, backend: Verifier, time_limit_s: float, *,
                   order: Sequence[int] | None = None, weights: Sequence[float] | None = None,
                   bounds: QueryBounds | None = None) -> tuple[int, int]:
    """How many chosen members are individually proven robust in the ball (their own
    single-network query UNSAT); cached across queries sharing a member, point and eps.

    A mutual-error / majority property needs ``quorum`` members to err at one input, so if more
    than ``k - quorum`` members can never err there, the query is UNSAT (sound: a member's
    robustness holds for every input of the ball). Members are tried in ``order`` (default: as
    given); each uncached one gets the time left times its share of the ``weights`` of the
    members still to try (default: equal shares), and an undecided verdict is cached with the
    limit it had, so it is retried only with more time. ``bounds``: the joint query's bounds (with
    every network's own, computed like ``backend``'s); a member's single-network query then reuses
    its network's bounds and its group's disjunct bounds (the same specification) instead of
    recomputing them. Returns ``(robust, solved_now)``."""
    from phalanx.verification.query import make_query

    robust = solved = 0
    if not _member_wise(query):
        return robust, solved
    t0 = time.perf_counter()
    idx = list(order) if order is not None else list(range(len(query.nets)))
    w = list(weights) if weights is not None else [1.0] * len(query.nets)
    needed = _members_needed(query)
    fk = _fact_key(query)
    for pos, i in enumerate(idx):
        fact = member_fact(query, i, fk)
        if fact is not None:  # proven at another eps (monotone): no solver call
            robust += fact is Verdict.UNSAT
            if robust >= needed:
                break
            continue
        key = _member_key(query, i)
        cached = _MEMBER_CACHE.get(key)
        left = time_limit_s - (time.perf_counter() - t0)
        share = w[i] / max(sum(w[j] for j in idx[pos:] if member_fact(query, j, fk) is None), 1e-12)
        limit = left * share
        if cached is not None and (cached[0].decided or cached[1] >= limit):
            v = cached[0]
        elif left <= 0:
            break
        else:
            single = make_query([query.models[i]], query.x0, query.eps, query.label, nets=[query.nets[i]],
                                input_bounds=query.input_bounds)
            if (bounds is not None and bounds.nets and isinstance(backend, MilpVerifier)
                    and query.kind is not QueryKind.MEAN_LOGITS and query.runner_up is None):
                own = QueryBounds((bounds.nets[i],), (bounds.disjunct_upper[i],), (bounds.disjunct_lower[i],))
                v = backend.verify_with_bounds(single, own, time_limit_s=limit).verdict
            else:
                v = backend.verify(single, time_limit_s=limit).verdict
            solved += 1
            if v is not Verdict.ERROR:
                _MEMBER_CACHE[key] = (v, limit)
            record_member(query, i, v, fk)
        robust += v is Verdict.UNSAT
        if robust >= needed:
            break
    return robust, solved


@dataclass
class StageState:
    """What the stages of one query share: the bounds once computed, per-stage wall times."""

    bounds: QueryBounds | None = None
    bounds_method: str | None = None
    times: dict[str, float] = field(default_factory=dict)

    def network_bounds(self, query: Query) -> QueryBounds | None:
        """The bounds with every network's own bounds filled in (computed once, on demand)."""
        if self.bounds is not None and not self.bounds.nets:
            self.bounds = query_bounds(query, self.bounds_method or "linear", disjuncts=self.bounds)
        return self.bounds


class Stage(Protocol):
    """One step of the portfolio.

    ``claim`` is what the stage has left to gain on this query: ``None`` for a cheap stage bounded
    by its own work (it gets all the time left), else a weight >= 0 against the later stages'
    claims (0 skips it). ``run`` returns a result; only a decided verdict (SAT with a re-checked
    witness, or a sound UNSAT) ends the portfolio. A stage may also have ``free(query) -> bool``:
    True when it decides the query from cached work alone; after the first stage, such a stage
    runs next, ahead of its place in the order."""

    name: str

    def claim(self, query: Query, state: StageState) -> float | None: ...

    def run(self, query: Query, state: StageState, time_limit_s: float) -> VerificationResult: ...


class BoundsStage:
    """Linear (or interval) bounds: UNSAT when they prove it; keeps the bounds for later stages."""

    name = "bounds"

    def __init__(self, method: str = "linear") -> None:
        self.method = method

    def claim(self, query: Query, state: StageState) -> float | None:
        return None

    def run(self, query: Query, state: StageState, time_limit_s: float) -> VerificationResult:
        t0 = time.perf_counter()
        facts: list[Verdict | None] = [None] * len(query.nets)
        fk = _fact_key(query) if _member_wise(query) else None
        if fk is not None:
            facts = [member_fact(query, i, fk) for i in range(len(query.nets))]
            robust = sum(f is Verdict.UNSAT for f in facts)
            if robust >= _members_needed(query):  # members proven robust at this eps or a larger one
                return VerificationResult(Verdict.UNSAT, self.name, time.perf_counter() - t0,
                                          message=f"{robust} of {len(query.nets)} members proven robust at eps >= "
                                          f"{query.eps:g} (same point)")
        # the disjunct pass only (per-network bounds when a later stage needs them), cached per
        # member across queries, stopping at the first member whose bounds settle the query;
        # members with a proven error at a smaller eps (bounds cannot refute them) go last
        order = sorted(range(len(query.nets)), key=lambda i: facts[i] is Verdict.SAT)
        # the box is the point's ball at eps in the input bounds: the fact key and eps name it
        box_key = None if fk is None else f"{fk[0]}:{query.eps!r}:{fk[2]}"
        qb = query_bounds(query, self.method, per_network=False, stop_at_unsat=True, cache=_BOUND_CACHE, order=order,
                          box_key=box_key)
        state.bounds, state.bounds_method = qb, self.method
        if fk is not None:  # a member whose whole error group is refuted is robust in the ball
            for i, up in enumerate(qb.disjunct_upper):
                if facts[i] is None and float(up.max()) < -BOUND_TOL:
                    record_member(query, i, Verdict.UNSAT, fk)
        possible = qb.possible_groups()
        if query.complete and possible < query.required:  # QueryBounds.proves_unsat
            return VerificationResult(Verdict.UNSAT, self.name, time.perf_counter() - t0,
                                      message=f"{self.method} bounds: at most {possible} of "
                                      f"{query.required} required groups can hold")
        return VerificationResult(Verdict.TIMEOUT, self.name, time.perf_counter() - t0,
                                  message="bounds inconclusive (incomplete method)")


#: stage outcomes in this process, by stage name: [runs, decided]
_STAGE_STATS: dict[str, list[int]] = {}


def decision_rate(name: str) -> float:
    """How often the stage ``name`` has decided the queries that reached it in this process
    (Laplace estimate: 1/2 before any evidence)."""
    runs, decided = _STAGE_STATS.get(name, (0, 0))
    return (decided + 1) / (runs + 2)


class VerifierStage:
    """Any :class:`Verifier` as a stage, with a fixed claim (``None``: cheap, gets the time left)
    or ``"rate"``: its :func:`decision_rate` so far. A :class:`MilpVerifier` reuses the bounds
    stage's bounds when they were computed alike."""

    def __init__(self, verifier: Verifier, claim: float | str | None = 1.0, name: str | None = None) -> None:
        if isinstance(claim, str) and claim != "rate":
            raise PhalanxError(f"unknown stage claim {claim!r}; accepted: a number >= 0, None or 'rate'")
        self.verifier, self._claim = verifier, claim
        self.name = name or verifier.name

    def claim(self, query: Query, state: StageState) -> float | None:
        return decision_rate(self.name) if self._claim == "rate" else self._claim  # type: ignore[return-value]

    def run(self, query: Query, state: StageState, time_limit_s: float) -> VerificationResult:
        v = self.verifier
        if isinstance(v, MilpVerifier) and state.bounds is not None and state.bounds_method == v.bounds:
            return v.verify_with_bounds(query, state.bounds, time_limit_s=time_limit_s)
        return v.verify(query, time_limit_s=time_limit_s)


class MembersStage:
    """UNSAT when enough members are proven robust alone (cached across queries, see
    :func:`robust_members`). Its claim is the share of the joint query's unstable ReLUs that the
    cheapest member proofs it still needs would branch on, times the rate at which member proofs
    have settled queries in this process (Laplace estimate); 0 when it cannot help (a single
    member, a mean-logits property, a runner-up simplification, or cached verdicts that leave too
    few candidates). Members are tried in increasing order of unstable ReLUs, each with time in
    proportion to its own count."""

    name = "members"

    def __init__(self, backend: Verifier) -> None:
        self.backend = backend

    def _plan(self, query: Query, state: StageState) -> tuple[list[int], list[float], float]:
        k = len(query.nets)
        if not _member_wise(query):
            return [], [], 0.0
        qb = state.network_bounds(query)
        unstable = [float(nb.num_unstable) for nb in qb.nets] if qb is not None else [1.0] * k
        weights = [u + 1.0 for u in unstable]  # + 1: the disjunction's own binary
        robust, todo = _cached_members(query)
        open_ = len(todo)
        still = _members_needed(query) - robust
        if still <= 0:
            return list(range(k)), weights, 1.0  # settled by the cache: costs nothing
        if still > open_:
            return [], [], 0.0  # too few candidates left: cannot decide
        todo.sort(key=lambda i: weights[i])
        joint = sum(weights) + (query.num_groups if qb is None else
                                sum(int(np.sum(u >= -BOUND_TOL)) for u in qb.disjunct_upper))
        share = sum(weights[i] for i in todo[:still]) / joint
        # what it has left to gain: its share of the work times how often member proofs have
        # settled queries in this process so far (Laplace estimate, 1/2 before any evidence)
        return todo, weights, share * (_MEMBER_STATS["decided"] + 1) / (_MEMBER_STATS["runs"] + 2)

    def claim(self, query: Query, state: StageState) -> float | None:
        return self._plan(query, state)[2]

    def free(self, query: Query) -> bool:
        """Cached member verdicts alone settle the query (it then costs a cache look-up)."""
        return _member_wise(query) and _cached_members(query)[0] >= _members_needed(query)

    def run(self, query: Query, state: StageState, time_limit_s: float) -> VerificationResult:
        t0 = time.perf_counter()
        order, weights, _ = self._plan(query, state)
        cached_first = [i for i in range(len(query.nets)) if i not in order] + order
        same = isinstance(self.backend, MilpVerifier) and state.bounds_method == self.backend.bounds
        robust, solved = robust_members(query, self.backend, time_limit_s, order=cached_first, weights=weights,
                                        bounds=state.network_bounds(query) if same else None)
        wall = time.perf_counter() - t0
        if solved:
            _MEMBER_STATS["runs"] += 1
            _MEMBER_STATS["decided"] += robust >= _members_needed(query)
        if robust >= _members_needed(query):
            return VerificationResult(Verdict.UNSAT, self.name, wall,
                                      message=f"{robust} of {len(query.nets)} members are individually robust")
        return VerificationResult(Verdict.TIMEOUT, self.name, wall,
                                  message=f"{robust} of {len(query.nets)} members proven robust alone, "
                                  f"{_members_needed(query)} needed")


#: portfolio stages: name -> factory(portfolio options) -> Stage; "complete" is the complete backend
STAGES: Registry[Callable[..., Stage]] = Registry("portfolio stage")
#: the portfolio's ``bounds``: forward linear then joint CROWN, forward linear only, interval only
BOUND_METHODS = ("crown", "linear", "interval")
#: the default order, by cost per decision: forward bounds (milliseconds, decide most easy
#: queries), joint CROWN bounds, the attack (SAT), member-wise proofs, the complete backend
DEFAULT_STAGES = ("bounds", "crown", "attack", "members", "exact", "complete")


@dataclass(frozen=True)
class PortfolioOptions:
    """What the built-in stage factories read (see :class:`Portfolio`)."""

    complete: str = "bab"
    attacks: tuple[str, ...] | None = None
    steps: int = 50
    bounds: str = "crown"
    complete_options: dict[str, object] = field(default_factory=dict)


def _complete_backend(o: PortfolioOptions) -> Verifier:
    from phalanx.verification import create_verifier

    return create_verifier(o.complete, **o.complete_options)


def _bounds_stage(o: PortfolioOptions) -> Stage:
    """Per-member forward bounds, their disjunct pass only (backends.py; shared with the MILP):
    ``linear`` (also the first, cheapest pass of ``bounds="crown"``) or ``interval``."""
    return BoundsStage("interval" if o.bounds == "interval" else "linear")


def _crown_stage(o: PortfolioOptions) -> Stage:
    """Joint back-substituted (alpha-)CROWN bounds over all members (bab.py) as a cheap stage
    (in the default list only with ``bounds="crown"``)."""
    from phalanx.verification import create_verifier

    return VerifierStage(create_verifier("crown"), claim=None)


STAGES.add("bounds", _bounds_stage, "forward linear (or interval) bounds, disjunct pass only: the cheapest UNSAT "
           "(milliseconds)")
STAGES.add("crown", _crown_stage, "joint (alpha-)CROWN bounds over all members: UNSAT where forward bounds fail")
STAGES.add("attack", lambda o: VerifierStage(AttackVerifier(o.attacks, steps=o.steps), claim=None),
           "falsification (APGD on the property margin, restarts, in the box): SAT with a re-checked witness")
STAGES.add("members", lambda o: MembersStage(create_verifier_for_members(o)),
           "member-wise robustness proofs (cached across queries): sound UNSAT")
#: most unstable ReLUs (by the forward bounds) for which the ``exact`` stage runs the joint MILP;
#: above, the complete backend gets the time (``bab`` still ends with the MILP, on its tighter
#: bounds). VNN-COMP ``mnist_fc``: 36-72 on the 256x2 instances the MILP settles in seconds,
#: 340-660 on 256x4, where the MILP timed out on most 0.05 instances at 300 s.
EXACT_MAX_UNSTABLE = 100


class ExactStage(VerifierStage):
    """The exact MILP on the joint query with the bounds found so far; claims 1 while the query
    has at most :data:`EXACT_MAX_UNSTABLE` unstable ReLUs, else steps aside (claim 0)."""

    def claim(self, query: Query, state: StageState) -> float | None:
        qb = state.network_bounds(query)
        if qb is not None and qb.nets and sum(nb.num_unstable for nb in qb.nets) > EXACT_MAX_UNSTABLE:
            return 0.0
        return super().claim(query, state)


STAGES.add("exact", lambda o: ExactStage(_member_milp(o), claim=1.0, name="exact"),
           "the exact MILP on the joint query with the bounds found so far, while it has at most "
           f"{EXACT_MAX_UNSTABLE} unstable ReLUs (in the default list unless complete='milp')")
STAGES.add("complete", lambda o: VerifierStage(_complete_backend(o), claim="rate"),
           "the complete backend on the joint query (bab by default); claims its decision rate so far")


def _member_milp(o: PortfolioOptions) -> Verifier:
    """The MILP backend with the complete backend's thread count."""
    from phalanx.verification import create_verifier

    return create_verifier("milp", **{k: v for k, v in o.complete_options.items() if k == "threads"})


def create_verifier_for_members(o: PortfolioOptions) -> Verifier:
    """The single-network backend of the member stage: MILP (with the complete backend's thread
    count) for milp/smt, else the complete one."""
    return _member_milp(o) if o.complete in ("milp", "smt") else _complete_backend(o)


def _free(stage: Stage, query: Query) -> bool:
    """Whether a stage says it decides ``query`` from cached work alone (optional ``free``)."""
    free = getattr(stage, "free", None)
    return bool(free(query)) if free is not None else False


class Portfolio(Verifier):
    """An ordered list of stages sharing one time limit (module docstring): by default cheap UNSAT
    by linear bounds, cheap SAT by a joint attack, UNSAT by member-wise robustness proofs
    (cached), then a complete backend on the joint query.

    ``stages`` names registered stages (:data:`STAGES`) or passes :class:`Stage` objects, in
    order; ``member_proofs=False`` drops the member stage from the default list."""

    name = "portfolio"

    def __init__(self, complete: str = "bab", attacks: Sequence[str] | None = None, steps: int = 50,
                 bounds: str = "crown", member_proofs: bool = True,
                 stages: Sequence[str | Stage] | None = None, **complete_options: object) -> None:
        if bounds not in BOUND_METHODS:
            raise PhalanxError(f"unknown portfolio bounds {bounds!r}; accepted: {', '.join(BOUND_METHODS)}")
        opts = PortfolioOptions(complete, tuple(attacks) if attacks is not None else None, steps, bounds,
                                dict(complete_options))
        names: Sequence[str | Stage] = stages if stages is not None else [
            s for s in DEFAULT_STAGES if (member_proofs or s != "members") and (bounds == "crown" or s != "crown")
            and (complete != "milp" or s != "exact")]
        if not names:
            raise PhalanxError("a portfolio needs at least one stage; accepted: " + ", ".join(STAGES.names()))
        self.stages: list[Stage] = [STAGES.get(s)(opts) if isinstance(s, str) else s for s in names]
        self.name = f"portfolio({complete})"

    def verify(self, query: Query, *, time_limit_s: float) -> VerificationResult:
        t0 = time.perf_counter()
        state = StageState()
        last: VerificationResult | None = None
        pending = list(self.stages)
        while pending:
            # after the first stage, one that decides from cached work (``free``) jumps the queue
            stage = pending.pop(next((i for i, s in enumerate(pending) if state.times and _free(s, query)), 0))
            left = time_limit_s - (time.perf_counter() - t0)
            claim = stage.claim(query, state)
            if claim is not None and claim <= 0:
                continue
            if left <= 0:
                break
            if claim is not None:
                later = [c for c in (s.claim(query, state) for s in pending) if c is not None and c > 0]
                left = left * claim / (claim + sum(later))
            last = stage.run(query, state, left)
            state.times[stage.name] = round(last.wall_time_s, 6)
            stats = _STAGE_STATS.setdefault(stage.name, [0, 0])
            stats[0] += 1
            stats[1] += last.verdict.decided
            if last.verdict.decided:
                return self._finish(last, t0, stage.name, state.times)
        if last is not None and last.verdict is Verdict.ERROR:  # e.g. the complete backend's exact tie
            return self._finish(last, t0, last.backend, state.times)
        return self._result(Verdict.TIMEOUT, t0, message="no stage decided within the time limit"
                            + (f" (last: {last.message})" if last is not None else ""), details={"stages": state.times})

    def _finish(self, r: VerificationResult, t0: float, stage: str, stages: dict[str, float]) -> VerificationResult:
        details = dict(r.details)
        details.update({"stage": stage, "stages": stages})
        return VerificationResult(r.verdict, f"portfolio/{stage}", time.perf_counter() - t0, r.counterexample,
                                  r.message, details)
