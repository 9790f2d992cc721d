"""Back-substituted joint bounds as a verifier (``crown``) and branch and bound over ReLU splits (``bab``).

``crown`` (incomplete): CROWN / alpha-CROWN bounds of every member (``crown.py``) combined into
joint bounds of the query (``joint.py``); UNSAT when they refute the property, else undecided.

``bab`` (complete): branch and bound over ReLU phase splits (Bunel et al. 2020, "Branch and
bound for piecewise linear neural network verification"), each domain bounded by
back-substitution with the split neurons' intervals clamped and the split constraints
``s z >= 0`` in the bound through optimised multipliers ``beta >= 0`` (beta-CROWN, Wang et al.
2021, eq. 6; ``crown.joint_forms``, ``node_alpha_steps`` iterations per domain). Each domain is

1. bounded jointly over the members (``joint.evaluate``): refuted domains are closed, and
   the bounds' maximisers are re-checked as SAT candidates;
2. split on the unstable neuron with the best BaBSR score (Bunel et al. 2020, sec. 5.1: the
   intercept of the neuron's upper relaxation times the positive part of its back-substituted
   objective coefficient), into ``z >= 0`` and ``z <= 0``; a child's bounds are recomputed from the
   split layer on and intersected with its parent's (which hold on a superset);
3. handed to the exact MILP (``backends.build_milp`` with the domain's bounds, whose clamped
   intervals enforce the splits) once at most ``leaf_unstable`` unstable neurons remain, so the
   search is complete: every leaf is refuted by bounds, an empty split domain, an infeasible
   MILP, or yields a re-checked witness.

When every member the query reads is a chain of affine ops, (leaky) ReLUs and max-pools (``batch > 0``,
the default), the search after the root is the batched one of ``batched.py`` instead: the
root's intermediate bounds are first tightened by alpha-CROWN (``alpha_steps``) and then the
most important unstable neurons are refined (``refine_share`` of the time left, at most
``refine_neuron_s`` per neuron and side): by the batched search on the network's prefix
(``refine="search"``, the default: ``batched.refine_by_search``) or by HiGHS prefix MILPs
(``refine="milp"``: ``refine.py``); then ``batch`` domains at a time are
split and bounded with optimised slopes and split multipliers (in ``batch_dtype``, every
deciding bound recomputed in float64), with the MILP at leaves of at most
``batch_leaf_unstable`` unstable neurons.

UNSAT only when every domain is closed that way; SAT only with a witness re-checked in float64
PyTorch; TIMEOUT otherwise (never UNSAT on a time limit). After ``bab_share`` of the time limit
the open search is abandoned for the MILP on the whole query with the root's (tighter) bounds.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from phalanx.errors import PhalanxError
from phalanx.verification import batched
from phalanx.verification.backends import (
    BOUND_TOL,
    FAST_HIGHS_OPTIONS,
    QueryBounds,
    Verifier,
    build_milp,
    query_bounds,
)
from phalanx.verification.bounds import NetworkBounds
from phalanx.verification.crown import PreBounds, _act_relax, forward_floor
from phalanx.verification.joint import NodeBounds, Setup, evaluate, member_bounds, setup
from phalanx.verification.query import Query, QueryKind, Verdict, VerificationResult, property_holds, recheck
from phalanx.verification.refine import refine_bounds


def root_bounds(query: Query, *, forward: bool = True, device: str | torch.device | None = None,
                alpha_steps: int = 0, joint: bool = True, record: bool = False,
                deadline: float | None = None) -> tuple[Setup, NodeBounds]:
    """The query's joint bounds on the whole box (intermediate bounds also intersected with the
    forward linear bounds when ``forward``)."""
    st = setup(query, device)
    lo, hi = query.box()
    pres = [member_bounds(st, i, floor=forward_floor(net, lo, hi, g) if forward else None)
            for i, (net, g) in enumerate(zip(query.nets, st.graphs, strict=True))]
    nb = evaluate(st, pres, record=record and alpha_steps <= 0, joint=joint)
    if nb.unsat or alpha_steps <= 0:  # plain CROWN first: optimising the slopes costs iterations
        return st, nb
    return st, evaluate(st, pres, alpha_steps=alpha_steps, record=record, joint=joint, deadline=deadline)


def query_bounds_of(st: Setup, nb: NodeBounds) -> QueryBounds:
    """A node's bounds in the form the MILP encoder reads."""
    nets = tuple(NetworkBounds(tuple((a.cpu().numpy(), b.cpu().numpy()) for a, b in p.pre),
                               (p.out[0].cpu().numpy(), p.out[1].cpu().numpy())) for p in nb.pre)
    groups = range(st.query.num_groups)
    ups = tuple(nb.upper[st.group_of == g] for g in groups)
    lows = tuple(nb.lower[st.group_of == g] for g in groups)
    return QueryBounds(nets, ups, lows)


