"""Randomized attacks on binary digits MLPs (the paper's benchmark shape): the monolithic MILP and
the decomposition agree, every attack re-checks, and the CLI writes its files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from phalanx.randomized.attack import RandomizedAttackConfig, Verdict, randomized_attack
from phalanx.randomized.problem import prepare_classifiers, recheck_attack


@pytest.fixture(scope="module")
def binary_setup():  # type: ignore[no-untyped-def]
    from phalanx.randomized.digits import attack_points, binary_digits, train_binary_classifiers

    data = binary_digits((3, 6))
    ens = train_binary_classifiers(data, num=3, widths=(8,), epochs=8, seed=0)
    x, y = attack_points(data.test, list(ens.members), 2)
    return data, ens, x, y


def test_binary_data_and_points(binary_setup) -> None:  # type: ignore[no-untyped-def]
    data, ens, x, y = binary_setup
    assert data.num_classes == 2 and set(data.test.y.tolist()) == {0, 1}
    assert sorted(y.tolist()) == [0, 1]  # balanced
    with torch.no_grad():
        assert all(bool((m(x).argmax(-1) == y).all()) for m in ens.members)


@pytest.mark.parametrize("eps,num_attacks", [(2.0, 1), (4.0, 1), (4.0, 2)])
def test_milp_and_decomposition_agree(binary_setup, eps: float, num_attacks: int) -> None:  # type: ignore[no-untyped-def]
    _, ens, x, y = binary_setup
    members = list(ens.members)
    out = {}
    for backend in ("decomposition", "milp"):
        config = RandomizedAttackConfig(eps=eps, alpha=0.5, num_attacks=num_attacks, backend=backend,
                                        time_limit_s=120)
        res = randomized_attack(members, x, y, config)
        assert res.status == "optimal" and res.upper_bound is not None
        assert res.rechecked and res.value == pytest.approx(res.upper_bound, abs=1e-6)
        rc = recheck_attack(prepare_classifiers(members, x.shape[1:]), x.double().numpy(), y.numpy(),
                            res.attacks, res.probabilities, config)
        assert rc.in_ball and rc.value == pytest.approx(res.value)
        assert np.abs(res.attacks - x.double().numpy()[None]).reshape(len(res.probabilities), 2, -1).sum(-1).max() \
            <= eps + 1e-9
        out[backend] = res
    assert out["decomposition"].value == pytest.approx(out["milp"].value, abs=1e-6)
    assert (out["decomposition"].verdict is Verdict.NOT_ROBUST) == (out["milp"].verdict is Verdict.NOT_ROBUST)


def test_cli_randomized_attack(binary_setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from phalanx.cli.main import main
    from phalanx.ensembles import save_ensemble

    data, ens, _, _ = binary_setup
    ck = save_ensemble(ens, tmp_path / "ens.pt", dataset=data.name)
    out = tmp_path / "run"
    rc = main(["randomized-attack", str(ck), "--points", "2", "--eps", "4", "--alpha", "0.5",
               "--num-attacks", "2", "--out", str(out), "--no-progress", "--time-limit", "60"])
    assert rc in (None, 0)
    doc = json.loads((out / "results.json").read_text())
    assert doc["dataset"] == "digits_3_6" and doc["num_points"] == 2
    assert doc["result"]["verdict"] in ("not-robust", "robust", "robust-for-num-attacks", "unknown")
    assert set(doc["comparison"]) == {"uniform attacker (UA)", "best deterministic attacker (BDA)"}
    report = (out / "report.md").read_text()
    assert "0-1 loss per attack" in report and (out / "attacks.png").is_file()


def test_cli_bad_input(binary_setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from phalanx.cli.main import main
    from phalanx.ensembles import save_ensemble

    data, ens, _, _ = binary_setup
    ck = save_ensemble(ens, tmp_path / "ens.pt", dataset=data.name)
    with pytest.raises(SystemExit) as e:
        main(["randomized-attack", str(ck), "--eps", "1", "--members", "7", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
