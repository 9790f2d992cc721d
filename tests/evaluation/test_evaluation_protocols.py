"""Evaluation protocols: white-box curves, transferability, diversity, transfer sets, sanity."""

from __future__ import annotations

import pytest
import torch

from phalanx.attacks import create_attack
from phalanx.errors import PhalanxError
from phalanx.evaluation import (
    check_blackbox_vs_whitebox,
    check_convergence,
    check_single_vs_multi,
    correct_by_all,
    decision_regions,
    diversity_matrix,
    generate_transfer_sets,
    load_transfer_sets,
    score_transfer_sets,
    transfer_attacks,
    transferability_matrix,
    whitebox_evaluation,
)
from phalanx.workflows.evaluation import EvaluationSpec


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def small(digits):
    return digits.test.subset(80)


def test_sanity_checks_hand_values():
    assert check_convergence(0.50, 0.495, 10, 40, 0.1).passed
    assert not check_convergence(0.50, 0.48, 10, 40, 0.1).passed  # more steps lowered accuracy by 2 points
    assert check_single_vs_multi(0.60, 0.55, 0.1).passed
    assert not check_single_vs_multi(0.40, 0.55, 0.1).passed  # FGSM stronger than PGD: masking
    assert not check_blackbox_vs_whitebox(0.30, 0.50, 0.1).passed
    assert check_blackbox_vs_whitebox(0.70, 0.50, 0.1).passed


def test_whitebox_worst_case_and_members(mlp_ensemble, small):
    attacks = {"fgsm": create_attack("fgsm"), "pgd": create_attack("pgd", steps=5)}
    res = whitebox_evaluation(mlp_ensemble, small, [0.0, 0.1], attacks, generator=_gen())
    with torch.no_grad():
        clean = float((mlp_ensemble(small.x).argmax(-1) == small.y).float().mean())
    for name in attacks:
        assert res["curves"][name][0]["accuracy"] == pytest.approx(clean)
        for w, c in zip(res["worst_case"], res["curves"][name], strict=True):
            assert w["accuracy"] <= c["accuracy"]
    assert res["worst_case"][1]["accuracy"] < clean
    assert set(res["member_curves"]) == {"member 0", "member 1", "member 2"}
    assert [c["name"] for c in res["sanity"]] == ["convergence", "single-step >= multi-step"]
    assert "log of mean-prob" in res["output"]


def test_correct_by_all_and_transferability(mlp_ensemble, small):
    sub = correct_by_all(mlp_ensemble, small)
    with torch.no_grad():
        assert bool((mlp_ensemble.member_logits(sub.x).argmax(-1) == sub.y).all())
    res = transferability_matrix(mlp_ensemble, small, 0.15, attack=create_attack("pgd", steps=5), restarts=2,
                                 generator=_gen())
    mat = torch.tensor(res["matrix"])
    assert mat.shape == (3, 4) and res["n"] == len(sub)
    assert bool((mat >= 0).all() and (mat <= 1).all())
    # white-box (diagonal) success beats the average transfer to the other members
    for i in range(3):
        others = [mat[i, j] for j in range(3) if j != i]
        assert mat[i, i] >= sum(others) / len(others)
    again = transferability_matrix(mlp_ensemble, small, 0.15, attack=create_attack("pgd", steps=5), restarts=2,
                                   generator=_gen())
    assert again["matrix"] == res["matrix"]
    with pytest.raises(PhalanxError, match="restarts"):
        transferability_matrix(mlp_ensemble, small, 0.1, restarts=0)


def test_diversity_matrix_shape_and_self_distillation(mlp_ensemble, small):
    last = mlp_ensemble.members[0].num_feature_layers
    res = diversity_matrix(mlp_ensemble, small, eps=0.3, steps=20, layers=(last,), generator=_gen())
    ce = torch.tensor(res["ce"])
    div = torch.tensor(res["diversity"])
    assert ce.shape == (3, 3) and torch.allclose(div, div.T) and bool((div.diagonal() == 0).all())
    # distilling member i's logits of x into x_s makes member i predict y: its own CE is lowest
    for i in range(3):
        assert ce[i, i] == ce[i].min()


