"""The methods inside the one loop: exact resume (all randomness from the step generator) and
``phalanx train --method NAME`` for the wrapped and variant methods."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch

from conftest import run_cli
from phalanx import Ensemble, TrainConfig, create_method, create_model, fit


class Killed(RuntimeError):
    pass


def _fresh(digits: Any, seed: int = 0) -> Ensemble:
    torch.manual_seed(seed)
    return Ensemble([create_model("mlp", digits.in_shape, 10, widths=[16], mean=digits.mean, std=digits.std)
                     for _ in range(2)])


@pytest.mark.parametrize("name,opts", [
    ("igat", {"base": "dverge", "base_options": {"steps": 2}, "eps": 0.1, "step_size": 0.05, "steps": 2}),
    ("trs", {"steps": 2}),
])
def test_resume_after_kill_matches_uninterrupted(digits: Any, tmp_path: Any, name: str, opts: dict[str, Any]) -> None:
    data = dataclasses.replace(digits, train=digits.train.subset(256), val=digits.val.subset(32))
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=3, device="cpu")
    ref = _fresh(data)
    fit(ref, create_method(name, **opts), data, cfg, progress=False)

    def kill(event: str, info: dict[str, Any]) -> None:
        if event == "step" and info["epoch"] == 1 and info["step"] == 2:
            raise Killed

    killed = _fresh(data)
    with pytest.raises(Killed):
        fit(killed, create_method(name, **opts), data, cfg, run_dir=tmp_path, progress=False, callback=kill)
    resumed = _fresh(data, seed=99)
    res = fit(resumed, create_method(name, **opts), data, cfg, run_dir=tmp_path, resume=True, progress=False)
    assert res.resumed_from_epoch == 1
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)



@pytest.mark.parametrize("method,sets", [
    ("igat", ["method.base=dverge", "method.base_options={steps=2}", "method.eps=0.1", "method.steps=2"]),
    ("smd+", ["method.steps=2"]),
    ("gal", ["model.activation=leaky_relu"]),
])
def test_cli_train_with_method(method: str, sets: list[str], capsys: Any, tmp_path: Any) -> None:
    argv = ["train", "--method", method, "--epochs", "1", "--limit", "120", "--eps", "0", "--model", "mlp",
            "--out", str(tmp_path / "r"), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["method"]["name"] == method
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    described = json.loads(state["method"])
    if method == "igat":
        assert described["base_method"]["name"] == "dverge" and described["base_method"]["steps"] == 2


@pytest.mark.parametrize("sets,needle", [
    (["--method", "eat"], "eat needs at least one static source"),
    (["--method", "smd+", "--set", "method.nope=1"], "has no option 'nope'"),
    (["--method", "igat", "--set", "method.base=magic"], "unknown training method 'magic'"),
    (["--method", "dverge", "--set", "method.generation=test"], "generation must be one of"),
])
def test_cli_method_errors_are_one_line(sets: list[str], needle: str, capsys: Any, tmp_path: Any) -> None:
    code, _, err = run_cli(["train", *sets, "--out", str(tmp_path / "r"), "--no-progress"], capsys)
    assert code == 2 and needle in err and "Traceback" not in err
