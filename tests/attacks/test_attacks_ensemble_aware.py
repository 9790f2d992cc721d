"""MORA, ARC and EOT: tests that a wrong implementation fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import ScaledLogits as Scaled
from phalanx.attacks import create_attack
from phalanx.attacks.reweighing import member_weights, mora_logits, step_schedule
from phalanx.ensembles import Ensemble, expected_correct
from phalanx.errors import PhalanxError
from phalanx.types import ThreatModel


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_mora_breaks_what_pgd_on_the_averaged_output_misses(mlp_ensemble, digits):
    # one member with logits scaled 100x dominates the mean logits and its gradient
    ens = Ensemble([Scaled(mlp_ensemble.members[0], 100.0), *list(mlp_ensemble.members)[1:]], "mean-logits").eval()
    x, y = digits.test.x[:100], digits.test.y[:100]
    threat = ThreatModel("linf", 0.15)
    ok_pgd = expected_correct(ens, create_attack("pgd", steps=50)(ens, x, y, threat, generator=_gen()), y).bool()
    adv = create_attack("mora")(ens, x, y, threat, generator=_gen())
    ok_mora = expected_correct(ens, adv, y).bool()
    assert float((adv - x).abs().max()) <= 0.15 + 1e-6
    assert float(ok_mora.float().mean()) <= float(ok_pgd.float().mean()) - 0.3
    assert int((ok_pgd & ~ok_mora).sum()) >= 20  # examples MORA breaks and PGD misses


def test_mora_weights_and_logits_match_a_hand_computation():
    # two members, two classes; ensemble top class is y = 0, so p~ = -p[1] and e~ = -e[1]
    ens = torch.tensor([[0.7, 0.3]])
    mem = torch.tensor([[[0.9, 0.1]], [[0.6, 0.4]]])
    w = member_weights(ens, mem, torch.tensor([0]))
    expect = [-0.1 * (0.9 / 0.7 + 1.1 / -0.3), -0.4 * (0.6 / 0.7 + 1.4 / -0.3)]
    assert torch.allclose(w[:, 0], torch.tensor(expect), atol=1e-6)
    # scale 0: the ensemble output divided by its top-1/top-2 gap (logits mode: mean logits)
    z = torch.tensor([[[2.0, 0.0, 1.0]], [[0.0, 1.0, 5.0]]])
    mean = z.mean(0)  # [1, 0.5, 3]: top-1/top-2 gap 2
    assert torch.allclose(mora_logits(z, torch.tensor([0]), "logits", 0.0, 0.0), mean / 2.0)
    # scale 1, float_dis 0: equal member weights, so the reweighted average is the plain mean
    # (member gaps 1 and 4 are below 10: no rescaling)
    assert torch.allclose(mora_logits(z, torch.tensor([0]), "logits", 1.0, 0.0), mean, atol=1e-5)
    assert step_schedule("cosine", 0.1, 4) == pytest.approx([0.2, 0.2 * (1 + 0.5 ** 0.5) / 2, 0.1, 0.2 * (1 - 0.5 ** 0.5) / 2])


class Linear1D(nn.Module):
    """Two classes; predicts class 1 when ``sign * (x_0 - threshold) > 0``."""

    in_shape = (2,)
    num_classes = 2

    def __init__(self, threshold: float, sign: float) -> None:
        super().__init__()
        self.threshold, self.sign = threshold, sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 10.0 * self.sign * (x[:, :1] - self.threshold)
        return torch.cat([torch.zeros_like(s), s], dim=1)


def test_arc_and_eot_reach_the_known_expected_accuracy_single_sample_pgd_does_not():
    # member 1 errs when x_0 > 0.7, member 2 when x_0 < 0.3; they cannot both err in the ball of
    # radius 0.3 around x_0 = 0.5, so the best attack leaves expected accuracy exactly 0.5
    ens = Ensemble([Linear1D(0.7, 1.0), Linear1D(0.3, -1.0)], "random", [0.5, 0.5])
    x = torch.full((200, 2), 0.5)
    y = torch.zeros(200, dtype=torch.long)
    threat = ThreatModel("linf", 0.3)
    assert float(expected_correct(ens, x, y).mean()) == 1.0
    acc = {}
    for name, kw in (("arc", {}), ("eot-pgd", {}), ("single", {"samples": 1})):
        atk = create_attack("arc" if name == "arc" else "eot-pgd", **kw)
        adv = atk(ens, x, y, threat, generator=_gen(1))
        assert float((adv - x).abs().max()) <= 0.3 + 1e-6
        acc[name] = float(expected_correct(ens, adv, y).mean())
    assert acc["arc"] == pytest.approx(0.5)
    assert acc["eot-pgd"] == pytest.approx(0.5)
    assert acc["single"] >= 0.6


def test_eot_exact_loss_is_the_weighted_member_loss(mlp_ensemble, digits):
    from phalanx.attacks import expected_loss

    ens = Ensemble(list(mlp_ensemble.members), "random", [0.2, 0.3, 0.5])
    x, y = digits.test.x[:5], digits.test.y[:5]
    val, _ = expected_loss(ens, x, y)
    per = torch.stack([nn.functional.cross_entropy(m(x), y, reduction="none") for m in ens.members]).detach()
    assert torch.allclose(val, (torch.tensor([0.2, 0.3, 0.5])[:, None] * per).sum(0), atol=1e-5)
    sampled, _ = expected_loss(ens, x, y, samples=4000, generator=_gen())
    assert torch.allclose(sampled, val, atol=0.1 * float(per.max()) + 1e-3)


def test_bad_inputs_name_the_value_and_what_is_accepted(mlp_ensemble, digits):
    x, y = digits.test.x[:4], digits.test.y[:4]
    threat = ThreatModel("linf", 0.1)
    with pytest.raises(PhalanxError, match="MORA attacks ensembles of at least 2 members, got a model with 1"):
        create_attack("mora")(mlp_ensemble.members[0], x, y, threat)
    with pytest.raises(PhalanxError, match="at least 2 members, got a model with 1"):
        create_attack("mora")(mlp_ensemble.subset([0]), x, y, threat)
    with pytest.raises(PhalanxError, match=r"ARC attacks randomized ensembles .* got 'mean-prob'"):
        create_attack("arc")(mlp_ensemble, x, y, threat)
    with pytest.raises(PhalanxError, match=r"EOT samples must be an integer >= 1 .* got 0"):
        create_attack("eot-pgd", samples=0)
    with pytest.raises(PhalanxError, match=r"EOT samples must be an integer >= 1 .* got 0"):
        create_attack("eot-apgd", samples=0)
    with pytest.raises(PhalanxError, match="unknown MORA mode 'median'; accepted: softmax, voting, logits"):
        create_attack("mora", mode="median")
    with pytest.raises(PhalanxError, match="MORA attacks deterministic combiners"):
        create_attack("mora")(Ensemble(list(mlp_ensemble.members), "random"), x, y, threat)
