"""`phalanx attack` and `phalanx evaluate --protocol ...` end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from phalanx.ensembles import Ensemble, save_ensemble
from phalanx.errors import PhalanxError
from phalanx.models import create_model


@pytest.fixture(scope="module")
def ckpt(mlp_ensemble, tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "ens.pt"
    save_ensemble(mlp_ensemble, path, dataset="digits")
    return str(path)


def test_evaluate_whitebox_several_attacks(ckpt, capsys, tmp_path):
    out = tmp_path / "wb"
    code, _stdout, err = run_cli(["evaluate", ckpt, "--limit", "40", "--eps", "0,0.1", "--attack", "fgsm,pgd",
                             "--steps", "3", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "evaluate" and res["results"]["protocol"] == "whitebox"
    wb = res["results"]["whitebox"]
    assert set(wb["curves"]) == {"fgsm", "pgd"} and len(wb["worst_case"]) == 2
    for name in ("whitebox_curves.png", "member_curves.png", "adversarial_examples.png", "decision_regions.png",
                 "report.md"):
        assert (out / name).is_file(), name
    assert "Sanity checks" in (out / "report.md").read_text()


@pytest.mark.parametrize("protocol,extra", [
    ("transferability", ["--eps", "0.1", "--steps", "3", "--restarts", "1"]),
    ("diversity", []),
])
def test_evaluate_other_protocols(ckpt, capsys, tmp_path, protocol, extra):
    out = tmp_path / protocol
    code, _, err = run_cli(["evaluate", ckpt, "--protocol", protocol, "--limit", "30", *extra, "--out", str(out),
                        "--no-progress"], capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())["results"]
    assert protocol in res
    assert any(p.name.endswith(".png") for p in out.iterdir())


def test_attack_transfer_sets_then_blackbox(ckpt, capsys, tmp_path):
    code, _, err = run_cli(["attack", ckpt, "--transfer-sets", "--eps", "0.05,0.1", "--transfer-steps", "2",
                        "--restarts", "1", "--limit", "20", "--out", str(tmp_path / "ts"), "--no-progress"], capsys)
    assert code == 0, err
    sets = tmp_path / "ts" / "transfer_sets"
    assert (sets / "sets.pt").is_file() and (sets / "manifest.json").is_file()
    code, _, err = run_cli(["evaluate", ckpt, "--protocol", "blackbox", "--transfer-sets", str(sets), "--steps", "2",
                        "--limit", "20", "--out", str(tmp_path / "bb"), "--no-progress"], capsys)
    assert code == 0, err
    bb = json.loads((tmp_path / "bb" / "results.json").read_text())["results"]["blackbox"]
    assert [r["eps"] for r in bb["curve"]] == [0.05, 0.1]
    assert [c["name"] for c in bb["sanity"]] == ["black-box >= white-box"] * 2


def test_attack_saves_examples_in_the_ball(ckpt, capsys, tmp_path):
    out = tmp_path / "atk"
    code, _, err = run_cli(["attack", ckpt, "--attack", "ga3", "--param", "members=[0,1]", "--eps", "0.1",
                        "--limit", "25", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    saved = torch.load(out / "adversarial.pt", weights_only=True)
    assert float((saved["x_adv"] - saved["x"]).abs().max()) <= 0.1 + 1e-6
    res = json.loads((out / "results.json").read_text())
    assert res["attack"]["members"] == [0, 1] and res["robust_accuracy"] <= res["clean_accuracy"]


@pytest.mark.parametrize("argv,needle", [
    (["--attack", "zap"], "unknown attack 'zap'"),
    (["--loss", "hinge"], "unknown loss 'hinge'"),
    (["--steps", "0"], "steps and eval.restarts must be >= 1, got 0, 1"),
    (["--restarts", "0"], "restarts must be >= 1, got 20, 0"),
    (["--eps", "-0.2"], "eps must be >= 0"),
    (["--eps", "2"], "exceeds the input range"),
    (["--protocol", "blackbox"], "needs --transfer-sets"),
])
def test_evaluate_bad_input_one_line(ckpt, capsys, tmp_path, argv, needle):
    code, _, err = run_cli(["evaluate", ckpt, "--limit", "10", *argv, "--out", str(tmp_path / "e"), "--no-progress"],
                       capsys)
    assert code == 2, err
    assert needle in err and "Traceback" not in err


def test_attack_bad_input_one_line(ckpt, capsys, tmp_path):
    code, _, err = run_cli(["attack", ckpt, "--attack", "pgd", "--param", "wings=2", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "bad options for attack 'pgd'" in err
    code, _, err = run_cli(["attack", ckpt, "--member", "7", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "--member 7 out of range" in err


def test_ensemble_members_must_agree(digits):
    a = create_model("mlp", (1, 8, 8), 10)
    b = create_model("mlp", (1, 8, 8), 5)
    c = create_model("mlp", (1, 4, 4), 10)
    with pytest.raises(PhalanxError, match="class count"):
        Ensemble([a, b])
    with pytest.raises(PhalanxError, match="input shape"):
        Ensemble([a, c])
