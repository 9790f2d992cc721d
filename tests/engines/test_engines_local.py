"""The local engine: outcomes equal the serial engine's; raise / timeout / kill / exit / segfault
become FAILED / TIMEOUT / CRASHED while the other tasks finish; setup travels once per worker."""

from __future__ import annotations

import signal

import pytest

from phalanx.engines import ENGINES, LocalEngine, SerialEngine, Setup, Status, Task, create_engine, probes
from phalanx.errors import PhalanxError


@pytest.fixture(scope="module")
def engine():
    with create_engine("local", workers=2) as eng:
        yield eng


def _by_key(outcomes):
    return {o.key: o for o in outcomes}


def test_local_is_registered_and_default():
    assert "local" in ENGINES
    with create_engine(workers=1) as eng:
        assert isinstance(eng, LocalEngine)


def test_results_equal_serial(engine):
    tasks = [Task(f"sq{i}", probes.square, (float(i),)) for i in range(7)]
    local = _by_key(engine.run(tasks))
    serial = _by_key(SerialEngine().run(tasks))
    assert set(local) == set(serial) == {t.key for t in tasks}
    assert all(o.status is Status.DONE for o in local.values())
    assert {k: o.value for k, o in local.items()} == {k: o.value for k, o in serial.items()} == {
        f"sq{i}": float(i * i) for i in range(7)}


def test_tasks_run_in_worker_processes(engine):
    import os

    out = list(engine.run([Task(f"w{i}", probes.whoami, (i,)) for i in range(4)]))
    pids = {o.value["pid"] for o in out}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_faults_are_isolated(engine):
    tasks = [
        Task("ok1", probes.square, (3.0,)),
        Task("raises", probes.fail, ("bad input",)),
        Task("slow", probes.sleep, (30.0,), timeout_s=1.0),
        Task("sigkill", probes.kill_self, (signal.SIGKILL,)),
        Task("exit", probes.exit_hard, (7,)),
        Task("segv", probes.segfault),
        Task("ok2", probes.square, (4.0,)),
    ]
    out = _by_key(engine.run(tasks))
    assert set(out) == {t.key for t in tasks}
    assert out["ok1"].status is Status.DONE and out["ok1"].value == 9.0
    assert out["ok2"].status is Status.DONE and out["ok2"].value == 16.0
    assert out["raises"].status is Status.FAILED and out["raises"].error == "ValueError: bad input"
    assert "fail" in (out["raises"].detail or "")
    assert out["slow"].status is Status.TIMEOUT and "timeout of 1 s" in (out["slow"].error or "")
    assert out["slow"].wall_s >= 1.0
    assert out["sigkill"].status is Status.CRASHED and "SIGKILL" in (out["sigkill"].error or "")
    assert out["exit"].status is Status.CRASHED and "code 7" in (out["exit"].error or "")
    assert out["segv"].status is Status.CRASHED and "SIGSEGV" in (out["segv"].error or "")
    # the pool goes on after all that
    assert [o.value for o in engine.run([Task("after", probes.square, (5.0,))])] == [25.0]


def test_cpu_time_is_accounted(engine):
    (o,) = engine.run([Task("spin", probes.spin, (0.3,))])
    assert o.ok and o.cpu_s >= 0.3 and o.value >= 0.3
    (t,) = engine.run([Task("spin-killed", probes.spin, (30.0,), timeout_s=1.0)])
    assert t.status is Status.TIMEOUT
    assert t.cpu_s > 0.1  # read from /proc before the kill: the task was burning CPU


def test_setup_runs_once_per_worker_and_per_run(engine):
    first = Setup(probes.remember, kwargs={"tag": "one"})
    out = list(engine.run([Task(f"r{i}", probes.recall, ("tag",)) for i in range(4)], setup=first))
    assert [o.value for o in out] == ["one"] * 4
    second = Setup(probes.remember, kwargs={"tag": "two"})
    out = list(engine.run([Task(f"s{i}", probes.recall, ("tag",)) for i in range(4)], setup=second))
    assert [o.value for o in out] == ["two"] * 4
    serial = list(SerialEngine().run([Task("x", probes.recall, ("tag",))], setup=Setup(probes.remember,
                                                                                         kwargs={"tag": "3"})))
    assert serial[0].value == "3"


