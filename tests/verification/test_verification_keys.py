"""Cache and store keys: everything that defines a query is in its id, and a resumed run with
different points, eps or architectures never reuses (or mis-attributes) a stale verdict."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from phalanx.models.base import FeatureNet, Normalize
from phalanx.verification.query import Verdict, VerificationResult, model_fingerprint, point_fingerprint
from phalanx.verification.runner import Candidates, QuerySpec, Record, ResultStore, run_queries
from phalanx.verification.selection import SelectionConfig, select_members


def _mlp(act: nn.Module, seed: int = 0) -> FeatureNet:
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), act, nn.Linear(3, 2))
    return FeatureNet(Normalize([0.0], [1.0]), body, {"in_shape": [1, 2, 2], "num_classes": 2}).eval()


def test_fingerprint_sees_the_architecture() -> None:
    """Same parameters, different activation (no parameters of its own): different networks."""
    a, b, c = _mlp(nn.ReLU()), _mlp(nn.LeakyReLU(0.1)), _mlp(nn.LeakyReLU(0.2))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert len({model_fingerprint(a), model_fingerprint(b), model_fingerprint(c)}) == 3
    assert model_fingerprint(a) == model_fingerprint(_mlp(nn.ReLU()))


def test_point_and_eps_are_keyed_exactly() -> None:
    x = np.random.default_rng(0).random(4)
    y = x.copy()
    y[1] += 1e-12  # below float32 resolution: still a different query point
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
    cands = Candidates.from_models([_mlp(nn.ReLU(), seed) for seed in range(3)])
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


def test_member_cache_sees_weights_changed_in_place() -> None:
    """A member proven robust, then retrained in place (same module object), is a new network:
    the portfolio's member cache must not reuse the old proof."""
    from phalanx.verification import create_verifier
    from phalanx.verification.portfolio import _MEMBER_CACHE, robust_members
    from phalanx.verification.query import make_query

    net = _mlp(nn.ReLU(), 7)
    x = np.full(4, 0.5)
    with torch.no_grad():  # a constant network predicting class 0: robust everywhere
        for p in net.parameters():
            p.zero_()
        net.body[3].bias.copy_(torch.tensor([1.0, 0.0]))  # type: ignore[index]
    _MEMBER_CACHE.clear()
    milp = create_verifier("milp")
    q = make_query([net, net], x, 0.1, 0)
    assert robust_members(q, milp, 10.0) == (1, 1)  # one proof already rules out 2 of 2 erring
    assert robust_members(q, milp, 10.0) == (1, 0)  # cached
    with torch.no_grad():  # now it always predicts class 1: every input is an error
        net.body[3].bias.copy_(torch.tensor([0.0, 1.0]))  # type: ignore[index]
    q2 = make_query([net, net], x, 0.1, 0)
    robust, solved = robust_members(q2, milp, 10.0)
    assert (robust, solved) == (0, 1)  # solved again (SAT), then cached for the twin member
    _MEMBER_CACHE.clear()


def test_query_point_must_lie_in_the_input_bounds() -> None:
    """x0 = -0.5 with eps 0.1 and bounds [0, 1]: ball and box do not meet, and the clipped box
    [0, 0] lies 0.5 away from x0; a 'witness' there would not be in the ball."""
    import pytest

    from phalanx.errors import PhalanxError
    from phalanx.verification.query import make_query

    net = _mlp(nn.ReLU())
    x = np.full(4, 0.5)
    x[2] = -0.5
    with pytest.raises(PhalanxError, match="input bounds"):
        make_query([net], x, 0.1, 0)
    make_query([net], np.clip(x, 0.0, 1.0), 0.1, 0)  # in the box: fine


