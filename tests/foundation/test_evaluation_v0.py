from __future__ import annotations

import itertools

import pytest
import torch

from phalanx.attacks import pgd
from phalanx.errors import PhalanxError
from phalanx.evaluation import evaluate_clean, robust_accuracy_curve


def test_clean_metrics_hand_checked(mlp_ensemble, digits):
    part = digits.test.subset(100)
    m = evaluate_clean(mlp_ensemble, part)
    with torch.no_grad():
        logits = mlp_ensemble.member_logits(part.x)
        member_acc = (logits.argmax(-1) == part.y).float().mean(1)
        agree = (logits.argmax(-1) == logits.argmax(-1)[:1]).all(0).float().mean()
        ens_acc = (mlp_ensemble(part.x).argmax(-1) == part.y).float().mean()
    assert m["accuracy"] == pytest.approx(float(ens_acc))
    assert m["member_accuracy"] == pytest.approx(member_acc.tolist())
    assert m["agreement"] == pytest.approx(float(agree))
    assert m["pairwise_agreement"][0][0] == 1.0
    assert m["accuracy"] > 0.85


def test_pgd_curve_starts_at_clean_and_decreases(mlp_ensemble, digits):
    part = digits.test.subset(120)
    curve = robust_accuracy_curve(mlp_ensemble, part, [0.0, 0.05, 0.1, 0.3], attack=pgd(steps=10),
                                  generator=torch.Generator().manual_seed(0))
    accs = [p.accuracy for p in curve]
    assert accs[0] == pytest.approx(evaluate_clean(mlp_ensemble, part)["accuracy"])
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(accs))
    assert accs[-1] < accs[0] - 0.5  # eps 0.3 breaks an undefended digits MLP ensemble
    with pytest.raises(PhalanxError):
        robust_accuracy_curve(mlp_ensemble, part, [-0.1])
