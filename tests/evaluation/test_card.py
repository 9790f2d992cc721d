"""The robustness card: worst case over every attack, who found the breaks, masking flags."""

from __future__ import annotations

import torch

from conftest import ScaledLogits as Scaled
from conftest import run_cli
from phalanx.ensembles import Ensemble, save_ensemble
from phalanx.evaluation.card import card_attacks, robustness_card


def test_card_worst_case_and_break_attribution(mlp_ensemble, tiny_mlp_pair, digits):
    split = digits.test.subset(40)
    card = robustness_card(mlp_ensemble, split, [0.0, 0.1, 0.2], source=tiny_mlp_pair, quick=True,
                           generator=torch.Generator().manual_seed(0))
    assert set(card["curves"]) == {"pgd", "autoattack", "mora", "transfer-autoattack", "transfer-mora"}
    for i, w in enumerate(card["worst_case"]):
        assert w["accuracy"] <= min(c[i]["accuracy"] for c in card["curves"].values()) + 1e-9
    for f in card["found_by"]:
        assert sum(f["found_first_by"].values()) == f["breaks"]
        assert sum(f["only_by"].values()) <= f["breaks"]
    assert card["worst_case"][-1]["accuracy"] < card["worst_case"][0]["accuracy"]
    assert {"far below", "monotone in eps", "black-box >= white-box", "convergence"} <= {f["name"] for f in card["flags"]}
    assert set(card["families"]) == {"gradient", "AutoAttack", "MORA", "transfer"}


def test_card_flags_pgd_on_an_averaged_output_that_one_member_dominates(mlp_ensemble, digits):
    ens = Ensemble([Scaled(mlp_ensemble.members[0], 100.0), *list(mlp_ensemble.members)[1:]], "mean-logits").eval()
    card = robustness_card(ens, digits.test.subset(60), [0.15], quick=True, sanity=False,
                           generator=torch.Generator().manual_seed(0))
    far = [f for f in card["flags"] if f["name"] == "far below" and "mora" in f["detail"]]
    assert far and not far[0]["passed"]  # MORA far below PGD: PGD's number is no robustness claim


def test_randomized_card_runs_arc_and_eot(mlp_ensemble, digits):
    ens = Ensemble(list(mlp_ensemble.members), "random", [0.5, 0.3, 0.2])
    assert list(card_attacks(ens)) == ["pgd", "single-sample-pgd", "eot-pgd", "eot-apgd", "arc"]
    card = robustness_card(ens, digits.test.subset(30), [0.0, 0.2], quick=True, sanity=False,
                           generator=torch.Generator().manual_seed(0))
    assert card["randomized"]
    clean = card["curves"]["arc"][0]["accuracy"]
    # expected accuracy over the draw: the members' accuracies weighted by their probabilities
    x, y = digits.test.subset(30).x, digits.test.subset(30).y
    with torch.no_grad():
        member = [(m(x).argmax(-1) == y).float().mean() for m in ens.members]
    assert abs(clean - float(0.5 * member[0] + 0.3 * member[1] + 0.2 * member[2])) < 1e-6


def test_cli_card_writes_the_report(tmp_path, mlp_ensemble, tiny_mlp_pair, capsys):
    ckpt, src = tmp_path / "ens.pt", tmp_path / "std.pt"
    save_ensemble(mlp_ensemble, ckpt, dataset="digits")
    save_ensemble(tiny_mlp_pair, src, dataset="digits")
    code, _out, err = run_cli(["evaluate", str(ckpt), "--protocol", "card", "--quick", "--limit", "20", "--eps",
                              "0,0.2", "--surrogates", str(src), "--no-sanity", "--out", str(tmp_path / "run")],
                             capsys)
    assert code == 0, err
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Robustness card" in report and "Gradient-masking flags" in report
    assert (tmp_path / "run" / "card_mora.png").is_file() and (tmp_path / "run" / "card_transfer.png").is_file()


def test_demo_card_stage_shows_baseline_and_dverge(tmp_path):
    from phalanx.demo import run_demo, stage_card, stage_diversity_training, stage_train_baseline

    ctx = run_demo(tmp_path, progress=False, overrides={"train": {"epochs": 2}, "eval": {"limit": 40, "steps": 2}},
                   stages=[stage_train_baseline, stage_diversity_training, stage_card])
    assert set(ctx.results["card"]) == {"baseline", "dverge"}
    report = (tmp_path / "report.md").read_text()
    assert "### Robustness card: baseline" in report and "### Robustness card: dverge" in report
    assert (tmp_path / "dverge_card_mora.png").is_file()


def test_whitebox_with_mora_attacks_members_with_pgd(mlp_ensemble, digits):
    from phalanx.attacks import create_attack
    from phalanx.evaluation import whitebox_evaluation

    wb = whitebox_evaluation(mlp_ensemble, digits.test.subset(20), [0.0, 0.1],
                             {"mora": create_attack("mora", n_iter=3, n_target_classes=1, scales=(0.5,))},
                             sanity=False)
    assert set(wb["member_curves"]) == {"member 0", "member 1", "member 2"}
