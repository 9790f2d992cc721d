"""Faithfulness of the evaluation protocols to DVERGE's paper and reference evaluation code."""

from __future__ import annotations

import pytest
import torch

import phalanx.evaluation.transferability as transferability
from phalanx.evaluation import diversity_matrix, transfer_attacks


def test_transfer_attacks_step_eps_over_five():
    # DVERGE sec. 4.3: "We run each attack for 100 iterations with the step size of eps/5"
    atks = transfer_attacks()
    assert len(atks) == 2 * (3 + 1 + 1)  # {ce, cw} x (mpgd x 3 starts + M-DI2-FGSM + SGM)
    for name, atk in atks.items():
        assert (atk.steps, atk.step_size) == (100, pytest.approx(0.2)), name  # type: ignore[attr-defined]


def test_diversity_matrix_draws_one_layer_per_batch_for_all_members(mlp_ensemble, digits, monkeypatch):
    # eval_diversity.py: ``layer = random.randint(1, depth)`` once per batch, used by every member
    calls: list[int] = []
    real = transferability.feature_distillation

    def spy(model, xs, xt, layer, **kw):
        calls.append(layer)
        return real(model, xs, xt, layer, **kw)

    monkeypatch.setattr(transferability, "feature_distillation", spy)
    m = len(mlp_ensemble)
    res = diversity_matrix(mlp_ensemble, digits.test.subset(120), steps=1, limit=60, batch_size=6,
                           generator=torch.Generator().manual_seed(0))
    per_batch = [calls[k:k + m] for k in range(0, len(calls), m)]
    assert len(per_batch) == -(-res["n"] // 6) and len(per_batch) >= 5
    assert all(len(set(b)) == 1 for b in per_batch)  # the same layer for every member of a batch
    depth = mlp_ensemble.members[0].num_feature_layers
    assert {b[0] for b in per_batch} == set(range(1, depth + 1))  # a fresh draw per batch