def test_transfer_sets_round_trip_and_all_or_nothing(mlp_ensemble, cnn_ensemble, small, tmp_path):
    atks = transfer_attacks(steps=3, restarts=2, kinds=("mpgd", "mdi2fgsm"))
    assert sorted(atks) == ["mdi2fgsm-ce", "mdi2fgsm-cw", "mpgd-ce-r0", "mpgd-ce-r1", "mpgd-cw-r0", "mpgd-cw-r1"]
    folder = generate_transfer_sets({"cnn": cnn_ensemble}, small, [0.05, 0.1], tmp_path / "sets", attacks=atks,
                                    generator=_gen())
    sets = load_transfer_sets(folder)
    assert set(sets["adv"]) == {"0.05", "0.1"} and len(sets["adv"]["0.1"]) == 6
    for eps, by in sets["adv"].items():
        for adv in by.values():
            assert float((adv - sets["x"]).abs().max()) <= float(eps) + 1e-6
    res = score_transfer_sets(mlp_ensemble, folder)
    for row in res["per_eps"]:
        assert row["accuracy"] <= min(row["per_set"].values()) + 1e-12
        assert row["accuracy"] <= res["clean_accuracy"]
        assert row["accuracy_among_clean_correct"] >= row["accuracy"]
    (tmp_path / "bad").mkdir()
    torch.save({"x": 1}, tmp_path / "bad" / "sets.pt")
    with pytest.raises(PhalanxError, match="not a phalanx transfer-set file"):
        load_transfer_sets(tmp_path / "bad")
    with pytest.raises(PhalanxError, match="no transfer sets"):
        load_transfer_sets(tmp_path / "missing")


def test_decision_regions_center_is_model_prediction(mlp_ensemble, small):
    x, y = small.x[:1], small.y[:1]
    res = decision_regions({"ens": mlp_ensemble}, x, y, mlp_ensemble.members[0], eps=0.1, resolution=5,
                           generator=_gen())
    grid = res["grids"]["ens"]
    assert len(grid) == 5 and len(grid[0]) == 5
    with torch.no_grad():
        assert grid[2][2] == int(mlp_ensemble(x).argmax(-1))


def test_spec_rejects_bad_input():
    with pytest.raises(PhalanxError, match="unknown protocol 'greybox'"):
        EvaluationSpec(protocol="greybox")
    with pytest.raises(PhalanxError, match="unknown attack 'zap'"):
        EvaluationSpec(attacks=("zap",))
    with pytest.raises(PhalanxError, match="steps must be an integer >= 1, got 0"):
        EvaluationSpec(steps=0)
    with pytest.raises(PhalanxError, match="eps must be >= 0"):
        EvaluationSpec(eps=(-0.1,))
    with pytest.raises(PhalanxError, match="unknown loss 'l9'"):
        EvaluationSpec(loss="l9")
    with pytest.raises(PhalanxError, match="card transfers from one standard ensemble: give one --surrogates checkpoint, got 2"):
        EvaluationSpec(protocol="card", surrogates=("a.pt", "b.pt"))


def test_demo_stage_adds_curves_and_heat_map(cnn_ensemble, digits, tmp_path):
    from phalanx.config import build_config
    from phalanx.demo import DEMO_CONFIG, DemoContext
    from phalanx.demo.attacks import stage_attacks

    tree = {k: dict(v) for k, v in DEMO_CONFIG.items()}
    tree["eval"].update({"limit": 30, "steps": 2, "eps": [0.0, 0.1]})
    ctx = DemoContext(tmp_path, build_config(tree), digits, progress=False)
    ctx.ensembles["baseline"] = cnn_ensemble
    stage_attacks(ctx)
    text = "\n".join(ctx.sections)
    assert "attacks_whitebox_curves.png" in text and "attacks_transferability_eps0.1.png" in text
    for name in ("attacks_whitebox_curves.png", "attacks_transferability_eps0.1.png",
                 "attacks_adversarial_examples.png", "attacks_decision_regions.png"):
        assert (tmp_path / name).is_file(), name
    assert len(ctx.results["attacks"]["whitebox"]["curves"]) == 5