def test_failing_setup_fails_every_task(engine):
    out = list(engine.run([Task(f"t{i}", probes.noop, (i,)) for i in range(3)], setup=Setup(probes.fail, ("no",))))
    assert [o.status for o in out] == [Status.FAILED] * 3
    assert all(o.error == "setup failed: ValueError: no" for o in out)



def test_a_failed_setup_does_not_fail_a_later_run_without_setup():
    """Workers persist across runs: a run's failed setup belongs to that run only."""
    with create_engine("local", workers=1) as eng:
        first = list(eng.run([Task("a", probes.noop, (1,))], setup=Setup(probes.fail, ("no",))))
        assert first[0].status is Status.FAILED
        later = list(eng.run([Task("b", probes.noop, (2,))]))
        assert later[0].status is Status.DONE, later[0].error

def test_setup_is_redone_in_a_replacement_worker():
    with create_engine("local", workers=1) as eng:
        setup = Setup(probes.remember, kwargs={"tag": "kept"})
        tasks = [Task("a", probes.recall, ("tag",)), Task("die", probes.exit_hard, (1,)), Task("b", probes.recall,
                                                                                            ("tag",))]
        out = _by_key(eng.run(tasks, setup=setup))
        assert out["a"].value == "kept" and out["die"].status is Status.CRASHED and out["b"].value == "kept"
        assert len(eng.startups) == 2 and all(s["wall_s"] > 0 for s in eng.startups)


def test_lazy_task_stream_and_early_stop():
    with create_engine("local", workers=2) as eng:
        gen = (Task(f"n{i}", probes.noop, (i,)) for i in range(100))
        it = eng.run(gen)
        got = [next(it).value for _ in range(3)]
        it.close()  # abandons the running tasks
        assert len(got) == 3
        assert sorted(o.value for o in eng.run([Task("z", probes.noop, (9,))])) == [9]


def test_gpu_tasks_get_their_devices_or_fail_clearly():
    with LocalEngine(workers=2, gpus=["5", "7"]) as eng:
        out = _by_key(eng.run([Task("cpu", probes.whoami), Task("g1", probes.whoami, gpus=1),
                               Task("g2", probes.whoami, gpus=2), Task("g3", probes.whoami, gpus=3)]))
    assert out["cpu"].value["cuda_visible_devices"] == ""
    assert out["g1"].value["cuda_visible_devices"] in ("5", "7")
    assert out["g2"].value["cuda_visible_devices"] == "5,7"
    assert out["g3"].status is Status.FAILED and "asks for 3 GPU(s)" in (out["g3"].error or "")


def test_bad_arguments():
    with pytest.raises(PhalanxError, match="workers must be a positive integer"):
        create_engine("local", workers=0)
    with pytest.raises(PhalanxError, match="unknown engine 'nope'"):
        create_engine("nope")
    with pytest.raises(PhalanxError, match="start method 'bogus'"):
        LocalEngine(start_method="bogus")
    with pytest.raises(PhalanxError, match="timeout_s must be > 0"):
        Task("t", probes.noop, timeout_s=0)


def test_killed_driver_leaves_no_worker_running(tmp_path):
    """SIGKILL the driver while its worker sleeps in a task: the worker dies too."""
    from conftest import assert_child_dies_with_driver

    mark = tmp_path / "pid"
    assert_child_dies_with_driver("from phalanx.engines import create_engine, Task, probes\n"
                                  "e = create_engine('local', workers=1)\n"
                                  f"list(e.run([Task('t', probes.mark_and_sleep, ({str(mark)!r}, 60))]))", mark)
