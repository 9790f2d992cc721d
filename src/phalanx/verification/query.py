"""Verification queries on one or more members around a point, their verdicts and witnesses.

A query asks: is there an ``x`` in the L-inf ball of radius ``eps`` around ``x0`` (intersected
with the input box) on which the chosen output property holds?

- ``mutual-error`` (Amir et al. Def. 2, appendix B; k-subset generalisation): at least
  ``quorum`` of the chosen members (default: all) do not predict ``label``. The exact form has one
  disjunction ``OR_{r != l} y_r >= y_l`` per member; ``runner_up`` keeps only one disjunct per
  member (the paper's simplification: it can only report SAT, never UNSAT).
- ``mean-logits`` (appendix A): the argmax of the mean of the members' logits is not ``label``.
- ``majority`` (appendix A for the vote combiner): at least ``ceil(k/2)`` members do not predict
  ``label``, i.e. ``label`` can lose its strict majority of votes.
- ``property`` (VNN-LIB, :mod:`phalanx.verification.interchange`): an explicit input box and
  explicit groups over the concatenated outputs with VNN-LIB's non-strict semantics
  (``c . Y >= 0``); built by :func:`property_query`. Constant terms are carried by a constant
  network (:class:`ConstantNet`) whose single output is 1.

Every query's property is a list of *groups*, each a disjunction of linear functions
``c . Y >= 0`` of the concatenated logits ``Y``; the property holds when at least ``quorum``
groups hold. All backends read this one form.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from phalanx.errors import PhalanxError
from phalanx.types import check_eps, parse_enum
from phalanx.verification.ir import NetworkIR, stack_outputs, to_ir

#: Marabou has no strict inequalities: "label l is not the argmax" is ``y_r - y_l >= MARGIN``
#: (REFERENCE-FACTS, Marabou 2.0; ``DESIGN.md``)
MARGIN = 1e-3


class Verdict(str, enum.Enum):
    SAT = "sat"
    UNSAT = "unsat"
    TIMEOUT = "timeout"
    ERROR = "error"

    @property
    def decided(self) -> bool:
        return self in (Verdict.SAT, Verdict.UNSAT)


class QueryKind(str, enum.Enum):
    MUTUAL_ERROR = "mutual-error"
    MEAN_LOGITS = "mean-logits"
    MAJORITY = "majority"
    PROPERTY = "property"

    @classmethod
    def parse(cls, value: str | QueryKind) -> QueryKind:
        return parse_enum(cls, value, "query kind")


@dataclass
class VerificationResult:
    """A verdict, the time and backend that decided it, and a re-checked witness for SAT."""

    verdict: Verdict
    backend: str
    wall_time_s: float
    counterexample: np.ndarray | None = None
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict.value, "backend": self.backend, "wall_time_s": round(self.wall_time_s, 6),
                "message": self.message, "details": self.details,
                "counterexample": None if self.counterexample is None else self.counterexample.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VerificationResult:
        cx = d.get("counterexample")
        return cls(Verdict(d["verdict"]), d["backend"], float(d["wall_time_s"]),
                   None if cx is None else np.asarray(cx, dtype=np.float64), d.get("message", ""),
                   dict(d.get("details", {})))


@dataclass(frozen=True, eq=False)
class Query:
    """A query on ``models`` (PyTorch members, used to re-check witnesses) and their IR ``nets``."""

    models: tuple[nn.Module, ...]
    nets: tuple[NetworkIR, ...]
    x0: np.ndarray
    eps: float
    label: int
    kind: QueryKind = QueryKind.MUTUAL_ERROR
    quorum: int | None = None
    runner_up: tuple[int, ...] | None = None
    input_bounds: tuple[float, float] = (0.0, 1.0)
    qid: str = ""
    #: ``property`` queries only: the input box and the groups (see :func:`property_query`)
    spec_box: tuple[np.ndarray, np.ndarray] | None = None
    spec_groups: tuple[tuple[np.ndarray, ...], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", QueryKind.parse(self.kind))
        object.__setattr__(self, "x0", np.asarray(self.x0, dtype=np.float64).reshape(-1))
        check_eps(self.eps, self.input_bounds[1] - self.input_bounds[0])
        if not self.nets or len(self.nets) != len(self.models):
            raise PhalanxError("a query needs one IR per model and at least one model")
        if self.kind is QueryKind.PROPERTY:
            self._check_property()
            return
        if self.spec_box is not None or self.spec_groups is not None:
            # the ball of x0 and eps is the box of every other kind (member facts and bound caches
            # key it by them): an explicit box and groups make a property query
            raise PhalanxError(f"spec_box and spec_groups belong to property queries, not to kind "
                               f"{self.kind.value!r}; accepted: property_query(...) for an explicit box")
        if len({n.out_dim for n in self.nets}) != 1 or len({n.in_dim for n in self.nets}) != 1:
            raise PhalanxError("queried members must share input and output sizes")
        if self.x0.size != self.nets[0].in_dim:
            raise PhalanxError(f"x0 has {self.x0.size} entries, the members expect {self.nets[0].in_dim}")
        lo_b, hi_b = self.input_bounds
        if not lo_b <= hi_b or not np.all((self.x0 >= lo_b) & (self.x0 <= hi_b)):
            # outside the box, ball and box may not meet: box() would not lie inside the ball
            raise PhalanxError(f"x0 must lie in the input bounds {self.input_bounds} (values in "
                               f"[{self.x0.min():g}, {self.x0.max():g}]); accepted: lo <= x0 <= hi")
        if not 0 <= self.label < self.num_classes:
            raise PhalanxError(f"label {self.label} out of range; accepted: 0..{self.num_classes - 1}")
        if self.runner_up is not None:
            if self.kind is not QueryKind.MUTUAL_ERROR or len(self.runner_up) != len(self.nets):
                raise PhalanxError("runner_up needs one label per member of a mutual-error query")
            if any(r == self.label or not 0 <= r < self.num_classes for r in self.runner_up):
                raise PhalanxError(f"runner-up labels {self.runner_up} must be valid and differ from {self.label}")
        q = self.required
        if not 1 <= q <= self.num_groups:
            raise PhalanxError(f"quorum {self.quorum} out of range; accepted: 1..{self.num_groups}")

    def _check_property(self) -> None:
        if self.spec_box is None or self.spec_groups is None or not self.spec_groups:
            raise PhalanxError("a property query needs spec_box and at least one group (use property_query)")
        if len({n.in_dim for n in self.nets}) != 1 or self.x0.size != self.nets[0].in_dim:
            raise PhalanxError("the networks of a property query must share one input")
        lo, hi = self.spec_box
        if lo.shape != (self.nets[0].in_dim,) or hi.shape != lo.shape or not np.all(lo <= hi):
            raise PhalanxError("the input box of a property query must have one lower <= upper per input")
        total = sum(n.out_dim for n in self.nets)
        if any(len(g) == 0 or any(c.shape != (total,) for c in g) for g in self.spec_groups):
            raise PhalanxError(f"every group needs coefficient vectors over the {total} concatenated outputs")
        if not 1 <= self.required <= self.num_groups:
            raise PhalanxError(f"quorum {self.quorum} out of range; accepted: 1..{self.num_groups}")

    @property
    def num_classes(self) -> int:
        return self.nets[0].out_dim

    @property
    def num_groups(self) -> int:
        if self.spec_groups is not None:
            return len(self.spec_groups)
        return 1 if self.kind is QueryKind.MEAN_LOGITS else len(self.nets)

    @property
    def required(self) -> int:
        """How many groups must hold (the quorum)."""
        if self.kind is QueryKind.PROPERTY:
            return self.num_groups if self.quorum is None else int(self.quorum)
        if self.kind is QueryKind.MEAN_LOGITS:
            return 1
        if self.kind is QueryKind.MAJORITY:
            return math.ceil(len(self.nets) / 2)
        return len(self.nets) if self.quorum is None else int(self.quorum)

    @property
    def complete(self) -> bool:
        """False for the runner-up simplification, whose UNSAT proves nothing."""
        return self.runner_up is None

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        if self.spec_box is not None:
            return self.spec_box[0].copy(), self.spec_box[1].copy()
        lo, hi = self.input_bounds
        return np.clip(self.x0 - self.eps, lo, hi), np.clip(self.x0 + self.eps, lo, hi)

    def groups(self) -> list[list[np.ndarray]]:
        """Each group is a list of coefficient vectors ``c`` over the concatenated logits; a
        group holds when ``c . Y >= 0`` for some ``c`` in it (``>= margin`` in Marabou)."""
        if self.spec_groups is not None:
            return [list(g) for g in self.spec_groups]
        total, slices = stack_outputs(self.nets)
        k, lab = self.num_classes, self.label
        out: list[list[np.ndarray]] = []
        if self.kind is QueryKind.MEAN_LOGITS:
            group = []
            for r in range(k):
                if r == lab:
                    continue
                c = np.zeros(total)
                for s in slices:
                    c[s.start + r] += 1.0 / len(slices)
                    c[s.start + lab] -= 1.0 / len(slices)
                group.append(c)
            return [group]
        for i, s in enumerate(slices):
            labels = [self.runner_up[i]] if self.runner_up is not None else [r for r in range(k) if r != lab]
            group = []
            for r in labels:
                c = np.zeros(total)
                c[s.start + r], c[s.start + lab] = 1.0, -1.0
                group.append(c)
            out.append(group)
        return out

    def describe(self) -> dict[str, Any]:
        if self.kind is QueryKind.PROPERTY:
            return {"kind": self.kind.value, "networks": len(self.nets), "inputs": int(self.x0.size),
                    "groups": self.num_groups, "quorum": self.required, "qid": self.qid}
        return {"kind": self.kind.value, "members": len(self.nets), "eps": self.eps, "label": self.label,
                "quorum": self.required, "runner_up": list(self.runner_up) if self.runner_up else None,
                "qid": self.qid}


def member_labels(models: Sequence[nn.Module], x: np.ndarray, in_shape: tuple[int, ...]) -> np.ndarray:
    """(M, K) float64 logits of each model at one flat input (float64 PyTorch forward pass)."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(1, *in_shape))
    outs = []
    with torch.no_grad():
        for m in models:
            d = copy.deepcopy(m).double().eval()
            outs.append(d(xt)[0].numpy())
    return np.stack(outs)


