"""Transfer-set sources have unique identities: two checkpoints both named ``ensemble.pt`` are
two surrogates (they used to collapse into one, overstating black-box robustness)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from phalanx.ensembles import save_ensemble
from phalanx.errors import PhalanxError
from phalanx.evaluation import load_surrogates
from phalanx.evaluation.transfer import source_labels, source_of


def test_labels_are_the_shortest_distinguishing_suffix(tmp_path) -> None:
    assert source_labels([tmp_path / "A" / "ensemble.pt", tmp_path / "B" / "ensemble.pt"]) == [
        "A/ensemble.pt", "B/ensemble.pt"]
    assert source_labels([tmp_path / "run1/A/e.pt", tmp_path / "run2/A/e.pt", tmp_path / "B/e.pt"]) == [
        "run1/A/e.pt", "run2/A/e.pt", "B/e.pt"]
    assert source_labels([tmp_path / "x" / "one.pt", tmp_path / "x" / "two.pt"]) == ["one.pt", "two.pt"]
    assert source_labels([tmp_path / "only.pt"]) == ["only.pt"]
    labels = source_labels([tmp_path / "a/b/c.pt", tmp_path / "b/c.pt", tmp_path / "c.pt"])
    assert len(set(labels)) == 3
    with pytest.raises(PhalanxError, match="given twice"):
        source_labels([tmp_path / "A" / "e.pt", tmp_path / "A" / ".." / "A" / "e.pt"])
    assert source_of("A/ensemble.pt/mpgd-ce-r0") == "A/ensemble.pt" and source_of("baseline-3/sgm-cw") == "baseline-3"


@pytest.fixture(scope="module")
def two_runs(mlp_ensemble, cnn_ensemble, tmp_path_factory) -> tuple[Path, Path]:
    """Two different ensembles, each saved as ``ensemble.pt`` by its own run."""
    root = tmp_path_factory.mktemp("runs")
    a, b = root / "A" / "ensemble.pt", root / "B" / "ensemble.pt"
    save_ensemble(mlp_ensemble, a, dataset="digits")
    save_ensemble(cnn_ensemble, b, dataset="digits")
    return a, b


def test_two_checkpoints_named_alike_are_two_sources(two_runs, tmp_path) -> None:
    a, b = two_runs
    models, ids = load_surrogates([a, b])
    assert list(models) == ["A/ensemble.pt", "B/ensemble.pt"] and models["A/ensemble.pt"] is not models["B/ensemble.pt"]
    assert ids["A/ensemble.pt"]["sha256"] != ids["B/ensemble.pt"]["sha256"]
    assert ids["B/ensemble.pt"]["paths"] == [str(b.resolve())]
    # a byte-identical copy is the same surrogate: one source, listed with both paths
    copy = tmp_path / "C" / "ensemble.pt"
    copy.parent.mkdir()
    shutil.copy(a, copy)
    models, ids = load_surrogates([a, copy, b])
    assert len(models) == 2 and ids["A/ensemble.pt"]["paths"] == [str(a.resolve()), str(copy.resolve())]
    with pytest.raises(PhalanxError, match="not found"):
        load_surrogates([a, tmp_path / "missing.pt"])


def _check_two_sources(bb: dict, a: Path, b: Path) -> None:
    assert [s["label"] for s in bb["sources"]] == ["A/ensemble.pt", "B/ensemble.pt"]
    assert {s["paths"][0] for s in bb["sources"]} == {str(a.resolve()), str(b.resolve())}
    for row in bb["per_eps"]:
        assert set(row["per_source"]) == {"A/ensemble.pt", "B/ensemble.pt"}
        assert {source_of(k) for k in row["per_set"]} == {"A/ensemble.pt", "B/ensemble.pt"}
        # all-or-nothing over both sources: never above either source alone
        assert row["accuracy"] <= min(row["per_source"].values()) + 1e-12


def test_attack_transfer_sets_keep_both_surrogates(two_runs, capsys, tmp_path) -> None:
    a, b = two_runs
    code, out, err = run_cli(["attack", str(a), str(b), "--transfer-sets", "--eps", "0.1", "--transfer-steps", "2",
                              "--restarts", "1", "--limit", "16", "--out", str(tmp_path / "ts"), "--no-progress"],
                             capsys)
    assert code == 0, err
    assert "2 surrogate(s)" in out and "A/ensemble.pt" in out and "B/ensemble.pt" in out
    sets = tmp_path / "ts" / "transfer_sets"
    manifest = json.loads((sets / "manifest.json").read_text())
    assert sorted(manifest["sources"]) == ["A/ensemble.pt", "B/ensemble.pt"]
    results = json.loads((tmp_path / "ts" / "results.json").read_text())
    assert len({s["sha256"] for s in results["sources"].values()}) == 2
    code, _, err = run_cli(["evaluate", str(a), "--protocol", "blackbox", "--transfer-sets", str(sets), "--no-sanity",
                            "--limit", "16", "--out", str(tmp_path / "bb"), "--no-progress"], capsys)
    assert code == 0, err
    bb = json.loads((tmp_path / "bb" / "results.json").read_text())["results"]["blackbox"]
    _check_two_sources(bb, a, b)
    report = (tmp_path / "bb" / "report.md").read_text()
    assert "Sources (2 surrogates)" in report and f"`{a.resolve()}`" in report and f"`{b.resolve()}`" in report


def test_evaluate_surrogates_keep_both(two_runs, capsys, tmp_path) -> None:
    a, b = two_runs
    code, _, err = run_cli(["evaluate", str(a), "--protocol", "blackbox", "--surrogates", f"{a},{b}", "--eps", "0.1",
                            "--transfer-steps", "2", "--no-sanity", "--limit", "16", "--out", str(tmp_path / "ev"),
                            "--no-progress"], capsys)
    assert code == 0, err
    bb = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]["blackbox"]
    _check_two_sources(bb, a, b)


def test_randomized_ensemble_scores_its_expected_accuracy_over_the_draw() -> None:
    """A randomized ensemble's black-box accuracy is the exact probability of a correct answer,
    not the accuracy of its most likely answer (here 0.7, where the mode is always right)."""
    import torch

    from phalanx.ensembles import Ensemble
    from phalanx.evaluation import score_transfer_sets

    class Const(torch.nn.Module):
        def __init__(self, k: int) -> None:
            super().__init__()
            self.k = k

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.full((x.shape[0],), self.k), 3).float()

    ens = Ensemble([Const(0), Const(1)], "random", [0.7, 0.3])
    x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    sets = {"x": x, "y": y, "adv": {"0.1": {"A/e.pt/pgd": x + 0.1, "B/e.pt/pgd": x - 0.1}}}
    bb = score_transfer_sets(ens, sets)
    assert bb["clean_accuracy"] == pytest.approx(0.7)
    row = bb["per_eps"][0]
    assert row["accuracy"] == pytest.approx(0.7) and row["per_source"] == pytest.approx({"A/e.pt": 0.7, "B/e.pt": 0.7})
    assert row["accuracy_among_clean_correct"] == pytest.approx(1.0)
