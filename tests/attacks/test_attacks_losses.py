"""Attack losses against hand-computed values, and the transfer/joint/distillation pieces."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from phalanx.attacks import (
    create_attack,
    cw_margin_loss,
    dlr_loss,
    dlr_targeted_loss,
    elu_regulator,
    feature_distillation,
    input_diversity,
    joint_margins,
    skip_gradient,
)
from phalanx.attacks.losses import all_members_fooled, runner_up
from phalanx.attacks.query import square_p
from phalanx.errors import PhalanxError
from phalanx.models import create_model
from phalanx.types import ThreatModel

Z = torch.tensor([[3.0, 1.0, 0.5, 0.2, -1.0]])


def test_cw_margin_hand_values():
    assert cw_margin_loss(Z, torch.tensor([0])).item() == pytest.approx(1.0 - 3.0)
    assert cw_margin_loss(Z, torch.tensor([2]), confidence=10.0).item() == pytest.approx(3.0 - 0.5)
    # capped at the confidence (default 0: no gain once misclassified)
    assert cw_margin_loss(Z, torch.tensor([2])).item() == 0.0
    assert cw_margin_loss(Z, torch.tensor([2]), confidence=0.1).item() == pytest.approx(0.1)


def test_dlr_hand_values():
    # -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)
    assert dlr_loss(Z, torch.tensor([0])).item() == pytest.approx(-(3 - 1) / (3 - 0.5))
    assert dlr_loss(Z, torch.tensor([1])).item() == pytest.approx(-(1 - 3) / (3 - 0.5))
    # targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    v = dlr_targeted_loss(Z, torch.tensor([0]), torch.tensor([2])).item()
    assert v == pytest.approx(-(3 - 0.5) / (3 - (0.5 + 0.2) / 2))


def test_dlr_is_shift_and_scale_invariant():
    y = torch.tensor([1])
    assert dlr_loss(2.5 * Z + 7.0, y).item() == pytest.approx(dlr_loss(Z, y).item(), rel=1e-5)


def test_joint_margins_and_elu_regulator_hand_values():
    # two members, one example, label 0
    z = torch.tensor([[[2.0, 1.0, 0.0]], [[0.0, 1.5, 0.5]]])
    y = torch.tensor([0])
    m = joint_margins(z, y)  # untargeted: z_t - runner-up at x
    assert m[:, 0].tolist() == pytest.approx([1.0, -1.5])
    mt = joint_margins(z, y, torch.tensor([[2], [2]]))  # targeted: z_t - z_{r_a}
    assert mt[:, 0].tolist() == pytest.approx([2.0, -0.5])
    # sum of ELUs: 1.0 + (exp(-1.5) - 1)
    assert elu_regulator(m).item() == pytest.approx(1.0 + math.exp(-1.5) - 1.0)
    assert all_members_fooled(z, y).tolist() == [False]
    assert runner_up(z)[:, 0].tolist() == [1, 2]


def test_square_schedule():
    assert square_p(0, 10000, 0.8) == 0.8
    assert square_p(11, 10000, 0.8) == pytest.approx(0.4)
    assert square_p(9000, 10000, 0.8) == pytest.approx(0.8 / 512)
    assert square_p(50, 1000, 0.8) == pytest.approx(0.8 / 8)  # rescaled to 10000: it 500 in (200, 500]


def test_input_diversity_is_deterministic_and_keeps_shape():
    x = torch.rand(4, 1, 8, 8)
    a = input_diversity(x, 1.0, torch.Generator().manual_seed(0))
    b = input_diversity(x, 1.0, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert torch.equal(input_diversity(x, 0.0), x)
    with pytest.raises(PhalanxError, match="diversity probability"):
        input_diversity(x, 1.5)


def test_sgm_scales_residual_gradients_only_inside_the_context():
    torch.manual_seed(0)
    net = create_model("resnet20", (1, 8, 8), 10).eval()
    x = torch.rand(2, 1, 8, 8, requires_grad=True)

    def grad() -> torch.Tensor:
        g, = torch.autograd.grad(net(x).sum(), x)
        return g

    g1 = grad()
    with skip_gradient(net, 0.2) as n_blocks:
        assert n_blocks == 9
        out_in = net(x).detach()
        g2 = grad()
    assert torch.allclose(out_in, net(x).detach(), atol=1e-5)  # the forward value is unchanged
    assert not torch.allclose(g1, g2)
    assert torch.equal(grad(), g1)  # hooks removed afterwards
    with skip_gradient(net, 1.0) as n:
        assert n == 0


def test_feature_distillation_reduces_feature_distance_and_leaves_model(mlp_ensemble, digits):
    member = copy.deepcopy(mlp_ensemble.members[0]).train()
    before = {k: v.clone() for k, v in member.state_dict().items()}
    xs, xt = digits.test.x[:32], digits.test.x[32:64]
    for layer in range(1, member.num_feature_layers + 1):
        adv = feature_distillation(member, xs, xt, layer)
        assert float((adv - xs).abs().max()) <= 0.07 + 1e-6
        with torch.no_grad():
            d0 = (member.features(xs, layer) - member.features(xt, layer)).pow(2).mean()
            d1 = (member.features(adv, layer) - member.features(xt, layer)).pow(2).mean()
        assert d1 < d0
    assert member.training
    assert all(torch.equal(before[k], v) for k, v in member.state_dict().items())
    assert all(p.grad is None for p in member.parameters())
    with pytest.raises(PhalanxError, match="feature layer"):
        feature_distillation(member, xs, xt, 99)


def test_targeted_pgd_reaches_targets(mlp_ensemble, digits):
    x, y = digits.test.x[:40], digits.test.y[:40]
    tgt = (y + 1) % 10
    atk = create_attack("pgd", steps=20, loss="cw").with_(targeted=True)
    adv = atk(mlp_ensemble, x, y, ThreatModel("linf", 0.3), generator=torch.Generator().manual_seed(0), target=tgt)
    with torch.no_grad():
        hit = (mlp_ensemble(adv).argmax(-1) == tgt).float().mean()
    assert hit > 0.5


def test_ga3_finds_joint_errors_that_single_member_pgd_misses(mlp_ensemble, digits):
    """Amir et al. app. D: G.A. 3 searches one input fooling both members of a pair."""
    x, y = digits.test.x[:200], digits.test.y[:200]
    pair = mlp_ensemble.subset([0, 1])
    with torch.no_grad():
        agree = (pair.member_logits(x).argmax(-1) == y).all(0)
    x, y = x[agree], y[agree]
    threat = ThreatModel("linf", 0.08)
    gen = torch.Generator().manual_seed(0)
    ga3 = create_attack("ga3", steps=20, members=(0, 1))
    adv_joint = ga3(mlp_ensemble, x, y, threat, generator=gen)
    adv_single = create_attack("pgd", steps=20)(mlp_ensemble.members[0], x, y, threat, generator=gen)
    with torch.no_grad():
        joint = all_members_fooled(pair.member_logits(adv_joint), y)
        single = all_members_fooled(pair.member_logits(adv_single), y)
    assert bool((joint & ~single).any())
    assert joint.sum() > single.sum()


@pytest.mark.parametrize("name", ["fgsm", "pgd", "bim", "mim"])
def test_l2_gradient_attacks_stay_in_the_l2_ball(name, mlp_ensemble, digits):
    x, y = digits.test.x[:32], digits.test.y[:32]
    atk = create_attack(name, **({"steps": 5} if name != "fgsm" else {}))
    adv = atk(mlp_ensemble, x, y, ThreatModel("l2", 1.0), generator=torch.Generator().manual_seed(0))
    assert float((adv - x).flatten(1).norm(dim=1).max()) <= 1.0 + 1e-5
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    with torch.no_grad():
        assert (mlp_ensemble(adv).argmax(-1) == y).float().mean() < (mlp_ensemble(x).argmax(-1) == y).float().mean()


def test_query_attacks_reject_l2(mlp_ensemble, digits):
    x, y = digits.test.x[:4], digits.test.y[:4]
    for name in ("square", "signhunter", "apgd-ce", "distill"):
        with pytest.raises(PhalanxError, match="L-inf"):
            create_attack(name)(mlp_ensemble, x, y, ThreatModel("l2", 1.0))
