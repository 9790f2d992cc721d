from __future__ import annotations

import json

import pytest
import torch

from phalanx import Ensemble, TrainConfig, create_method, create_model, fit
from phalanx.errors import CheckpointError, PhalanxError


class Killed(RuntimeError):
    pass


def _fresh(digits, seed=0):
    torch.manual_seed(seed)
    return Ensemble([create_model("mlp", digits.in_shape, 10, widths=[16], mean=digits.mean, std=digits.std)
                     for _ in range(2)])


CFG = TrainConfig(epochs=3, batch_size=128, lr=0.05, seed=7, device="cpu")


def test_baseline_learns(digits):
    ens = _fresh(digits)
    res = fit(ens, create_method("baseline"), digits, CFG, progress=False)
    assert len(res.history) == 3
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.history[-1]["val_accuracy"] > 0.5  # chance is 0.1
    assert not ens.training  # fit leaves the ensemble in eval mode


def test_resume_after_kill_matches_uninterrupted(digits, tmp_path):
    ref = _fresh(digits)
    fit(ref, create_method("baseline"), digits, CFG, run_dir=tmp_path / "ref", progress=False)

    killed = _fresh(digits)

    def kill(event, info):
        if event == "step" and info["epoch"] == 2 and info["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        fit(killed, create_method("baseline"), digits, CFG, run_dir=tmp_path / "run", progress=False, callback=kill)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]  # two completed epochs survived

    resumed = _fresh(digits, seed=123)  # different init: everything must come from the checkpoint
    res = fit(resumed, create_method("baseline"), digits, CFG, run_dir=tmp_path / "run", resume=True, progress=False)
    assert res.resumed_from_epoch == 2
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3


def test_resume_rejects_wrong_architecture_or_method(digits, tmp_path):
    fit(_fresh(digits), create_method("baseline"), digits, TrainConfig(epochs=1, device="cpu"),
        run_dir=tmp_path, progress=False)
    other = Ensemble([create_model("mlp", digits.in_shape, 10, widths=[8]) for _ in range(2)])
    with pytest.raises(CheckpointError, match="does not match"):
        fit(other, create_method("baseline"), digits, TrainConfig(epochs=2, device="cpu"), run_dir=tmp_path,
            resume=True, progress=False)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        fit(_fresh(digits), create_method("baseline"), digits, CFG, run_dir=tmp_path / "none", resume=True,
            progress=False)


def test_optimizers_and_schedules(digits):
    for kw in ({"optimizer": "adam", "lr": 1e-3, "schedule": "cosine"},
               {"optimizer": "sgd", "schedule": "multistep", "milestones": (1,), "gamma": 0.5}):
        cfg = TrainConfig(epochs=2, batch_size=256, device="cpu", **kw)
        res = fit(_fresh(digits), create_method("baseline"), digits, cfg, progress=False)
        lrs = [h["lr"] for h in res.history]
        assert lrs[1] < lrs[0]


@pytest.mark.parametrize("kw,match", [({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"),
                                      ({"optimizer": "rmsprop"}, "accepted: sgd, adam"),
                                      ({"schedule": "poly"}, "accepted: multistep"), ({"lr": -1.0}, "lr"),
                                      ({"device": "tpu"}, "accepted: auto, cpu, cuda")])
def test_bad_train_config(kw, match):
    with pytest.raises(PhalanxError, match=match):
        TrainConfig(**kw)


def test_unknown_method_option():
    with pytest.raises(PhalanxError, match=r"known: .*baseline"):
        create_method("nope")