class ConstantNet(nn.Module):
    """The network ``x -> 1`` on inputs of ``in_shape``: carries the constant terms of VNN-LIB
    atoms (``c . Y + d >= 0`` is ``c . Y + d * 1 >= 0``) so every backend reads plain groups."""

    def __init__(self, in_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.in_shape = in_shape
        self.one: torch.Tensor
        self.register_buffer("one", torch.ones(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.one.to(x.dtype).expand(x.shape[0], 1)

    def ir(self) -> NetworkIR:
        from phalanx.verification.ir import Affine

        n = int(np.prod(self.in_shape))
        return NetworkIR((Affine(np.zeros((1, n)), np.ones(1)),), n, 1, self.in_shape)


def property_query(models: Sequence[nn.Module], nets: Sequence[NetworkIR], lower: np.ndarray, upper: np.ndarray,
                   groups: Sequence[Sequence[np.ndarray]], *, quorum: int | None = None, qid: str = "") -> Query:
    """A ``property`` query: some ``x`` in ``[lower, upper]`` with at least ``quorum`` (default
    all) groups holding, a group holding when ``c . Y >= 0`` for one of its ``c`` (``Y`` the
    concatenated outputs of ``nets``; add a :class:`ConstantNet` for constant terms)."""
    lo, hi = np.asarray(lower, dtype=np.float64).reshape(-1), np.asarray(upper, dtype=np.float64).reshape(-1)
    gs = tuple(tuple(np.asarray(c, dtype=np.float64).reshape(-1) for c in g) for g in groups)
    if lo.size == 0 or not np.all(np.isfinite(lo)) or not np.all(np.isfinite(hi)):
        raise PhalanxError("a property query needs a finite input box")
    x0 = (lo + hi) / 2
    eps = float(np.max(hi - lo)) / 2
    span = (float(lo.min()), float(hi.max()))
    return Query(tuple(models), tuple(nets), x0, eps, 0, QueryKind.PROPERTY, quorum, None, span, qid, (lo, hi), gs)


def output_vector(query: Query, x: np.ndarray) -> np.ndarray:
    """The concatenated flat float64 PyTorch outputs of every queried model at one flat input."""
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(1, *query.nets[0].in_shape))
    with torch.no_grad():
        return np.concatenate([copy.deepcopy(m).double().eval()(xt).reshape(-1).numpy() for m in query.models])


def group_margins(query: Query, y: np.ndarray) -> np.ndarray:
    """Per group, the largest ``c . Y`` of its disjuncts (the group holds where it is ``>= 0``)."""
    return np.asarray([max(float(c @ y) for c in g) for g in query.groups()])


def property_holds(query: Query, logits: np.ndarray) -> tuple[bool, list[int]]:
    """Evaluate the query's property with PyTorch's argmax semantics on (M, K) logits
    (``property`` queries: VNN-LIB's ``>=`` on the concatenated outputs)."""
    if query.kind is QueryKind.PROPERTY:
        m = group_margins(query, np.concatenate([np.ravel(z) for z in logits]))
        return int(np.sum(m >= 0.0)) >= query.required, []
    preds = [int(np.argmax(z)) for z in logits]
    if query.kind is QueryKind.MEAN_LOGITS:
        return int(np.argmax(logits.mean(0))) != query.label, preds
    wrong = sum(p != query.label for p in preds)
    return wrong >= query.required, preds


def recheck(query: Query, x: np.ndarray | None) -> tuple[np.ndarray | None, str, dict[str, Any]]:
    """Re-check a SAT candidate: project it onto the ball and the input box, run a float64
    PyTorch forward pass of every queried model, and confirm the property with argmax semantics.
    Returns ``(witness or None, message, details)``."""
    if x is None:
        return None, "no candidate", {}
    cand = np.asarray(x, dtype=np.float64).reshape(-1)
    if cand.size != query.x0.size or not np.all(np.isfinite(cand)):
        return None, "candidate has the wrong size or non-finite entries", {}
    lo, hi = query.box()
    drift = float(np.max(np.maximum(lo - cand, cand - hi), initial=0.0))
    cand = np.clip(cand, lo, hi)
    if query.kind is QueryKind.PROPERTY:
        y = output_vector(query, cand)
        ok, _ = property_holds(query, y[None, :])
        details: dict[str, Any] = {"group_margins": group_margins(query, y).tolist(), "projection_drift": drift}
        if not ok:
            return None, "candidate does not satisfy the property in float64 PyTorch", details
        return cand, "re-checked in float64 PyTorch", details
    logits = member_labels(query.models, cand, query.nets[0].in_shape)
    ok, preds = property_holds(query, logits)
    linf = float(np.max(np.abs(cand - query.x0)))
    details = {"member_labels": preds, "projection_drift": drift, "linf": linf}
    if query.kind is QueryKind.MEAN_LOGITS:
        details["ensemble_label"] = int(np.argmax(logits.mean(0)))
    blo, bhi = query.input_bounds
    if linf > query.eps * (1 + 1e-12) + 1e-15 or np.any(cand < blo) or np.any(cand > bhi):
        return None, f"candidate leaves the eps-ball or the input bounds (L-inf {linf:.6g})", details
    if not ok:
        return None, f"candidate does not re-check in float64 PyTorch (labels {preds})", details
    return cand, "re-checked in float64 PyTorch", details


def query_id(parts: Sequence[Any]) -> str:
    """A stable id from JSON-able parts (member fingerprints, point, eps, kind, ...)."""
    h = hashlib.sha1(repr(list(parts)).encode())
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """A stable hash of a model's architecture (its module tree, which names parameter-free layers
    such as the activation and its slope) and of its parameters and buffers."""
    h = hashlib.sha1(repr(model).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().to(torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def point_fingerprint(x: np.ndarray) -> str:
    """Hash of the exact float64 point (float32 would merge points closer than its resolution)."""
    return hashlib.sha1(np.ascontiguousarray(x, dtype=np.float64).tobytes()).hexdigest()[:12]


def make_query(models: Sequence[nn.Module], x0: np.ndarray | torch.Tensor, eps: float, label: int, *,
               kind: QueryKind | str = QueryKind.MUTUAL_ERROR, quorum: int | None = None,
               runner_up: bool = False, nets: Sequence[NetworkIR] | None = None,
               input_bounds: tuple[float, float] = (0.0, 1.0), qid: str = "") -> Query:
    """Build a query; ``runner_up=True`` picks each member's runner-up label at ``x0``."""
    ms = tuple(models)
    irs = tuple(nets) if nets is not None else tuple(to_ir(m) for m in ms)
    x = np.asarray(x0.detach().cpu().numpy() if isinstance(x0, torch.Tensor) else x0, dtype=np.float64).reshape(-1)
    ru: tuple[int, ...] | None = None
    if runner_up:
        logits = np.stack([n.forward(x) for n in irs])
        ru = tuple(int(np.argsort(np.where(np.arange(z.size) == label, -np.inf, z))[-1]) for z in logits)
    return Query(ms, irs, x, float(eps), int(label), QueryKind.parse(kind), quorum, ru, input_bounds, qid)
