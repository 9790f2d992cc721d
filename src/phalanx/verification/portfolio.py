"""The joint-attack verifier (SAT only) and the portfolio: attack, bounds, complete backend.

The portfolio is never less sound than its parts: the attack can only answer SAT with a witness
that re-checks in float64 PyTorch, the bounds only UNSAT from a sound over-approximation, and
whatever is left goes to a complete backend (MILP by default) with the remaining time.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from phalanx.errors import PhalanxError
from phalanx.verification.backends import BoundsVerifier, Verifier
from phalanx.verification.query import Query, QueryKind, Verdict, VerificationResult, recheck


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


#: member-robustness verdicts cached per process: (member fingerprint, point, eps, label) -> verdict
_MEMBER_CACHE: dict[tuple[str, str, float, int, tuple[float, float]], Verdict] = {}


def _member_key(query: Query, i: int) -> tuple[str, str, float, int, tuple[float, float]]:
    from phalanx.verification.query import model_fingerprint, point_fingerprint

    # hashed afresh every time: a module object whose weights changed in place is another network
    fp = model_fingerprint(query.models[i])
    return fp, point_fingerprint(query.x0), float(query.eps), query.label, query.input_bounds


def robust_members(query: Query, backend: Verifier, time_limit_s: float) -> tuple[int, int]:
    """How many chosen members are individually proven robust in the ball (their own
    single-network query UNSAT); cached across queries sharing a member, point and eps.

    A mutual-error / majority property needs ``quorum`` members to err at one input, so if more
    than ``k - quorum`` members can never err there, the query is UNSAT (sound: a member's
    robustness holds for every input of the ball). Returns ``(robust, solved_now)``."""
    from phalanx.verification.query import make_query

    robust = solved = 0
    t0 = time.perf_counter()
    for i in range(len(query.nets)):
        key = _member_key(query, i)
        v = _MEMBER_CACHE.get(key)
        if v is None:
            left = time_limit_s - (time.perf_counter() - t0)
            if left <= 0:
                break
            single = make_query([query.models[i]], query.x0, query.eps, query.label, nets=[query.nets[i]],
                                input_bounds=query.input_bounds)
            v = backend.verify(single, time_limit_s=left).verdict
            solved += 1
            if v.decided:
                _MEMBER_CACHE[key] = v
        robust += v is Verdict.UNSAT
        if len(query.nets) - robust < query.required:
            break
    return robust, solved


class Portfolio(Verifier):
    """Cheap SAT by a joint attack, cheap UNSAT by linear bounds and by member-wise robustness
    proofs (cached), then a complete backend on the joint query."""

    name = "portfolio"

    def __init__(self, complete: str = "bab", attacks: Sequence[str] | None = None, steps: int = 50,
                 bounds: str = "crown", member_proofs: bool = True, **complete_options: object) -> None:
        from phalanx.verification import create_verifier

        self.attack = AttackVerifier(attacks, steps=steps)
        # "crown": joint back-substituted bounds over all members (bab.py); "linear" / "interval":
        # per-member forward bounds (backends.py)
        self.bounds = create_verifier("crown") if bounds == "crown" else BoundsVerifier(bounds)
        self.backend = create_verifier(complete, **complete_options)
        same_threads = {k: v for k, v in complete_options.items() if k == "threads"}
        self.member_backend = create_verifier("milp", **same_threads) if complete in ("milp", "smt") else self.backend
        self.member_proofs, self.member_share = member_proofs, 0.5
        self.name = f"portfolio({complete})"

    def verify(self, query: Query, *, time_limit_s: float) -> VerificationResult:
        t0 = time.perf_counter()
        stages: dict[str, float] = {}
        for stage in (self.attack, self.bounds):
            r = stage.verify(query, time_limit_s=time_limit_s)
            stages[stage.name] = round(r.wall_time_s, 6)
            if r.verdict.decided:
                return self._finish(r, t0, stage.name, stages)
        if self.member_proofs and query.complete and query.kind is not QueryKind.MEAN_LOGITS and len(query.nets) > 1:
            t1 = time.perf_counter()
            left = time_limit_s - (t1 - t0)
            robust, _ = robust_members(query, self.member_backend, left * self.member_share)
            stages["members"] = round(time.perf_counter() - t1, 6)
            if len(query.nets) - robust < query.required:
                r = VerificationResult(Verdict.UNSAT, "members", time.perf_counter() - t1,
                                       message=f"{robust} of {len(query.nets)} members are individually robust")
                return self._finish(r, t0, "members", stages)
        left = time_limit_s - (time.perf_counter() - t0)
        if left <= 0:
            return self._result(Verdict.TIMEOUT, t0, message="time limit spent in attack and bounds",
                                details={"stages": stages})
        r = self.backend.verify(query, time_limit_s=left)
        stages[self.backend.name] = round(r.wall_time_s, 6)
        return self._finish(r, t0, self.backend.name, stages)

    def _finish(self, r: VerificationResult, t0: float, stage: str, stages: dict[str, float]) -> VerificationResult:
        details = dict(r.details)
        details.update({"stage": stage, "stages": stages})
        return VerificationResult(r.verdict, f"portfolio/{stage}", time.perf_counter() - t0, r.counterexample,
                                  r.message, details)
