"""Agreement points (Def. 1), mutual-error scores (Def. 3) and uniqueness scores (Def. 4) of
Amir et al. (2022), computed from pairwise (or k-subset) mutual-error query results.

``ME(N_i, N_j) = #{points with a mutual error in the eps-ball} / m`` and
``US(N_i) = 1 - sum_{j != i} ME(N_i, N_j) / (n - 1)``; per eps, as the paper's tables IV/V.
Only SAT counts as a mutual error; TIMEOUT/ERROR are counted separately (``undecided``) so a
table shows how far each score could move.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from phalanx.errors import PhalanxError
from phalanx.verification.query import Verdict
from phalanx.verification.runner import QuerySpec, Record


def agreement_points(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, *, count: int | None = None,
                     label: int | None = None, correct: bool = True) -> torch.Tensor:
    """Indices of inputs on which every model predicts the same label (Def. 1); with ``correct``
    (the paper's choice, section III-C) that label must be ``y``; optionally only of one ``label``.
    Checked sequentially, at most ``count`` indices."""
    if len(models) < 1:
        raise PhalanxError("agreement points need at least one model")
    with torch.no_grad():
        preds = torch.stack([m.eval()(x).argmax(-1) for m in models])
    agree = (preds == preds[0]).all(0)
    if correct:
        agree &= preds[0] == y
    if label is not None:
        agree &= preds[0] == int(label)
    idx = agree.nonzero().flatten()
    return idx[:count] if count is not None else idx


def pair_specs(members: Sequence[int], n_points: int, eps_list: Sequence[float], labels: Sequence[int], *,
               subset_size: int = 2, runner_up: bool = False) -> list[QuerySpec]:
    """Mutual-error queries for every ``subset_size``-subset of ``members``, point and eps."""
    if subset_size < 1 or subset_size > len(members):
        raise PhalanxError(f"subset size {subset_size} out of range; accepted: 1..{len(members)}")
    return [QuerySpec(tuple(sub), p, float(e), int(labels[p]), runner_up=runner_up)
            for e in eps_list for sub in itertools.combinations(sorted(members), subset_size) for p in range(n_points)]


@dataclass
class ScoreTable:
    """Counts per (eps, subset) and the derived scores for a member set."""

    members: tuple[int, ...]
    eps: tuple[float, ...]
    m: int  # number of agreement points
    sat: dict[tuple[float, tuple[int, ...]], int] = field(default_factory=dict)
    unsat: dict[tuple[float, tuple[int, ...]], int] = field(default_factory=dict)
    undecided: dict[tuple[float, tuple[int, ...]], int] = field(default_factory=dict)

    @classmethod
    def from_records(cls, records: Sequence[Record], members: Sequence[int], eps: Sequence[float], m: int) -> ScoreTable:
        t = cls(tuple(sorted(members)), tuple(float(e) for e in eps), m)
        mem = set(t.members)
        for r in records:
            sub = tuple(sorted(r.spec.members))
            if not set(sub) <= mem or float(r.spec.eps) not in t.eps:
                continue
            key = (float(r.spec.eps), sub)
            d = {Verdict.SAT: t.sat, Verdict.UNSAT: t.unsat}.get(r.result.verdict, t.undecided)
            d[key] = d.get(key, 0) + 1
        return t

    def mutual_error(self, eps: float, i: int, j: int) -> float:
        """Def. 3: fraction of agreement points with a SAT mutual-error query for the pair."""
        return self.sat.get((float(eps), tuple(sorted((i, j)))), 0) / max(self.m, 1)

    def uniqueness(self, eps: float, i: int, among: Sequence[int] | None = None) -> float:
        """Def. 4 for member ``i`` w.r.t. ``among`` (default: this table's members)."""
        others = [j for j in (among if among is not None else self.members) if j != i]
        if not others:
            return 1.0
        return 1.0 - sum(self.mutual_error(eps, i, j) for j in others) / len(others)

    def mean_uniqueness(self, i: int, among: Sequence[int] | None = None) -> float:
        """The uniqueness averaged over eps (the score the selection compares)."""
        return float(np.mean([self.uniqueness(e, i, among) for e in self.eps]))

    def member_counts(self, eps: float, i: int) -> tuple[int, int, int]:
        """Table IV: #SAT, #UNSAT, #undecided over all pairs containing ``i``."""
        keys = [(float(eps), s) for s in {k[1] for k in (*self.sat, *self.unsat, *self.undecided)} if i in s]
        return (sum(self.sat.get(k, 0) for k in keys), sum(self.unsat.get(k, 0) for k in keys),
                sum(self.undecided.get(k, 0) for k in keys))

    def to_json(self) -> dict[str, Any]:
        return {"members": list(self.members), "eps": list(self.eps), "points": self.m,
                "uniqueness": {str(e): {str(i): self.uniqueness(e, i) for i in self.members} for e in self.eps},
                "mutual_error": {str(e): {f"{a}-{b}": self.mutual_error(e, a, b)
                                          for a, b in itertools.combinations(self.members, 2)} for e in self.eps},
                "counts": {str(e): {str(i): dict(zip(("sat", "unsat", "undecided"), self.member_counts(e, i),
                                                     strict=True)) for i in self.members} for e in self.eps}}

    def markdown(self, names: Sequence[str] | None = None) -> str:
        """Tables IV (counts) and V (uniqueness, %) of the paper, one row per eps."""
        from phalanx.reports import table

        nm = list(names) if names is not None else [f"N{i}" for i in self.members]
        counts = table(["eps", *[f"{n} SAT/UNSAT/?" for n in nm]],
                       [[e, *["/".join(str(c) for c in self.member_counts(e, i)) for i in self.members]]
                        for e in self.eps])
        us = table(["eps", *[f"US {n}" for n in nm]],
                   [[e, *[f"{100 * self.uniqueness(e, i):.2f}" for i in self.members]] for e in self.eps])
        return f"Mutual-error query counts per member (paper table IV):\n\n{counts}\n\n" \
               f"Uniqueness scores in % (paper table V):\n\n{us}\n"
