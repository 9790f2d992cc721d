"""Contract tests generated from the attack registry: every registered attack is covered."""

from __future__ import annotations

import copy

import pytest
import torch

from phalanx.attacks import ATTACKS, create_attack
from phalanx.ensembles import Ensemble, expected_correct
from phalanx.errors import PhalanxError
from phalanx.types import ThreatModel

#: tiny budgets so that the contract runs fast; unknown names run with their defaults
BUDGETS: dict[str, dict[str, object]] = {
    "pgd": {"steps": 5}, "mpgd": {"steps": 5}, "bim": {"steps": 5}, "mim": {"steps": 5},
    "mdi2fgsm": {"steps": 5}, "sgm": {"steps": 5}, "ga2": {"steps": 5}, "ga3": {"steps": 5},
    "distill": {"steps": 5},
    "apgd-ce": {"n_iter": 10}, "apgd-t": {"n_iter": 5, "n_target_classes": 2},
    "fab-t": {"n_iter": 5, "n_target_classes": 2}, "square": {"n_queries": 30},
    "autoattack": {"n_iter": 5, "n_target_classes": 2, "n_queries": 20, "fab_iter": 5},
    "signhunter": {"n_queries": 30},
    "mora": {"n_iter": 5, "n_target_classes": 2, "scales": (0.5, 1.0)}, "arc": {"steps": 3},
    "eot-pgd": {"steps": 5, "samples": 3}, "eot-apgd": {"n_iter": 5},
}
#: attacks for randomized ensembles run on the same members with the 'random' combiner (ARC is
#: defined only there; on a deterministic model the EOT attacks are plain PGD / APGD)
RANDOMIZED_ONLY = {"arc", "eot-pgd", "eot-apgd"}
NAMES = ATTACKS.names()
EPS = 0.2


def _make(name: str):
    return create_attack(name, **BUDGETS.get(name, {}))


@pytest.fixture(scope="module")
def batch(digits):
    return digits.test.x[:48].clone(), digits.test.y[:48].clone()


def _run(attack, model, x, y, seed=0):
    if attack.name in RANDOMIZED_ONLY and not getattr(model, "randomized", False):
        model = Ensemble(list(model.members), "random", [0.5, 0.3, 0.2])
    return attack(model, x, y, ThreatModel("linf", EPS), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_ball_bounds_shape_and_inputs_untouched(name, mlp_ensemble, batch):
    x, y = batch
    x0, y0 = x.clone(), y.clone()
    adv = _run(_make(name), mlp_ensemble, x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype and adv.device == x.device
    assert not adv.requires_grad
    assert float((adv - x).abs().max()) <= EPS + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("train_mode", [False, True])
def test_model_parameters_and_mode_untouched(name, mlp_ensemble, batch, train_mode):
    model = copy.deepcopy(mlp_ensemble).train(train_mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    _run(_make(name), model, *batch)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_generator(name, mlp_ensemble, batch):
    a = _run(_make(name), mlp_ensemble, *batch, seed=3)
    b = _run(_make(name), mlp_ensemble, *batch, seed=3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_lowers_accuracy_of_weak_model(name, mlp_ensemble, batch):
    x, y = batch
    model = Ensemble(list(mlp_ensemble.members), "random", [0.5, 0.3, 0.2]) if name in RANDOMIZED_ONLY else mlp_ensemble
    adv = _run(_make(name), model, x, y)
    clean = expected_correct(model, x, y).mean()
    robust = expected_correct(model, adv, y).mean()
    assert robust < clean


@pytest.mark.parametrize("name", NAMES)
def test_eps_zero_is_identity(name, mlp_ensemble, batch):
    x, y = batch
    model = Ensemble(list(mlp_ensemble.members), "random") if name in RANDOMIZED_ONLY else mlp_ensemble
    adv = _make(name)(model, x, y, ThreatModel("linf", 0.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(adv, x)


@pytest.mark.parametrize("name", NAMES)
def test_rejects_mismatched_input_shape(name, mlp_ensemble, batch):
    x, y = batch
    with pytest.raises(PhalanxError, match="shape"):
        _make(name)(mlp_ensemble, x[:, :, :4], y, ThreatModel("linf", 0.1))


def test_bad_settings_raise_clear_errors():
    with pytest.raises(PhalanxError, match="unknown attack 'nope'"):
        create_attack("nope")
    with pytest.raises(PhalanxError, match="unknown loss 'hinge'"):
        create_attack("pgd", loss="hinge")
    with pytest.raises(PhalanxError, match="steps must be an integer >= 1, got 0"):
        create_attack("pgd", steps=0)
    with pytest.raises(PhalanxError, match="restarts must be an integer >= 1, got 0"):
        create_attack("pgd", restarts=0)
    with pytest.raises(PhalanxError, match="n_queries"):
        create_attack("signhunter", n_queries=0)
    with pytest.raises(PhalanxError, match="bad options for attack 'fgsm'"):
        create_attack("fgsm", wings=3)
    with pytest.raises(PhalanxError, match="eps must be >= 0"):
        ThreatModel("linf", -0.1)
    with pytest.raises(PhalanxError, match="exceeds the input range"):
        ThreatModel("linf", 1.5)


def test_cuda_if_available(mlp_ensemble, batch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = copy.deepcopy(mlp_ensemble).cuda()
    x, y = batch[0].cuda(), batch[1].cuda()
    for name in NAMES:
        adv = _run(_make(name), model, x, y)
        assert adv.device == x.device
