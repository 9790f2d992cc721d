"""End-to-end runs too long for the default suite: `make slow` (pytest -m slow)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MNIST_DIR, requires_mnist
from phalanx import Ensemble, TrainConfig, create_method, create_model, fit, load_dataset
from phalanx.attacks import pgd
from phalanx.evaluation import evaluate_clean, robust_accuracy_curve


@pytest.mark.slow
def test_full_demo_writes_every_section(tmp_path):
    from phalanx.demo import run_demo

    ctx = run_demo(tmp_path, progress=False)
    report = (tmp_path / "report.md").read_text()
    for section in ("## Baseline ensemble", "Attacks and evaluation protocols", "Diversity training: DVERGE",
                    "Verification-aided ensemble selection"):
        assert section in report
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["kind"] == "demo" and results["schema_version"] == 1
    assert ctx.results["baseline"]["evaluation"]["clean"]["accuracy"] > 0.95


@pytest.mark.slow
@requires_mnist
def test_mnist_lenet5_ensemble_trains_and_pgd_breaks_it():
    data = load_dataset("mnist", data_dir=MNIST_DIR.parent, limit=6000, download=False)
    torch.manual_seed(0)
    ens = Ensemble([create_model("lenet5", data.in_shape, 10, mean=data.mean, std=data.std) for _ in range(3)])
    fit(ens, create_method("baseline"), data, TrainConfig(epochs=2, batch_size=64, lr=0.05, device="cpu"),
        progress=False)
    test = data.test.subset(300)
    assert evaluate_clean(ens, test)["accuracy"] > 0.93
    curve = robust_accuracy_curve(ens, test, [0.0, 0.3], attack=pgd(steps=20))
    assert curve[1].accuracy < 0.1 < curve[0].accuracy
