"""The same small sweep on the serial, local and Ray engines gives the same results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phalanx.workflows.sweep import run_sweep
from phalanx.workflows.sweep_spec import parse_sweep_spec

SPEC = {
    "sweep": {"seeds": [0, 1], "timeout_s": 300},
    "base": {"data": {"dataset": "digits", "limit": 200},
             "model": {"name": "mlp", "widths": [16], "members": 2},
             "train": {"epochs": 2, "batch_size": 50, "optimizer": "adam", "lr": 0.01, "schedule": "constant",
                       "device": "cpu"}},
    "method": {"baseline": {}},
    "evaluation": [{"name": "wb", "attacks": ["pgd"], "eps": [0.1], "steps": 3, "limit": 50}],
}


def _results(folder: Path) -> dict[str, tuple[dict, list[torch.Tensor]]]:
    from phalanx.ensembles import load_ensemble

    out = {}
    for cell in sorted((folder / "cells").iterdir()):
        res = json.loads((cell / "results.json").read_text())
        weights = [p.detach().clone() for p in load_ensemble(cell / "ensemble.pt").parameters()]
        out[cell.name] = (res["evaluations"], weights)
    return out


@pytest.fixture(scope="module")
def serial_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serial") / "s"
    run_sweep(parse_sweep_spec(SPEC), folder, engine="serial", progress=False)
    return _results(folder)


def _check_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() == {"baseline-seed0", "baseline-seed1"}
    for key, (evals, weights) in want.items():
        g_evals, g_weights = got[key]
        for a, b in zip(g_weights, weights, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        wb, g_wb = evals["2"]["wb"], g_evals["2"]["wb"]
        assert g_wb["clean"]["accuracy"] == pytest.approx(wb["clean"]["accuracy"], abs=1 / 50)
        assert g_wb["whitebox"]["curves"]["pgd"][0]["accuracy"] == pytest.approx(
            wb["whitebox"]["curves"]["pgd"][0]["accuracy"], abs=1 / 50)
    # two seeds really are two different ensembles
    assert not torch.equal(want["baseline-seed0"][1][0], want["baseline-seed1"][1][0])


def test_local_engine_matches_serial(serial_results, tmp_path) -> None:
    run_sweep(parse_sweep_spec(SPEC), tmp_path / "s", engine="local", workers=2, progress=False)
    _check_same(_results(tmp_path / "s"), serial_results)


def test_ray_engine_matches_serial(serial_results, tmp_path) -> None:
    pytest.importorskip("ray")
    run_sweep(parse_sweep_spec(SPEC), tmp_path / "s", engine="ray", workers=2, progress=False)
    _check_same(_results(tmp_path / "s"), serial_results)
