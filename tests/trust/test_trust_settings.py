"""Settings are validated and recorded as they ran (issue 10, items 5-7): booleans are not
integers, decay factors are positive, damaged or foreign checkpoints are refused, the recorded
config reproduces the run, a short run keeps its LR, and options reach the code they name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import run_cli
from phalanx import Ensemble, TrainConfig
from phalanx.config import build_config, load_config
from phalanx.ensembles import load_ensemble, save_ensemble
from phalanx.errors import PhalanxError

TINY = ["--model", "mlp", "--members", "2", "--limit", "60", "--eps", "0", "--set", "model.widths=[8]",
        "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tiny_mlp_pair: Ensemble, tmp_path_factory: Any) -> Path:
    path = tmp_path_factory.mktemp("ck") / "pair.pt"
    save_ensemble(Ensemble(list(tiny_mlp_pair.members), "mean-logits"), path, dataset="digits",
                  extra={"method": {"name": "baseline"}})
    return path


@pytest.mark.parametrize("setting,needle", [
    ("train.batch_size=true", "train.batch_size must be an integer, got True"),
    ("train.epochs=2.5", "train.epochs must be an integer, got 2.5"),
    ("train.seed=abc", "train.seed must be an integer, got 'abc'"),
    ("train.seed=-3", "train.seed must be an integer in [0, 2**63), got -3"),
    ("data.seed=9223372036854775808", "data.seed must be an integer in [0, 2**63)"),
    ("train.lr=false", "train.lr must be a finite number, got False"),
    ("train.lr=nan", "train.lr must be a finite number, got nan"),
    ("train.gamma=-0.1", "train.gamma (the LR decay factor) must be in (0, 1], got -0.1"),
    ("train.gamma=0", "train.gamma (the LR decay factor) must be in (0, 1], got 0.0"),
    ("train.milestones=[3,1]", "train.milestones must be increasing epochs >= 1, got [3, 1]"),
    ("train.milestones=[1.5]", "train.milestones must be a list of integers or unset"),
    ("model.members=true", "model.members must be an integer, got True"),
    ("data.limit=[1]", "data.limit must be an integer or unset, got [1]"),
    ("eval.eps=[]", "eval.eps must list at least one radius"),
    ("eval.steps=true", "eval.steps must be an integer, got True"),
    ("data.dataset=3", "data.dataset must be a quoted string, got 3"),
])
def test_bad_settings_are_one_error_line(setting: str, needle: str, tmp_path: Path, capsys: Any) -> None:
    code, _, err = run_cli(["train", "--epochs", "1", *TINY, "--set", setting, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()  # nothing was created for a rejected config


def test_library_configs_reject_booleans() -> None:
    with pytest.raises(PhalanxError, match="batch_size must be an integer, got True"):
        TrainConfig(batch_size=True)  # type: ignore[arg-type]
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)
    assert TrainConfig(milestones=[2, 4]).milestones == (2, 4)  # type: ignore[arg-type]


def test_lr_schedule_default_keeps_short_runs_and_decays_long_ones() -> None:
    assert TrainConfig(epochs=3).resolved_milestones() == []
    assert TrainConfig(epochs=200).resolved_milestones() == [100, 150]  # DVERGE's schedule
    assert TrainConfig(epochs=10).resolved_milestones() == [5, 7]
    assert TrainConfig(epochs=200, milestones=()).resolved_milestones() == []
    assert TrainConfig(epochs=200, schedule="constant").resolved_milestones() == []
    assert TrainConfig(epochs=200).effective().milestones == (100, 150)
    assert TrainConfig(epochs=3).effective().milestones == ()


def test_recorded_config_is_the_one_that_ran_and_reproduces_it(tmp_path: Path, capsys: Any) -> None:
    from phalanx.workflows.experiment import train_run

    out = tmp_path / "a"
    code, _, err = run_cli(["train", "--epochs", "10", *TINY, "--lr", "0.05", "--out", str(out)], capsys)
    assert code == 0, err
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["train"]["milestones"] == [5, 7]
    lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert lrs == pytest.approx([0.05] * 5 + [0.005] * 2 + [0.0005] * 3)

    # the recorded file alone trains the same weights
    again = tmp_path / "b"
    again.mkdir()
    ens, _, _ = train_run(build_config(recorded), again, progress=False)
    first = load_ensemble(out / "ensemble.pt")
    for a, b in zip(first.state_dict().values(), ens.state_dict().values()):
        assert torch.equal(a, b)
    assert json.loads((again / "config.json").read_text()) == recorded

    short = tmp_path / "s"
    code, _, err = run_cli(["train", "--epochs", "3", *TINY, "--out", str(short)], capsys)
    assert code == 0, err
    assert json.loads((short / "config.json").read_text())["train"]["milestones"] == []
    assert [r["lr"] for r in map(json.loads, (short / "metrics.jsonl").read_text().splitlines())] == [0.1] * 3


def test_nan_weights_are_refused(ckpt: Path, tmp_path: Path, capsys: Any) -> None:
    ens = load_ensemble(ckpt)
    with torch.no_grad():
        next(ens.members[1].parameters())[0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    save_ensemble(ens, bad, dataset="digits")
    code, _, err = run_cli(["evaluate", str(bad), "--limit", "10", "--eps", "0", "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "member 1: weight" in err and "NaN or inf" in err and err.count("\n") == 1


def test_checkpoint_of_another_dataset_is_refused(ckpt: Path, tmp_path: Path, capsys: Any) -> None:
    other = tmp_path / "other.pt"
    save_ensemble(load_ensemble(ckpt), other, dataset="digits-other")
    argv = ["evaluate", str(other), "--dataset", "digits", "--limit", "10", "--eps", "0", "--no-progress"]
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "trained on dataset 'digits-other', not 'digits'" in err
    code, _, err = run_cli([*argv, "--allow-dataset-mismatch", "--out", str(tmp_path / "f")], capsys)
    assert code == 0, err


def test_evaluate_records_the_checkpoint_model_and_method(ckpt: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "e"
    code, _, err = run_cli(["evaluate", str(ckpt), "--limit", "10", "--eps", "0,0.1", "--steps", "2", "--no-sanity",
                            "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["name"] == "mlp" and cfg["model"]["members"] == 2
    assert cfg["model"]["combiner"] == "mean-logits" and cfg["model"]["widths"] == [10]
    assert cfg["method"] == {"name": "baseline"} and cfg["data"]["dataset"] == "digits"
    assert load_config(base=cfg).model.name == "mlp"


@pytest.mark.parametrize("command", ["attack", "evaluate"])
def test_param_steps_and_loss_reach_the_attack(command: str, ckpt: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "r"
    extra = ["--eps", "0.1"] if command == "attack" else ["--eps", "0.1", "--no-sanity"]
    code, _, err = run_cli([command, str(ckpt), "--limit", "10", *extra, "--param", "steps=3", "--param", "loss=cw",
                            "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    text = (out / "results.json").read_text()
    res = json.loads(text)
    if command == "attack":
        assert res["attack"]["steps"] == 3 and res["attack"]["loss"] == "cw"
    else:
        assert res["spec"]["attack_params"] == {"steps": 3, "loss": "cw"}
    code, _, err = run_cli([command, str(ckpt), "--limit", "10", *extra, "--param", "members=[0,9]",
                            "--out", str(tmp_path / "m"), "--no-progress"], capsys)
    assert code == 2 and "0..1, got [0, 9]" in err


def test_members_restricts_pgd_to_the_sub_ensemble(tiny_mlp_pair: Ensemble, digits: Any) -> None:
    from phalanx.attacks import create_attack
    from phalanx.types import ThreatModel

    x, y = digits.test.x[:16], digits.test.y[:16]
    threat = ThreatModel(eps=0.1)
    restricted = create_attack("pgd", steps=5, members=(1,))(tiny_mlp_pair, x, y, threat,
                                                             generator=torch.Generator().manual_seed(0))
    direct = create_attack("pgd", steps=5)(tiny_mlp_pair.subset([1]), x, y, threat,
                                           generator=torch.Generator().manual_seed(0))
    whole = create_attack("pgd", steps=5)(tiny_mlp_pair, x, y, threat, generator=torch.Generator().manual_seed(0))
    assert torch.equal(restricted, direct) and not torch.equal(restricted, whole)


def test_retry_undecided_resolves_a_stored_timeout(ckpt: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "v"
    argv = ["verify", "ensemble", str(ckpt), "--backend", "milp", "--points", "3", "--eps", "0.05", "--out", str(out),
            "--no-progress"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    store = out / "queries.jsonl"
    solved = [json.loads(line) for line in store.read_text().splitlines()]
    decided = sum(r["result"]["verdict"] in ("sat", "unsat") for r in solved)
    assert decided == len(solved) > 0
    for r in solved:  # as if every query had timed out
        r["result"].update(verdict="timeout", counterexample=None, message="time limit")
    store.write_text("".join(json.dumps(r) + "\n" for r in solved))

    code, _, err = run_cli(argv, capsys)  # resuming reuses the stored answers
    rows = json.loads((out / "verify_ensemble.json").read_text())["robustness"]["rows"]
    assert code == 0 and rows[0]["undecided"] == len(solved)
    code, _, err = run_cli([*argv, "--retry-undecided"], capsys)
    rows = json.loads((out / "verify_ensemble.json").read_text())["robustness"]["rows"]
    assert code == 0 and rows[0]["undecided"] == 0
    assert len(store.read_text().splitlines()) == 2 * len(solved)  # answers appended, none lost


def test_store_with_retry_drops_stored_undecided_answers(ckpt: Path, tmp_path: Path) -> None:
    """The one mechanism behind --retry-undecided (verify pairs/ensemble, select and its validation)."""
    from phalanx.verification.runner import ResultStore

    line = {"qid": "q1", "spec": {"members": [0, 1], "point": 0, "eps": 0.05, "label": 1, "kind": "mean-logits",
                                  "quorum": None, "runner_up": False},
            "result": {"verdict": "timeout", "backend": "milp", "wall_time_s": 1.0, "message": "time limit",
                       "details": {}, "counterexample": None}}
    done = {**line, "qid": "q2", "result": {**line["result"], "verdict": "unsat", "message": "proven"}}
    path = tmp_path / "queries.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps(done) + "\n")
    assert ResultStore(path).get("q1") is not None
    retry = ResultStore(path, retry_undecided=True)
    assert retry.get("q1") is None and retry.get("q2") is not None
