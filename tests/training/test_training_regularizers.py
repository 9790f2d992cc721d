"""The regularizers are pure functions: checked against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from phalanx.errors import PhalanxError
from phalanx.training.regularizers import (
    adp_log_det,
    ensemble_entropy,
    gal_regularizer,
    igat_assign,
    igat_assigned_cross_entropy,
    igat_misclassification_regularizer,
    igat_soft_probabilities,
    pairwise_cosine,
    smd_regularizer,
    trs_cosine_loss,
    trs_smoothness,
)


@pytest.mark.parametrize("m", [2, 3, 5])
def test_smd_of_identical_saliencies(m: int) -> None:
    s = torch.randn(1, 4, 3, 5, 5).expand(m, -1, -1, -1, -1)
    want = math.log(m * (m - 1) / 2) + 1.0  # every pairwise cosine is 1
    assert torch.allclose(smd_regularizer(s), torch.full((4,), want), atol=1e-5)


@pytest.mark.parametrize("m", [2, 3, 5])
def test_smd_of_orthogonal_saliencies(m: int) -> None:
    s = torch.eye(m).view(m, 1, m) * torch.tensor([2.0, 3.0, 0.5, 1.0, 7.0])[:m].view(m, 1, 1)
    assert torch.allclose(smd_regularizer(s), torch.tensor([math.log(m * (m - 1) / 2)]), atol=1e-6)


def test_smd_of_opposite_pair_and_gal_offset() -> None:
    s = torch.tensor([[[1.0, 0.0]], [[-2.0, 0.0]]])  # cosine -1
    assert smd_regularizer(s).item() == pytest.approx(-1.0, abs=1e-6)
    assert gal_regularizer(s, offset=0.0).item() == pytest.approx(-1.0, abs=1e-6)
    assert gal_regularizer(s).item() == pytest.approx(math.log(math.exp(-1) + 1e-20), abs=1e-6)


def test_pairwise_cosine_order_and_values() -> None:
    v = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])
    c = pairwise_cosine(v)[:, 0]  # pairs (0,1), (0,2), (1,2)
    assert torch.allclose(c, torch.tensor([0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]), atol=1e-6)
    with pytest.raises(PhalanxError):
        pairwise_cosine(v[:1])


def test_adp_log_det_of_orthogonal_predictions() -> None:
    # true class 0; the non-true parts of the 3 members are orthogonal unit directions
    probs = torch.tensor([[0.4, 0.6, 0.0, 0.0], [0.1, 0.0, 0.9, 0.0], [0.7, 0.0, 0.0, 0.3]], dtype=torch.float64).unsqueeze(1)
    y = torch.tensor([0])
    assert adp_log_det(probs, y, eps=1e-6).item() == pytest.approx(3 * math.log(1 + 1e-6), abs=1e-9)
    # identical non-true directions: det(J + eps I) = (M + eps) eps^(M - 1)
    same = torch.tensor([[0.5, 0.25, 0.25, 0.0]] * 3).unsqueeze(1)
    want = math.log(3 + 1e-2) + 2 * math.log(1e-2)
    assert adp_log_det(same, y, eps=1e-2).item() == pytest.approx(want, rel=1e-4)


def test_ensemble_entropy() -> None:
    k = 5
    uniform = torch.full((3, 2, k), 1.0 / k)
    assert torch.allclose(ensemble_entropy(uniform), torch.full((2,), math.log(k)), atol=1e-6)
    onehots = torch.eye(2).view(2, 1, 2)  # two members, disagreeing one-hot: mean is (0.5, 0.5)
    assert ensemble_entropy(onehots).item() == pytest.approx(math.log(2), abs=1e-6)


def test_trs_terms_by_hand() -> None:
    g = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[-3.0, 0.0], [1.0, 0.0]]])  # (M=2, B=2, D=2)
    # |cos| per example: 1 and 0 -> mean 0.5
    assert trs_cosine_loss(g).item() == pytest.approx(0.5)
    # 2 * mean_batch ||g||^2 per member: member 0 (1 + 4)/2*2 = 5, member 1 (9 + 1)/2*2 = 10; mean 7.5
    assert trs_smoothness(g).item() == pytest.approx(7.5)


def test_igat_soft_probabilities_for_a_known_ranking() -> None:
    true_probs = torch.tensor([[0.2, 0.5], [0.7, 0.1], [0.1, 0.3]])  # (M=3, B=2)
    p = igat_soft_probabilities(true_probs)
    # example 0: ascending ranks member2 < member0 < member1 -> weights 2, 4, 1 over 7 (eq. 14)
    assert torch.allclose(p[0], torch.tensor([2.0, 4.0, 1.0]) / 7)
    # example 1: member1 < member2 < member0 -> 4, 1, 2 over 7
    assert torch.allclose(p[1], torch.tensor([4.0, 1.0, 2.0]) / 7)
    assert torch.allclose(p.sum(1), torch.ones(2))


def test_igat_hard_rule_picks_the_most_correct_member() -> None:
    true_probs = torch.tensor([[0.2, 0.5, 0.0], [0.7, 0.1, 0.1], [0.1, 0.3, 0.9]])
    assert igat_assign(true_probs, "hard").tolist() == [1, 0, 2]
    with pytest.raises(PhalanxError):
        igat_assign(true_probs, "uniform")


def test_igat_soft_rule_distribution_over_members() -> None:
    n = 20000
    true_probs = torch.tensor([0.3, 0.9, 0.1, 0.5]).view(4, 1).expand(4, n)  # ranks 1, 3, 0, 2
    sel = igat_assign(true_probs, "soft", torch.Generator().manual_seed(0))
    freq = torch.bincount(sel, minlength=4).float() / n
    want = torch.tensor([2.0, 8.0, 1.0, 4.0]) / 15
    assert torch.allclose(freq, want, atol=0.015)
    again = igat_assign(true_probs, "soft", torch.Generator().manual_seed(0))
    assert torch.equal(sel, again)


def test_igat_misclassification_regularizer_by_hand() -> None:
    probs = torch.tensor([[[0.1, 0.6, 0.3], [0.8, 0.1, 0.1]],
                          [[0.2, 0.2, 0.6], [0.5, 0.25, 0.25]]])  # (M=2, B=2, K=3)
    y = torch.tensor([0, 0])
    mask = torch.tensor([True, False])
    r = igat_misclassification_regularizer(probs, y, mask, reduce="per-member")
    assert r[0].item() == pytest.approx(-math.log(0.4) - math.log(0.4), rel=1e-6)
    assert r[1].item() == 0.0
    g = igat_misclassification_regularizer(probs, y, mask, reduce="global")
    assert g[0].item() == pytest.approx(-math.log(0.4), rel=1e-6)
    clipped = igat_misclassification_regularizer(torch.tensor([[[0.0, 1.0]]]), torch.tensor([0]),
                                                 torch.tensor([True]), clip=0.99)
    assert clipped.item() == pytest.approx(-math.log(0.01), rel=1e-5)


def test_igat_assigned_cross_entropy_counts_only_assigned_misclassified() -> None:
    z = torch.randn(3, 4, 5)
    y = torch.tensor([0, 1, 2, 3])
    sel = torch.tensor([2, 0, 1, 1])
    mask = torch.tensor([True, True, False, True])
    got = igat_assigned_cross_entropy(z, y, sel, mask)
    ce = torch.nn.functional.cross_entropy
    want = (ce(z[2, :1], y[:1]) + ce(z[0, 1:2], y[1:2]) + ce(z[1, 3:4], y[3:4])) / 4
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