def test_batch_statistics_batchnorm_is_rejected() -> None:
    """BatchNorm without running statistics normalizes by the batch even in eval mode: reading
    W, b off the unit basis gives a wrong 'affine' layer, so conversion must refuse it."""
    import pytest

    from phalanx.errors import PhalanxError
    from phalanx.verification.ir import to_ir

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8, 2))
    net = FeatureNet(Normalize([0.0], [1.0]), body, {"in_shape": [1, 2, 2], "num_classes": 2}).eval()
    with pytest.raises(PhalanxError, match="not affine"):
        to_ir(net)


def _fake_worker(answer: str | None, *, timeout: bool = False):  # type: ignore[no-untyped-def]
    import subprocess
    from pathlib import Path

    def run(args, **kw):  # type: ignore[no-untyped-def]
        if timeout:
            raise subprocess.TimeoutExpired(args, kw.get("timeout", 0.0))
        if answer is not None:
            Path(args[3]).write_text(answer)
        return subprocess.CompletedProcess(args, 0 if answer is not None else 1, b"", b"Traceback: boom")

    return run


def test_marabou_answers_are_parsed_soundly(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every worker outcome maps to the right verdict; only 'unsat' is UNSAT, and 'sat' is SAT
    only with a witness that re-checks (the clean point does not: the member is right there)."""
    import json

    import pytest

    from phalanx.verification import marabou as mb
    from phalanx.verification.query import make_query

    if not mb.marabou_available():
        pytest.skip("maraboupy not importable")
    net = _mlp(nn.ReLU(), 2)
    x = np.full(4, 0.5)
    label = int(net(torch.as_tensor(x, dtype=torch.float32).reshape(1, 1, 2, 2)).argmax())
    q = make_query([net], x, 0.01, label)
    cases = [(json.dumps({"code": "unsat"}), Verdict.UNSAT), (json.dumps({"code": "TIMEOUT"}), Verdict.TIMEOUT),
             (json.dumps({"code": "ERROR", "message": "x"}), Verdict.ERROR),
             (json.dumps({"code": "UNKNOWN"}), Verdict.ERROR), (json.dumps({"code": "QUIT_REQUESTED"}), Verdict.ERROR),
             (json.dumps({"code": "sat", "x": x.tolist()}), Verdict.ERROR), (json.dumps({"code": "sat"}), Verdict.ERROR),
             ('{"code": "uns', Verdict.ERROR), ("[]", Verdict.ERROR), (None, Verdict.ERROR)]
    v = mb.MarabouVerifier()
    for answer, want in cases:
        monkeypatch.setattr(mb.subprocess, "run", _fake_worker(answer))
        assert v.verify(q, time_limit_s=1.0).verdict is want, answer
    monkeypatch.setattr(mb.subprocess, "run", _fake_worker(None, timeout=True))
    assert v.verify(q, time_limit_s=1.0).verdict is Verdict.TIMEOUT
    ru = make_query([net], x, 0.01, label, runner_up=True)  # the simplification: UNSAT proves nothing
    monkeypatch.setattr(mb.subprocess, "run", _fake_worker(json.dumps({"code": "unsat"})))
    assert v.verify(ru, time_limit_s=1.0).verdict is Verdict.TIMEOUT


def test_retry_undecided_solves_stored_timeouts_again() -> None:
    """A stored TIMEOUT is reused by default (no silent re-solve) and solved again on request."""
    cands = Candidates.from_models([_mlp(nn.ReLU()), _mlp(nn.ReLU(), 1)])
    pts = np.full((1, 4), 0.5)
    spec = QuerySpec((0, 1), 0, 0.01, 0)
    store = ResultStore()
    store.add(Record(spec.qid(cands, pts[0]), spec, VerificationResult(Verdict.TIMEOUT, "test", 9.0)))
    again = run_queries(cands, pts, [spec], backend="milp", store=store)
    assert again[0].result.verdict is Verdict.TIMEOUT and again[0].result.backend == "test"
    solved = run_queries(cands, pts, [spec], backend="milp", store=store, retry_undecided=True)
    assert solved[0].result.verdict.decided and solved[0].result.backend != "test"
