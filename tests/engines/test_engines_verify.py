"""Verification through engines: `verify pairs` on the local engine equals the serial result (the
Ray engine's test is in test_engines_ray.py); a query whose task crashes or is killed is stored
as an ERROR / TIMEOUT verdict (never lost, never decided) and `--retry-undecided` solves it on
resume."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterable, Iterator

import numpy as np
import pytest
import torch

from conftest import _train, run_cli
from phalanx.engines import LocalEngine, Outcome, Setup, Task, probes
from phalanx.verification.query import Verdict
from phalanx.verification.runner import Candidates, ResultStore, run_queries
from phalanx.verification.scores import pair_specs

VERIFY_ARGS = ["--points", "4", "--eps", "0.05,0.2", "--backend", "milp", "--timeout", "30", "--no-progress"]


@pytest.fixture(scope="module")
def verify_checkpoint(tmp_path_factory, digits):
    from phalanx import Ensemble
    from phalanx.ensembles import save_ensemble

    path = tmp_path_factory.mktemp("ckpt") / "cands.pt"
    save_ensemble(Ensemble(list(_train(digits, "mlp", 3, 3, 3, widths=[8]).members), "mean-logits"), path,
                  dataset="digits")
    return path


def stored_verdicts(folder):
    """qid -> (verdict, has a witness) from a run folder's store; each query must appear once."""
    lines = [json.loads(ln) for ln in (folder / "queries.jsonl").read_text().splitlines()]
    assert len({d["qid"] for d in lines}) == len(lines)
    return {d["qid"]: (d["result"]["verdict"], d["result"]["counterexample"] is not None) for d in lines}


@pytest.fixture(scope="module")
def serial_pairs(verify_checkpoint, tmp_path_factory):
    from phalanx.cli.main import main

    out = tmp_path_factory.mktemp("serial")
    try:
        main(["verify", "pairs", str(verify_checkpoint), *VERIFY_ARGS, "--engine", "serial", "--out", str(out)])
    except SystemExit as exc:
        assert not exc.code
    got = stored_verdicts(out)
    verdicts = [v for v, _ in got.values()]
    assert len(got) == 3 * 4 * 2 and set(verdicts) <= {"sat", "unsat"}
    assert "sat" in verdicts and "unsat" in verdicts  # both kinds present, so agreement is informative
    assert all(w == (v == "sat") for v, w in got.values())  # a witness exactly for SAT
    return got, json.loads((out / "verify_pairs.json").read_text())


def test_verify_pairs_on_local_equals_serial(verify_checkpoint, serial_pairs, tmp_path, capsys):
    code, _, err = run_cli(["verify", "pairs", str(verify_checkpoint), *VERIFY_ARGS, "--engine", "local",
                            "--workers", "2", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert stored_verdicts(tmp_path) == serial_pairs[0]
    got = json.loads((tmp_path / "verify_pairs.json").read_text())
    assert got["scores"] == serial_pairs[1]["scores"]

    def untimed(summary):
        return {k: v for k, v in summary.items() if not k.endswith("time_s")}

    assert untimed(got["summary"]) == untimed(serial_pairs[1]["summary"])


def test_engine_flag_errors(verify_checkpoint, tmp_path, capsys):
    code, _, err = run_cli(["verify", "pairs", str(verify_checkpoint), *VERIFY_ARGS, "--engine", "warp",
                            "--out", str(tmp_path)], capsys)
    assert code == 2 and "unknown engine 'warp'" in err
    code, _, err = run_cli(["verify", "pairs", str(verify_checkpoint), *VERIFY_ARGS, "--address", "auto",
                            "--out", str(tmp_path)], capsys)
    assert code == 2 and "--address only applies to --engine ray" in err


class Sabotaged(LocalEngine):
    """A local engine whose first task SIGKILLs its worker and second overruns a 1 s timeout."""

    def run(self, tasks: Iterable[Task], setup: Setup | None = None) -> Iterator[Outcome]:
        def swap(ts: Iterable[Task]) -> Iterator[Task]:
            for i, t in enumerate(ts):
                if i == 0:
                    yield Task(t.key, probes.kill_self, (signal.SIGKILL,))
                elif i == 1:
                    yield Task(t.key, probes.sleep, (60.0,), timeout_s=1.0)
                else:
                    yield t
        return super().run(swap(tasks), setup)


def test_crashed_and_killed_queries_become_error_and_timeout(digits, tmp_path):
    torch.manual_seed(5)
    from phalanx import create_model

    cands = Candidates.from_models([create_model("mlp", digits.in_shape, 10, widths=[4]) for _ in range(3)])
    pts = np.random.default_rng(1).random((2, 64))
    specs = pair_specs((0, 1, 2), 2, (0.05,), [0, 1])
    path = tmp_path / "queries.jsonl"
    with Sabotaged(workers=2) as eng:
        recs = run_queries(cands, pts, specs, backend="milp", time_limit_s=20, store=ResultStore(path), engine=eng)
    verdicts = [r.result.verdict for r in recs]
    assert verdicts[0] is Verdict.ERROR and "SIGKILL" in recs[0].result.message
    assert verdicts[1] is Verdict.TIMEOUT and "timeout of 1 s" in recs[1].result.message
    assert all(v.decided for v in verdicts[2:])
    assert len(path.read_text().splitlines()) == len(specs)  # every query stored, once
    again = run_queries(cands, pts, specs, backend="milp", time_limit_s=20, store=ResultStore(path),
                        engine="serial", retry_undecided=True)
    assert all(r.result.verdict.decided for r in again)
    assert [r.result.verdict for r in again[2:]] == verdicts[2:]
    reference = run_queries(cands, pts, specs, backend="milp", time_limit_s=20, engine="serial")
    assert [r.result.verdict for r in again] == [r.result.verdict for r in reference]
