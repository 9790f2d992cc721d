"""Run folders have one owner and are never silently reused (issue 10, item 4): a finished run
is refused unless resumed or explicitly overwritten, a second process on a folder is refused,
a crash mid-run leaves the last checkpoint intact and the run resumable."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, run_cli
from phalanx.errors import PhalanxError
from phalanx.runs import LOCK_FILE, Reuse, RunFolderBusy, open_run, run_info

TRAIN = ["train", "--model", "mlp", "--members", "2", "--epochs", "2", "--limit", "80", "--eps", "0",
         "--set", "model.widths=[8]", "--no-progress"]


def _train(tmp: Path, capsys: Any, *extra: str) -> tuple[int, str, str]:
    return run_cli([*TRAIN, *extra], capsys)


def test_finished_train_run_is_not_overwritten(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "r"
    code, _, err = _train(tmp_path, capsys, "--out", str(out))
    assert code == 0, err
    assert run_info(out)["status"] == "finished" and run_info(out)["command"] == "train"
    weights = (out / "ensemble.pt").read_bytes()
    results = (out / "results.json").read_text()

    code, _, err = _train(tmp_path, capsys, "--out", str(out), "--seed", "5")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "finished train run" in err and "--resume" in err and "--overwrite" in err
    code, _, err = run_cli(["evaluate", str(out / "ensemble.pt"), "--limit", "10", "--eps", "0", "--out", str(out),
                            "--no-progress"], capsys)
    assert code == 2 and "finished train run" in err
    assert (out / "ensemble.pt").read_bytes() == weights and (out / "results.json").read_text() == results

    # resume a finished run: nothing left to train, the weights stay
    code, _, err = _train(tmp_path, capsys, "--resume", str(out))
    assert code == 0, err
    before = torch.load(io.BytesIO(weights), weights_only=True)["members"]
    after = torch.load(out / "ensemble.pt", weights_only=True)["members"]
    for a, b in zip(before, after):
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    # explicit overwrite replaces it
    code, _, err = _train(tmp_path, capsys, "--out", str(out), "--seed", "5", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == 5
    assert not (out / LOCK_FILE).exists()


def test_evaluate_refuses_other_runs_but_verify_continues_its_own(tmp_path: Path, capsys: Any) -> None:
    with open_run(tmp_path / "v", "verify-pairs"):
        pass
    with open_run(tmp_path / "v", "verify-pairs", reuse=Reuse.CONTINUE) as run:
        assert run.path == tmp_path / "v"
    with pytest.raises(PhalanxError, match="finished verify-pairs run"):
        open_run(tmp_path / "v", "select", reuse=Reuse.CONTINUE)
    with pytest.raises(ValueError), open_run(tmp_path / "f", "attack"):
        raise ValueError("boom")
    assert run_info(tmp_path / "f")["status"] == "failed"
    with open_run(tmp_path / "f", "attack"):  # nothing finished and nothing to resume: retried in place
        pass
    with pytest.raises(PhalanxError, match="finished attack run"):
        open_run(tmp_path / "f", "attack")
    with pytest.raises(PhalanxError, match="does not exist"):
        open_run(tmp_path / "missing", "train", reuse=Reuse.RESUME)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PhalanxError, match="holds no run"):
        open_run(tmp_path / "empty", "train", reuse=Reuse.RESUME)
    # a folder of user files (no run in it) is accepted; legacy run folders (no run.json) are not
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "notes.txt").write_text("mine")
    with open_run(tmp_path / "u", "attack"):
        pass
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text("{}")
    with pytest.raises(PhalanxError, match="unknown phalanx run"):
        open_run(tmp_path / "old", "attack")


def test_second_process_on_one_folder_is_refused(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "busy"
    with open_run(out, "train") as run:
        assert (out / LOCK_FILE).is_file()
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
            open_run(out, "train", reuse=Reuse.OVERWRITE)
        code, _, err = _train(tmp_path, capsys, "--out", str(out), "--overwrite")
        assert code == 2 and err.count("\n") == 1 and "in use by another phalanx process" in err
        assert run_info(run.path)["status"] == "running"


def test_lock_held_by_another_process_and_released_when_it_dies(tmp_path: Path) -> None:
    out = tmp_path / "r"
    code = ("import sys, time; from phalanx.runs import open_run; r = open_run(sys.argv[1], 'train'); "
            "print('locked', flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match=f"pid {proc.pid}"):
            open_run(out, "train", reuse=Reuse.OVERWRITE)
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "last.pt").write_bytes(b"state")
    finally:
        proc.kill()
        proc.wait()
    # SIGKILL: the kernel dropped the lock; the folder holds an unfinished run of a dead process
    with pytest.raises(PhalanxError, match=f"unfinished \\(pid {proc.pid} ended\\) train run"):
        open_run(out, "train")
    with open_run(out, "train", reuse=Reuse.RESUME):
        pass


def test_crash_keeps_last_checkpoint_and_resume_completes(tmp_path: Path, capsys: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while writing epoch 2's checkpoint: one error line, epoch 1 intact, resumable."""
    import phalanx.training.loop as loop

    real_save, calls = loop.atomic_save, []

    def failing_save(obj: Any, path: Any) -> None:
        calls.append(path)
        if len(calls) == 2:
            def partial(o: Any, f: Any) -> None:
                f.write(b"\x80partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(torch, "save", partial)
            try:
                real_save(obj, path)
            finally:
                monkeypatch.undo()
        real_save(obj, path)

    out = tmp_path / "r"
    monkeypatch.setattr(loop, "atomic_save", failing_save)
    code, _, err = _train(tmp_path, capsys, "--out", str(out))
    monkeypatch.setattr(loop, "atomic_save", real_save)
    assert code == 2 and err == "error: cannot access: No space left on device\n"
    info = run_info(out)
    assert info["status"] == "failed" and "No space left" in info["error"]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert not [p for p in (out / "checkpoints").iterdir() if p.name != "last.pt"]
    code, _, err = _train(tmp_path, capsys, "--out", str(out))
    assert code == 2 and "failed train run" in err
    code, _, err = _train(tmp_path, capsys, "--resume", str(out))
    assert code == 0, err
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert run_info(out)["status"] == "finished"


def test_output_path_under_a_file_is_one_error_line(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "f").write_text("")
    code, _, err = _train(tmp_path, capsys, "--out", str(tmp_path / "f" / "run"))
    assert code == 2 and err.startswith("error: cannot create run folder") and "Not a directory" in err
    code, _, err = _train(tmp_path, capsys, "--out", str(tmp_path / "f"))
    assert code == 2 and "is a file" in err and "Traceback" not in err  # click's own usage error
    with pytest.raises(PhalanxError, match="exists and is not a folder"):
        open_run(tmp_path / "f", "train")


def test_read_only_output_folder_is_one_error_line(tmp_path: Path, capsys: Any) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = _train(tmp_path, capsys, "--out", str(ro / "run"))
        assert code == 2 and err.startswith("error: cannot create run folder") and err.count("\n") == 1
        assert "Permission denied" in err
    finally:
        ro.chmod(0o700)


def test_default_run_folders_are_distinct(tmp_path: Path) -> None:
    runs = [open_run(None, "attack", root=tmp_path) for _ in range(3)]
    try:
        assert len({r.path for r in runs}) == 3
    finally:
        for r in runs:
            r.close()
    assert all(run_info(r.path)["status"] == "finished" for r in runs)


def test_overwrite_drops_the_replaced_runs_training_state(tmp_path: Path) -> None:
    """``--overwrite`` replaces a run; if the new run dies before its first checkpoint, the folder
    must not offer the old run's training state to ``--resume`` under the new config."""
    out = tmp_path / "r"
    with open_run(out, "train"):
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "last.pt").write_bytes(b"old run's state")
        (out / "ensemble.pt").write_bytes(b"old run's weights")  # may serve as model.init: kept
    new = open_run(out, "train", reuse=Reuse.OVERWRITE)
    new.close("interrupted")  # killed before its first epoch ended
    assert not (out / "checkpoints" / "last.pt").exists()
    assert (out / "ensemble.pt").read_bytes() == b"old run's weights"
    with open_run(out, "train"):  # nothing to resume: the interrupted run is retried in place
        pass
