from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from phalanx.ensembles import Combiner, Ensemble, combine
from phalanx.errors import PhalanxError
from phalanx.models import create_model


def test_combiners_hand_computed():
    # two members, one example, two classes
    z = torch.tensor([[[0.0, math.log(3.0)]], [[math.log(3.0), 0.0]]])  # p1 = (1/4, 3/4), p2 = (3/4, 1/4)
    mean_prob = combine(z, Combiner.MEAN_PROB).exp()
    assert torch.allclose(mean_prob, torch.tensor([[0.5, 0.5]]))
    z2 = torch.tensor([[[1.0, 3.0]], [[2.0, 0.0]]])  # mean logits (1.5, 1.5)
    assert torch.allclose(combine(z2, "mean-logits").exp(), torch.tensor([[0.5, 0.5]]))
    z3 = torch.tensor([[[0.0, math.log(4.0)]], [[math.log(2.0), 0.0]]])  # p1 = (.2,.8), p2 = (2/3, 1/3)
    q = torch.tensor([2 / 3, 0.8])
    assert torch.allclose(combine(z3, "max-prob").exp(), (q / q.sum())[None])
    z4 = torch.tensor([[[0.0, 1.0, 5.0]], [[3.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]]])
    p = torch.softmax(z4, -1).mean(0)
    assert torch.allclose(combine(z4, "mean-prob").exp(), p, atol=1e-6)


def test_unknown_combiner():
    with pytest.raises(PhalanxError, match="accepted: mean-prob, mean-logits, max-prob"):
        Combiner.parse("median")


def test_member_logits_and_subset():
    members = [create_model("mlp", (1, 8, 8), 10, widths=[4]) for _ in range(3)]
    ens = Ensemble(members, "mean-logits")
    x = torch.rand(5, 1, 8, 8)
    ml = ens.member_logits(x)
    assert ml.shape == (3, 5, 10)
    assert torch.allclose(ml[1], members[1](x))
    sub = ens.subset([2, 0])
    assert len(sub) == 2 and sub.members[0] is members[2] and sub.combiner is Combiner.MEAN_LOGITS
    assert torch.allclose(sub(x), torch.log_softmax((members[2](x) + members[0](x)) / 2, -1), atol=1e-6)
    with pytest.raises(PhalanxError):
        ens.subset([0, 0])
    with pytest.raises(PhalanxError):
        ens.subset([3])


def test_mixed_architectures_allowed_but_shapes_must_agree():
    a = create_model("mlp", (1, 8, 8), 10)
    b = create_model("small-cnn", (1, 8, 8), 10)
    assert Ensemble([a, b])(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(PhalanxError, match="input shape"):
        Ensemble([a, create_model("mlp", (1, 28, 28), 10)])
    with pytest.raises(PhalanxError, match="class count"):
        Ensemble([a, create_model("mlp", (1, 8, 8), 3)])
    with pytest.raises(PhalanxError):
        Ensemble([])
    assert isinstance(Ensemble([nn.Linear(2, 2)]).members[0], nn.Linear)


def test_majority_vote_matches_a_hand_computed_case_with_ties():
    from phalanx.ensembles import vote_scores

    # 4 members, 3 classes, 3 examples: votes (0, 0, 1, 2) -> 0; (1, 2, 2, 1) -> tie 1/2;
    # (2, 0, 2, 0) -> tie 0/2
    votes = torch.tensor([[0, 1, 2], [0, 2, 0], [1, 2, 2], [2, 1, 0]])
    z = torch.nn.functional.one_hot(votes, 3).float() * 4.0  # (M, B, K) logits voting as above
    z[3, 1, 1] = 9.0  # member 3 is very sure of class 1 in example 1: mean probability favours 1
    z[0, 2, 2] = 9.0  # member 0 is very sure of class 2 in example 2: mean probability favours 2
    assert torch.equal(vote_scores(z, "vote-index").argmax(-1), torch.tensor([0, 1, 0]))
    assert torch.equal(vote_scores(z, "vote-prob").argmax(-1), torch.tensor([0, 1, 2]))
    assert torch.equal(combine(z, "vote-prob").argmax(-1), torch.tensor([0, 1, 2]))
    assert torch.equal(combine(z, "vote-index").argmax(-1), torch.tensor([0, 1, 0]))
    # counts are exact: example 0 has two votes for class 0 of four
    assert torch.equal(vote_scores(z, "vote").floor(), torch.tensor([[2.0, 1, 1], [0, 2, 2], [2, 0, 2]]))


def test_vote_gradient_is_the_soft_vote_and_no_tie_rule_is_an_error():
    from phalanx.errors import PhalanxError

    z = torch.randn(3, 4, 5, requires_grad=True)
    out = combine(z, "vote-prob")
    g, = torch.autograd.grad(out[:, 0].sum(), z)
    assert float(g.abs().sum()) > 0  # gradient attacks see the vote's boundaries
    members = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)]
    with pytest.raises(PhalanxError, match=r"combiner 'vote' with 2 members .* can tie; give a tie rule: 'vote-prob'"):
        Ensemble(members, "vote")
    ens = Ensemble(members)  # a loaded ensemble given another combiner (train --init) is checked too
    with pytest.raises(PhalanxError, match=r"combiner 'vote' with 2 members .* can tie"):
        ens.combiner = "vote"
    ens.combiner = "vote-index"
    assert ens.combiner is Combiner.VOTE_INDEX


def test_randomized_ensemble_reports_the_exact_expected_accuracy():
    from phalanx.ensembles import expected_correct
    from phalanx.errors import PhalanxError

    class Const(torch.nn.Module):
        def __init__(self, k: int) -> None:
            super().__init__()
            self.k = k

        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((x.shape[0],), self.k), 3).float()

    ens = Ensemble([Const(0), Const(1), Const(0)], "random", [0.5, 0.3, 0.2])
    x, y = torch.zeros(2, 4), torch.tensor([0, 1])
    assert torch.allclose(expected_correct(ens, x, y), torch.tensor([0.7, 0.3]))
    assert torch.allclose(ens(x).exp(), torch.tensor([[0.7, 0.3, 0.0]]).expand(2, 3), atol=2e-3)
    sub = ens.subset([1, 2])
    assert torch.allclose(sub.weights, torch.tensor([0.6, 0.4]))
    with pytest.raises(PhalanxError, match="member probabilities must be 3 non-negative numbers summing to 1"):
        Ensemble([Const(0), Const(1), Const(0)], "random", [0.5, 0.5, 0.5])
    with pytest.raises(PhalanxError, match="only used by the 'random' combiner"):
        Ensemble([Const(0), Const(1)], "mean-prob", [0.5, 0.5])


def test_randomized_checkpoint_round_trip(tmp_path, digits):
    from phalanx import create_model
    from phalanx.ensembles import load_ensemble, save_ensemble

    members = [create_model("mlp", digits.in_shape, digits.num_classes, widths=[8]) for _ in range(2)]
    save_ensemble(Ensemble(members, "random", [0.25, 0.75]), tmp_path / "r.pt")
    back = load_ensemble(tmp_path / "r.pt")
    assert back.randomized and torch.allclose(back.weights, torch.tensor([0.25, 0.75]))