def _first_witness(query: Query, cands: list[np.ndarray]) -> tuple[np.ndarray, str, dict[str, Any]] | None:
    """The first candidate that satisfies the property in the float64 IR and re-checks in PyTorch."""
    for x in cands:
        outs = [n.forward(x) for n in query.nets]  # property queries: members of any output size
        logits = np.concatenate(outs)[None] if query.kind is QueryKind.PROPERTY else np.stack(outs)
        if property_holds(query, logits)[0]:
            w, msg, det = recheck(query, x)
            if w is not None:
                return w, msg, det
    return None


class CrownVerifier(Verifier):
    """Incomplete: UNSAT when joint (alpha-)CROWN bounds refute the query, else TIMEOUT (undecided)."""

    name = "crown"
    complete = False

    def __init__(self, alpha_steps: int = 20, joint: bool = True, forward: bool = True,
                 device: str | None = None) -> None:
        self.alpha_steps, self.joint, self.forward, self.device = alpha_steps, joint, forward, device

    def verify(self, query: Query, *, time_limit_s: float = 0.0) -> VerificationResult:
        t0 = time.perf_counter()
        if self.forward and query_bounds(query, "linear").proves_unsat(query):  # the cheapest proof first
            return self._result(Verdict.UNSAT, t0, message="forward linear bounds")
        _, nb = root_bounds(query, forward=self.forward, device=self.device, alpha_steps=self.alpha_steps,
                            joint=self.joint, deadline=t0 + time_limit_s if time_limit_s > 0 else None)
        if nb.unsat and query.complete:
            return self._result(Verdict.UNSAT, t0, message=nb.reason)
        return self._result(Verdict.TIMEOUT, t0, message="bounds inconclusive (incomplete method)",
                            details={"max_upper": float(nb.upper.max())})


@dataclass
class _Domain:
    splits: list[dict[int, torch.Tensor]]  # per member: act index -> (n,) signs
    nb: NodeBounds
    depth: int


def _unstable(nb: NodeBounds, st: Setup) -> int:
    n = 0
    for p, g, u in zip(nb.pre, st.graphs, st.users, strict=True):
        if u:
            n += sum(int(((lo < 0) & (hi > 0)).sum()) for (lo, hi), i in zip(p.pre, g.acts, strict=True)
                     if g.nodes[i].kind == "act")
    return n


def branch_choice(st: Setup, nb: NodeBounds) -> tuple[int, int, int] | None:
    """``(member, act index, neuron)`` with the best BaBSR-style score, or None when no unstable
    (leaky) ReLU remains."""
    assert nb.forms is not None
    live = torch.as_tensor(nb.upper[nb.ids] >= -BOUND_TOL, device=st.x_lo.device)
    best: tuple[float, float, tuple[int, int, int]] | None = None
    part = 0
    for i, (p, g, u) in enumerate(zip(nb.pre, st.graphs, st.users, strict=True)):
        if not u:
            continue
        rec = nb.forms.rec[part]
        part += 1
        for k, node_id in enumerate(g.acts):
            node = g.nodes[node_id]
            if node.kind != "act" or k not in rec:
                continue
            lo, hi = p.pre[k]
            _, tu, _, unstable = _act_relax(lo, hi, node.slope)
            if not bool(unstable.any()):
                continue
            coef = rec[k][live]
            score = (coef.clamp(min=0.0) * tu).sum(0)
            tie = (coef.abs().sum(0) * torch.minimum(hi, -lo))
            score = torch.where(unstable, score, torch.full_like(score, -1.0))
            tie = torch.where(unstable, tie, torch.full_like(tie, -1.0))
            j = int(torch.argmax(score + 1e-9 * tie))
            key = (float(score[j]), float(tie[j]), (i, k, j))
            if best is None or key[:2] > best[:2]:
                best = key
    return None if best is None else best[2]


