"""Cache and store keys: everything that defines a query is in its id, and a resumed run with
different points, eps or architectures never reuses (or mis-attributes) a stale verdict."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from phalanx.verification.query import Verdict, VerificationResult, model_fingerprint, point_fingerprint
from phalanx.verification.runner import Candidates, QuerySpec, Record, ResultStore, run_queries
from phalanx.verification.selection import SelectionConfig, select_members


def _mlp(act: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3), act, nn.Linear(3, 2))


def test_fingerprint_sees_the_architecture() -> None:
    """Same parameters, different activation (no parameters of its own): different networks."""
    a, b, c = _mlp(nn.ReLU()), _mlp(nn.LeakyReLU(0.1)), _mlp(nn.LeakyReLU(0.2))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert len({model_fingerprint(a), model_fingerprint(b), model_fingerprint(c)}) == 3
    assert model_fingerprint(a) == model_fingerprint(_mlp(nn.ReLU()))


def test_point_and_eps_are_keyed_exactly() -> None:
    x = np.random.default_rng(0).random(4)
    y = x.copy()
    y[0] = np.nextafter(np.float32(y[0]), 2.0)  # a change float32 rounding could hide is still a change
    y[1] += 1e-12
    assert point_fingerprint(x) != point_fingerprint(y)
    cands = Candidates.from_models([_mlp(nn.ReLU()), _mlp(nn.ReLU())])
    s1, s2 = QuerySpec((0, 1), 0, 0.1, 0), QuerySpec((0, 1), 0, 0.1 + 1e-12, 0)
    assert s1.qid(cands, x) != s2.qid(cands, x)


def test_stored_record_is_returned_with_the_current_spec(tmp_path) -> None:
    """A record stored by an earlier run (point index 1 there) answers the same query at index 0
    now: the returned record must carry the caller's spec (index 0), not the stale index."""
    cands = Candidates.from_models([_mlp(nn.ReLU()), _mlp(nn.ReLU())])
    pts = np.random.default_rng(0).random((2, 4))
    old = QuerySpec((0, 1), 1, 0.05, 0)
    store = ResultStore()
    store.add(Record(old.qid(cands, pts[1]), old, VerificationResult(Verdict.UNSAT, "test", 0.0)))
    now = QuerySpec((0, 1), 0, 0.05, 0)
    recs = run_queries(cands, pts[1:], [now], backend="bounds", store=store)
    assert recs[0].spec == now and recs[0].result.verdict is Verdict.UNSAT


def test_selection_ignores_records_of_other_points(tmp_path) -> None:
    """A resumed store holding SAT records of points this run does not use must not count."""
    torch.manual_seed(1)
    cands = Candidates.from_models([_mlp(nn.ReLU()) for _ in range(3)])
    rng = np.random.default_rng(3)
    pts, other = rng.random((2, 4)), rng.random((5, 4))
    labels = [0, 0]
    store = ResultStore()
    eps = 0.05
    for a, b in ((0, 1), (0, 2), (1, 2)):
        for p in range(2):
            spec = QuerySpec((a, b), p, eps, labels[p])
            store.add(Record(spec.qid(cands, pts[p]), spec, VerificationResult(Verdict.UNSAT, "test", 0.0)))
        if (a, b) == (0, 1):  # stale SAT records from another run's points, for pair (0, 1) only
            for p in range(5):
                spec = QuerySpec((a, b), p, eps, 0)
                store.add(Record(spec.qid(cands, other[p]), spec, VerificationResult(Verdict.SAT, "test", 0.0)))
    res = select_members(cands, pts, labels, SelectionConfig(k=2, eps=(eps,), max_iters=0, backend="bounds"),
                         store=store)
    assert res.steps[0].queries == 0
    assert res.initial_table.sat == {}
    assert res.steps[0].uniqueness == {0: 1.0, 1: 1.0}
