"""The demo stage: DVERGE from the demo's baseline, transferability matrices side by side."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from phalanx.demo.diversity import mean_off_diagonal


def test_mean_off_diagonal_ignores_diagonal_and_ensemble_column() -> None:
    mat = torch.tensor([[1.0, 0.2, 0.4, 0.9], [0.6, 1.0, 0.0, 0.9], [0.1, 0.3, 1.0, 0.9]])
    assert mean_off_diagonal(mat) == pytest.approx((0.2 + 0.4 + 0.6 + 0.0 + 0.1 + 0.3) / 6)


def test_demo_stage_quick(tmp_path: Any) -> None:
    from phalanx.demo import run_demo, stage_train_baseline
    from phalanx.demo.diversity import stage_diversity_training

    ctx = run_demo(tmp_path, progress=False, overrides={"train": {"epochs": 2}, "eval": {"limit": 40, "steps": 2}},
                   stages=[stage_train_baseline, stage_diversity_training])
    res = ctx.results["dverge"]
    m = ctx.config.model.members
    for mat in res["transferability"].values():
        assert len(mat) == m and all(len(row) == m + 1 for row in mat)
        assert all(0.0 <= v <= 1.0 for row in mat for v in row)
    assert (tmp_path / "transferability.png").is_file() and (tmp_path / "dverge.pt").is_file()
    assert "Diversity training: DVERGE" in (tmp_path / "report.md").read_text()
    # the baseline was copied, not trained further
    base, dv = ctx.ensembles["baseline"], ctx.ensembles["dverge"]
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), dv.state_dict().values()))