def _importance(st: Setup, root: NodeBounds, pre: list[list[tuple[torch.Tensor, torch.Tensor]]]
                ) -> list[list[torch.Tensor] | None]:
    """Per member and act: how much each neuron's relaxation can move the objective (the summed
    magnitude of its back-substituted coefficients over the live rows, times its interval's
    smaller side), the order in which the refinement tightens neurons. A max-pool's coefficients
    are on its outputs, not on its inputs' bounds: it scores by the side alone (it is not refined)."""
    out: list[list[torch.Tensor] | None] = [None] * len(pre)
    if root.forms is None:
        return out
    live = torch.as_tensor(root.upper[root.ids] >= -BOUND_TOL, device=st.x_lo.device)
    part = 0
    for i, used in enumerate(st.users):
        if not used:
            continue
        rec = root.forms.rec[part] if part < len(root.forms.rec) else {}
        part += 1
        scores = []
        for k, (lo, hi) in enumerate(pre[i]):
            side = torch.minimum(hi, -lo).clamp(min=0.0)
            coef = rec.get(k)
            fits = coef is not None and coef.shape[0] == live.shape[0] and coef.shape[-1] == side.numel()
            weight = coef[live].abs().sum(0) if fits else 1.0  # type: ignore[index]
            scores.append((weight + 1e-12) * side)
        out[i] = scores
    return out


#: how intermediate bounds are refined before the batched search, with the default time per
#: neuron side: this module's batched search on the network's prefix, or HiGHS prefix MILPs
REFINE_NEURON_S = {"search": 0.2, "milp": 0.5}
#: slope iterations of the check, after each refined layer, whether the root is already refuted
REFUTE_STEPS = 10


