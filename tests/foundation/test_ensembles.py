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
