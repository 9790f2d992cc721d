"""Scores (Defs. 3, 4) by hand, agreement points, selection on a pre-filled store, resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from phalanx.errors import PhalanxError
from phalanx.verification.query import Verdict, VerificationResult
from phalanx.verification.runner import Candidates, QuerySpec, Record, ResultStore, run_queries
from phalanx.verification.scores import ScoreTable, agreement_points, pair_specs
from phalanx.verification.selection import SelectionConfig, select_members


def _rec(members, point, eps, verdict) -> Record:
    spec = QuerySpec(tuple(members), point, eps, 0)
    return Record(f"{members}-{point}-{eps}", spec, VerificationResult(Verdict(verdict), "test", 0.0))


def test_mutual_error_and_uniqueness_by_hand() -> None:
    # 4 points, eps 0.1: pair (0,1) errs on 2 points, (0,2) on 1, (1,2) never; one timeout on (1,2)
    recs = [_rec((0, 1), p, 0.1, "sat" if p < 2 else "unsat") for p in range(4)]
    recs += [_rec((0, 2), p, 0.1, "sat" if p == 0 else "unsat") for p in range(4)]
    recs += [_rec((1, 2), p, 0.1, "timeout" if p == 3 else "unsat") for p in range(4)]
    t = ScoreTable.from_records(recs, (0, 1, 2), (0.1,), 4)
    assert t.mutual_error(0.1, 0, 1) == 0.5 and t.mutual_error(0.1, 2, 0) == 0.25 and t.mutual_error(0.1, 1, 2) == 0
    assert t.uniqueness(0.1, 0) == pytest.approx(1 - (0.5 + 0.25) / 2)
    assert t.uniqueness(0.1, 1) == pytest.approx(1 - 0.5 / 2)
    assert t.uniqueness(0.1, 2) == pytest.approx(1 - 0.25 / 2)
    assert t.member_counts(0.1, 2) == (1, 6, 1)
    assert "table V" in t.markdown()
    json.dumps(t.to_json())


def test_agreement_points(mlp_ensemble, digits) -> None:
    ms = list(mlp_ensemble.members)
    idx = agreement_points(ms, digits.val.x, digits.val.y, count=10)
    with torch.no_grad():
        preds = torch.stack([m(digits.val.x[idx]).argmax(-1) for m in ms])
    assert len(idx) == 10 and bool((preds == digits.val.y[idx]).all())
    only3 = agreement_points(ms, digits.val.x, digits.val.y, label=3)
    assert len(only3) > 0 and bool((digits.val.y[only3] == 3).all())


def test_pair_specs_count() -> None:
    specs = pair_specs((0, 1, 2, 3), 5, (0.01, 0.02), [0] * 5)
    assert len(specs) == 6 * 5 * 2 and len({(s.members, s.point, s.eps) for s in specs}) == len(specs)
    assert len(pair_specs((0, 1, 2, 3), 2, (0.1,), [0, 0], subset_size=3)) == 4 * 2
    with pytest.raises(PhalanxError):
        pair_specs((0, 1), 1, (0.1,), [0], subset_size=3)


@pytest.fixture(scope="module")
def four_candidates(digits):
    from phalanx import create_model

    torch.manual_seed(5)
    ms = [create_model("mlp", digits.in_shape, 10, mean=digits.mean, std=digits.std, widths=[4]).eval()
          for _ in range(4)]
    return Candidates.from_models(ms)


def test_selection_replaces_least_unique_member(four_candidates) -> None:
    """Pre-filled store: pairs with N0 always err, N3 never errs with anyone -> N0 is swapped for N3."""
    cands = four_candidates
    pts = np.random.default_rng(0).random((3, 64))
    labels = [0, 1, 2]
    store = ResultStore()
    eps = (0.05,)
    for a in range(4):
        for b in range(a + 1, 4):
            for p in range(3):
                spec = QuerySpec((a, b), p, 0.05, labels[p])
                v = "sat" if 0 in (a, b) and 3 not in (a, b) else ("sat" if (a, b) == (1, 2) and p == 0 else "unsat")
                store.add(Record(spec.qid(cands, pts[p]), spec, VerificationResult(Verdict(v), "test", 0.0)))
    res = select_members(cands, pts, labels, SelectionConfig(k=3, eps=eps, max_iters=5, backend="bounds"),
                         store=store)
    first = res.steps[0]
    assert first.ensemble == (0, 1, 2) and first.weakest == 0
    assert first.uniqueness[0] == pytest.approx(0.0) and first.candidate_scores[3] == pytest.approx(1.0)
    assert first.replaced == (0, 3) and res.final == (1, 2, 3)
    assert res.stop_reason.startswith("converged") and all(s.queries == 0 for s in res.steps)


def test_killed_run_resumes(four_candidates, tmp_path) -> None:
    cands = four_candidates
    pts = np.random.default_rng(1).random((3, 64))
    specs = pair_specs((0, 1, 2), 3, (0.02, 0.3), [0, 1, 2])
    path = tmp_path / "queries.jsonl"
    first = run_queries(cands, pts, specs[:7], backend="milp", time_limit_s=20, store=ResultStore(path))
    lines = path.read_text().splitlines()
    assert len(lines) == 7
    path.write_text("\n".join(lines) + '\n{"qid": "trunc')  # a write cut off by the kill
    store = ResultStore(path)
    assert len(store.records) == 7
    recs = run_queries(cands, pts, specs, backend="milp", time_limit_s=20, store=store)
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith('{"qid": "') and ln.endswith("}")]
    assert len(lines) == len(specs)  # nothing solved twice
    assert [r.result.to_json() for r in recs[:7]] == [r.result.to_json() for r in first]
    assert all(r.result.verdict.decided for r in recs)