class BabVerifier(Verifier):
    """Complete: branch and bound over ReLU splits with joint CROWN bounds, MILP at small leaves
    and as the fallback (see the module docstring)."""

    name = "bab"

    def __init__(self, alpha_steps: int = 20, node_alpha_steps: int = 8, leaf_unstable: int = 48,
                 bab_share: float = 0.7, threads: int = 1, forward: bool = True, refine_intermediate: bool = False,
                 device: str | None = None, batch: int = 256, batch_leaf_unstable: int = 16,
                 batch_dtype: str = "float32", refine_share: float = 0.4, refine_neuron_s: float | None = None,
                 refine: str = "search") -> None:
        self.alpha_steps, self.node_alpha_steps, self.leaf_unstable = alpha_steps, node_alpha_steps, leaf_unstable
        self.refine_intermediate = refine_intermediate
        self.bab_share, self.threads, self.forward, self.device = bab_share, threads, forward, device
        if batch_dtype not in ("float32", "float64"):
            raise PhalanxError(f"batch_dtype {batch_dtype!r} not accepted; accepted: float32, float64")
        self.batch, self.batch_leaf_unstable = int(batch), int(batch_leaf_unstable)
        if refine not in REFINE_NEURON_S:
            raise PhalanxError(f"refine {refine!r} not accepted; accepted: {', '.join(REFINE_NEURON_S)}")
        self.refine = refine
        self.refine_share = float(refine_share)
        self.refine_neuron_s = float(REFINE_NEURON_S[refine] if refine_neuron_s is None else refine_neuron_s)
        self.batch_dtype = torch.float32 if batch_dtype == "float32" else torch.float64

    def verify(self, query: Query, *, time_limit_s: float) -> VerificationResult:
        t0 = time.perf_counter()
        deadline = t0 + time_limit_s
        st, root = root_bounds(query, forward=self.forward, device=self.device, alpha_steps=self.alpha_steps,
                               record=True, deadline=t0 + 0.2 * time_limit_s)
        stats = {"domains": 1, "milp_leaves": 0, "max_depth": 0}
        if root.unsat and query.complete:
            return self._result(Verdict.UNSAT, t0, message=f"root bounds: {root.reason}", details=stats)
        w = _first_witness(query, root.candidates)
        if w is not None:
            return self._result(Verdict.SAT, t0, counterexample=w[0], message=f"bounds' maximiser: {w[1]}",
                                details={**w[2], **stats})
        if self.batch > 0 and query.complete and all(batched.is_chain(g) for g, u in zip(st.graphs, st.users,
                                                                                        strict=True) if u):
            r = self._batched(query, st, root, t0, deadline, stats)
            if r is not None:
                return r
        tie = itertools.count()
        heap: list[tuple[float, int, _Domain]] = []
        heapq.heappush(heap, (-float(root.upper.max()), next(tie), _Domain([{} for _ in query.nets], root, 0)))
        bab_until = t0 + self.bab_share * time_limit_s
        while heap:
            if time.perf_counter() > bab_until:
                return self._fallback(query, st, root, t0, deadline, stats, len(heap))
            _, _, dom = heapq.heappop(heap)
            choice = branch_choice(st, dom.nb) if _unstable(dom.nb, st) > self.leaf_unstable else None
            if choice is None:
                r = self._leaf_milp(query, st, dom.nb, t0, deadline, stats)
                if r is not None:
                    return r
                continue
            i, k, j = choice
            for sign in (1, -1):
                splits = [dict(s) for s in dom.splits]
                sg = splits[i].get(k)
                sg = torch.zeros_like(dom.nb.pre[i].pre[k][0], dtype=torch.int8) if sg is None else sg.clone()
                sg[j] = sign
                splits[i][k] = sg
                pres = list(dom.nb.pre)
                pres[i] = member_bounds(st, i, splits[i], floor=dom.nb.pre[i].pre,
                                        start=k + 1 if self.refine_intermediate else len(st.graphs[i].acts))
                nb = evaluate(st, pres, alpha_steps=self.node_alpha_steps, record=True, splits=splits, parent=dom.nb,
                              deadline=deadline)
                stats["domains"] += 1
                stats["max_depth"] = max(stats["max_depth"], dom.depth + 1)
                if nb.unsat:
                    continue
                w = _first_witness(query, nb.candidates)
                if w is not None:
                    return self._result(Verdict.SAT, t0, counterexample=w[0],
                                        message=f"branch and bound (depth {dom.depth + 1}): {w[1]}",
                                        details={**w[2], **stats})
                heapq.heappush(heap, (-float(nb.upper.max()), next(tie), _Domain(splits, nb, dom.depth + 1)))
        if not query.complete:
            return self._result(Verdict.TIMEOUT, t0, message="runner-up query refuted: proves nothing", details=stats)
        return self._result(Verdict.UNSAT, t0, message=f"branch and bound: all {stats['domains']} domains refuted",
                            details=stats)

    def _batched(self, query: Query, st: Setup, root: NodeBounds, t0: float, deadline: float,
                 stats: dict[str, int]) -> VerificationResult | None:
        """The batched search (``batched.py``) for chain members; None when the query does not fit
        it (too many conjunctions)."""
        pre = [[(lo, hi) for lo, hi in p.pre] for p in root.pre]
        limit = deadline - t0
        pre = batched.optimise_intermediate(st, pre, self.alpha_steps, deadline=t0 + 0.2 * limit)
        if self.refine_share > 0:
            refine_until = time.perf_counter() + self.refine_share * (deadline - time.perf_counter())
            scores = _importance(st, root, pre)

            def refuted(i: int) -> Callable[[list[tuple[torch.Tensor, torch.Tensor]]], bool]:
                def done(bounds: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
                    pb = batched.make_problem(st, [bounds if j == i else p for j, p in enumerate(pre)], root.upper)
                    return pb is not None and bool((batched.root_bound(pb, root.upper, REFUTE_STEPS).upper
                                                    < -BOUND_TOL).all())
                return done

            for i, used in enumerate(st.users):
                if used and len(pre[i]) > 1:
                    if self.refine == "search":
                        pre[i], rs = batched.refine_by_search(st, i, pre[i], deadline=refine_until, scores=scores[i],
                                                              per_side_s=self.refine_neuron_s, batch=self.batch,
                                                              steps=self.node_alpha_steps, dtype=self.batch_dtype,
                                                              done=refuted(i))
                    else:
                        pre[i], rs = refine_bounds(st.graphs[i], pre[i], st.x_lo, st.x_hi, deadline=refine_until,
                                                   scores=scores[i], per_neuron_s=self.refine_neuron_s,
                                                   threads=self.threads)
                    for key, v in rs.items():
                        stats[f"refine_{key}"] = stats.get(f"refine_{key}", 0) + v
            pre = batched.optimise_intermediate(st, pre, self.alpha_steps, deadline=t0 + 0.6 * limit)
        pb = batched.make_problem(st, pre, root.upper)
        if pb is None:
            return None
        bab_until = t0 + self.bab_share * (deadline - t0)
        leaf_out: list[VerificationResult] = []

        def leaf(bounds: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> bool | np.ndarray | None:
            pres = [PreBounds(b, True, p.out) for b, p in zip(bounds, root.pre, strict=True)]
            nb = NodeBounds(pres, root.forms, root.upper, root.lower, False, "")
            r = self._milp(query, st, nb, t0, deadline, stats, "leaf")
            if r is None:
                return True
            leaf_out.append(r)
            return r.counterexample if r.verdict is Verdict.SAT else None

        def confirm(cands: list[np.ndarray]) -> np.ndarray | None:
            w = _first_witness(query, cands)
            return None if w is None else w[0]

        out = batched.search(pb, root.upper, deadline=bab_until, batch=self.batch, steps=self.node_alpha_steps,
                             root_steps=self.alpha_steps, leaf_unstable=self.batch_leaf_unstable,
                             dtype=self.batch_dtype, leaf=leaf, confirm=confirm, interm=self.refine_intermediate)
        stats.update(out.stats)
        stats["batched"] = 1
        if out.unsat:
            return self._result(Verdict.UNSAT, t0, message=f"batched branch and bound: {out.message}", details=stats)
        if leaf_out and leaf_out[-1].verdict is not Verdict.TIMEOUT:
            return leaf_out[-1]  # a leaf MILP's re-checked SAT, or its error
        if out.witness is not None:  # already re-checked by ``confirm``
            return self._result(Verdict.SAT, t0, counterexample=out.witness, message=out.message, details=stats)
        if time.perf_counter() < deadline - 0.05:  # the MILP with the optimised intermediate bounds
            tight = NodeBounds([PreBounds(b, True, p.out) for b, p in zip(pre, root.pre, strict=True)], root.forms,
                               root.upper, root.lower, False, "")
            return self._fallback(query, st, tight, t0, deadline, stats, stats.get("open_domains", 0))
        return self._result(Verdict.TIMEOUT, t0, message=f"batched branch and bound: {out.message}", details=stats)

    def _milp(self, query: Query, st: Setup, nb: NodeBounds, t0: float, deadline: float,
              stats: dict[str, int], where: str) -> VerificationResult | None:
        """Solve a domain (``nb``'s bounds, whose clamped intervals enforce its splits) as the
        exact MILP with the time left; None when it is infeasible (refuted)."""
        left = deadline - time.perf_counter()
        if left <= 0:
            return self._result(Verdict.TIMEOUT, t0, message="time limit in branch and bound", details=stats)
        model, x, _ = build_milp(query, query_bounds_of(st, nb))
        model.options = dict(FAST_HIGHS_OPTIONS)
        left = deadline - time.perf_counter()
        if left <= 0.05:  # building the model took the rest: HiGHS would overrun a tiny limit
            return self._result(Verdict.TIMEOUT, t0, message="time limit while building the MILP", details=stats)
        out = model.solve(left, threads=self.threads)
        if out.status == "infeasible":
            return None
        if out.values is not None and (out.objective or 0.0) > 0.0:
            unconfirmed = Verdict.TIMEOUT if out.status == "timeout" else Verdict.ERROR
            return self._sat_or_error(query, out.values[x], t0, unconfirmed=unconfirmed, **stats)
        if out.status == "timeout":
            return self._result(Verdict.TIMEOUT, t0, message=f"time limit in the {where} MILP", details=stats)
        return self._result(Verdict.ERROR, t0, message=f"{where} MILP: {out.status} {out.message}", details=stats)

    def _leaf_milp(self, query: Query, st: Setup, nb: NodeBounds, t0: float, deadline: float,
                   stats: dict[str, int]) -> VerificationResult | None:
        stats["milp_leaves"] += 1
        return self._milp(query, st, nb, t0, deadline, stats, "leaf")

    def _fallback(self, query: Query, st: Setup, root: NodeBounds, t0: float, deadline: float,
                  stats: dict[str, int], open_domains: int) -> VerificationResult:
        """The whole query as one MILP with the root's joint bounds and the time left."""
        stats = {**stats, "open_domains": open_domains, "fallback": 1}
        r = self._milp(query, st, root, t0, deadline, stats, "fallback")
        if r is not None:
            return r
        if not query.complete:
            return self._result(Verdict.TIMEOUT, t0, message="runner-up query infeasible: proves nothing", details=stats)
        return self._result(Verdict.UNSAT, t0, message="fallback MILP infeasible", details=stats)
