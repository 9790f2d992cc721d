"""The Ray engine on a real local Ray instance: the local engine's results, faults recorded
(no retries), setup once per worker, a clear error when Ray is missing."""

from __future__ import annotations

import signal
import sys

import pytest
from test_engines_verify import VERIFY_ARGS, serial_pairs, stored_verdicts, verify_checkpoint  # noqa: F401

from phalanx.engines import Setup, Status, Task, create_engine, probes
from phalanx.errors import PhalanxError

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_engine():
    import ray

    with create_engine("ray", workers=2) as eng:
        yield eng
    assert not ray.is_initialized()  # the engine started the instance, so it shut it down


def test_same_results_as_local(ray_engine):
    tasks = [Task(f"sq{i}", probes.square, (float(i),)) for i in range(6)]
    with create_engine("local", workers=2) as local:
        want = {o.key: (o.status, o.value) for o in local.run(tasks)}
    got = {o.key: (o.status, o.value) for o in ray_engine.run(tasks)}
    assert got == want == {f"sq{i}": (Status.DONE, float(i * i)) for i in range(6)}


def test_faults_become_outcomes_not_retries(ray_engine):
    tasks = [Task("ok", probes.square, (2.0,)), Task("raises", probes.fail, ("nope",)),
             Task("killed", probes.kill_self, (signal.SIGKILL,)), Task("slow", probes.sleep, (60.0,), timeout_s=2.0),
             Task("ok2", probes.square, (3.0,))]
    out = {o.key: o for o in ray_engine.run(tasks)}
    assert out["ok"].value == 4.0 and out["ok2"].value == 9.0
    assert out["raises"].status is Status.FAILED and out["raises"].error == "ValueError: nope"
    assert out["killed"].status is Status.CRASHED and "WorkerCrashedError" in (out["killed"].error or "")
    assert out["slow"].status is Status.TIMEOUT
    # the pool still works
    assert [o.value for o in ray_engine.run([Task("after", probes.square, (5.0,))])] == [25.0]


def test_task_beyond_the_cluster_fails_instead_of_hanging(ray_engine):
    out = {o.key: o for o in ray_engine.run([Task("gpu", probes.noop, gpus=1), Task("cpu", probes.noop, cpus=64),
                                             Task("ok", probes.noop, (1,))])}
    assert out["gpu"].status is Status.FAILED and "asks for 1 GPU(s)" in (out["gpu"].error or "")
    assert out["cpu"].status is Status.FAILED and "asks for 64 CPU(s)" in (out["cpu"].error or "")
    assert out["ok"].value == 1


def test_setup_reaches_ray_workers(ray_engine):
    setup = Setup(probes.remember, kwargs={"tag": "ray"})
    out = list(ray_engine.run([Task(f"r{i}", probes.recall, ("tag",)) for i in range(3)], setup=setup))
    assert [o.value for o in out] == ["ray"] * 3
    bad = list(ray_engine.run([Task("b", probes.noop)], setup=Setup(probes.fail, ("no",))))
    assert bad[0].status is Status.FAILED and bad[0].error == "setup failed: ValueError: no"


def test_missing_ray_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(PhalanxError, match=r"pip install 'phalanx\[ray\]'"):
        create_engine("ray")


def test_verify_pairs_on_ray_equals_serial(ray_engine, verify_checkpoint, serial_pairs, tmp_path, capsys):  # noqa: F811
    """The CLI joins the Ray session the fixture started (and leaves it open)."""
    from conftest import run_cli

    code, _, err = run_cli(["verify", "pairs", str(verify_checkpoint), *VERIFY_ARGS, "--engine", "ray",
                            "--workers", "2", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert stored_verdicts(tmp_path) == serial_pairs[0]
