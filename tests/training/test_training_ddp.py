"""Data-parallel training (2 gloo ranks on CPU) equals one process on the same global batches:
baseline and DVERGE (whose per-epoch layer must agree across ranks) on an uneven last batch, and a
distributed run resumed from rank 0's checkpoint; only rank 0 writes."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from phalanx import Ensemble, TrainConfig, create_method, create_model, fit
from phalanx.data import load_dataset
from phalanx.errors import PhalanxError
from phalanx.training import distributed as ddp

CASES = {"baseline": {}, "dverge": {"steps": 2}}
LIMIT = 101  # batches of 32, 32, 32, 5: the last one splits 3 + 2


def _ensemble(data):
    torch.manual_seed(0)
    return Ensemble([create_model("mlp", data.in_shape, 10, mean=data.mean, std=data.std, widths=[16])
                     for _ in range(3)])


def _train(method, epochs, run_dir=None, resume=False):
    data = load_dataset("digits", seed=0, limit=LIMIT)
    ens = _ensemble(data)
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.05, schedule="constant", seed=1, device="cpu")
    fit(ens, create_method(method, **CASES[method]), data, cfg, run_dir=run_dir, resume=resume, progress=False)
    return ens


def _ranks_job(out_dir: str) -> None:
    """Runs on every rank; rank 0 saves what the test compares."""
    from pathlib import Path

    out = Path(out_dir)
    states = {m: _train(m, 1).state_dict() for m in CASES}
    run = out / "run"
    _train("baseline", 1, run_dir=run)
    resumed = _train("baseline", 2, run_dir=run, resume=True)
    if ddp.is_main():
        torch.save({"states": states, "resumed": resumed.state_dict()}, out / "ddp.pt")


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    ddp.run_local(2, _ranks_job, (str(out),), device="cpu", timeout_s=600)
    return out, torch.load(out / "ddp.pt", weights_only=True)


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", list(CASES))
def test_two_ranks_equal_one_process(ddp_result, method):
    _, got = ddp_result
    single = _train(method, 1).state_dict()
    untrained = _ensemble(load_dataset("digits", seed=0, limit=LIMIT)).state_dict()
    assert any((single[k] - untrained[k]).abs().max() > 1e-3 for k in single)  # training moved the weights
    _assert_close(got["states"][method], single)


def test_resumed_distributed_run_equals_uninterrupted_single_process(ddp_result):
    out, got = ddp_result
    _assert_close(got["resumed"], _train("baseline", 2).state_dict())
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2]  # one writer: no duplicated lines


def test_shard_bounds_cover_the_batch_once():
    for n in (0, 1, 5, 32, 33):
        for world in (1, 2, 3, 4):
            spans = [ddp.shard_bounds(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
            sizes = [hi - lo for lo, hi in spans]
            assert max(sizes) - min(sizes) <= 1


def test_run_local_reports_a_failing_rank():
    with pytest.raises(PhalanxError, match=r"rank \d of 2 failed"):
        ddp.run_local(2, _fail_on_rank1, device="cpu", timeout_s=300)
    with pytest.raises(PhalanxError, match="nproc must be a positive integer"):
        ddp.run_local(0, _fail_on_rank1)


def _fail_on_rank1() -> None:
    if ddp.current().rank == 1:
        raise SystemExit(3)


def test_train_cli_with_two_processes(tmp_path, capsys):
    from conftest import run_cli

    code, _out, err = run_cli(["train", "--model", "mlp", "--members", "2", "--limit", "80", "--epochs", "1",
                              "--batch-size", "32", "--nproc", "2", "--device", "cpu", "--eps", "0.1",
                              "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "report.md").is_file() and (tmp_path / "checkpoints" / "last.pt").is_file()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    code, _, err = run_cli(["train", "--nproc", "0", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "--nproc must be >= 1" in err


def _cli_rank(argv: list[str]) -> None:
    from phalanx.cli.main import main

    try:
        main(argv)
    except SystemExit as exc:
        if exc.code:
            raise


def test_train_cli_inside_a_process_group_as_under_torchrun(tmp_path):
    """Ranks started by a launcher (torchrun; here run_local, which sets the same environment) run the
    plain command: they agree on rank 0's run folder, and rank 0 alone writes it."""
    argv = ["train", "--model", "mlp", "--members", "2", "--limit", "60", "--epochs", "2", "--batch-size", "32",
            "--device", "cpu", "--eps", "0.1", "--no-progress", "--set", "train.schedule=constant"]
    ddp.run_local(2, _cli_rank, ([*argv, "--out", str(tmp_path)],), device="cpu", timeout_s=600)
    assert (tmp_path / "report.md").is_file()
    assert [json.loads(ln)["epoch"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_killed_driver_leaves_no_rank_running(tmp_path):
    """SIGKILL ``train --nproc``'s driver (the run folder's lock holder, released by the kernel):
    its ranks must die too, or they would go on writing into a folder that a new process may now own."""
    from conftest import assert_child_dies_with_driver

    mark = tmp_path / "pid"
    assert_child_dies_with_driver("from phalanx.engines import probes\nfrom phalanx.training import distributed as ddp\n"
                                  f"ddp.run_local(2, probes.mark_and_sleep, ({str(mark)!r}, 120), device='cpu')", mark)
