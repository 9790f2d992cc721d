"""The inference view that attacks differentiate: BatchNorm folded, activations after max-pooling;
the same function and gradients, the model untouched."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from phalanx.attacks import GradientAttack, create_attack
from phalanx.attacks.base import prepare
from phalanx.ensembles import Ensemble
from phalanx.models import create_model
from phalanx.models.inference import fold_batchnorm, inference_view
from phalanx.types import Norm, ThreatModel


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters (fresh ones make BatchNorm the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def _resnet_ensemble() -> Ensemble:
    torch.manual_seed(0)
    return _randomize_bn(Ensemble([create_model("resnet20", (3, 32, 32), 10) for _ in range(2)])).eval()


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(nn.functional.cross_entropy(model(a), y), a)
    return g


def test_fold_batchnorm_by_hand() -> None:
    # one output channel: bn(w h + b) = gamma (w h + b - mu) / sqrt(var + eps) + beta
    w, b = torch.tensor([[2.0, -1.0]]), torch.tensor([0.5])
    mu, var, eps, gamma, beta = torch.tensor([1.5]), torch.tensor([3.0]), 1.0, torch.tensor([4.0]), torch.tensor([0.25])
    fw, fb = fold_batchnorm(w, b, mu, var, eps, gamma, beta)
    # s = 4 / sqrt(4) = 2: w' = (4, -2), b' = 2 (0.5 - 1.5) + 0.25 = -1.75
    assert torch.equal(fw, torch.tensor([[4.0, -2.0]])) and torch.equal(fb, torch.tensor([-1.75]))
    # no bias, no affine: s = 1 / sqrt(3 + 1) = 0.5, b' = -mu s
    fw, fb = fold_batchnorm(w, None, mu, var, eps, None, None)
    assert torch.equal(fw, torch.tensor([[1.0, -0.5]])) and torch.equal(fb, torch.tensor([-0.75]))


def test_resnet_view_folds_every_batchnorm_and_computes_the_same_function() -> None:
    ens = _resnet_ensemble()
    before = {k: v.clone() for k, v in ens.state_dict().items()}
    view = inference_view(ens)
    assert view is not ens
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in view.modules())
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ens.modules()) == 2 * 21  # untouched
    # the view's tensors are the model's own or frozen folded copies: nothing of it can be trained
    own = {id(p) for p in ens.parameters()}
    assert all(id(p) in own or not p.requires_grad for p in view.parameters())
    # folded weights keep the model's memory format
    convs = [m for m in view.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs if m.in_channels > 1)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        assert torch.allclose(view(x), ens(x), atol=1e-5, rtol=1e-5)
    # in float64 folding is exact up to double rounding: outputs and input gradients agree to ~1e-12
    ens64, x64 = ens.double(), x.double()
    view64 = inference_view(ens64)
    with torch.no_grad():
        assert torch.allclose(view64(x64), ens64(x64), atol=1e-12, rtol=0)
    g, gv = _input_grad(ens64, x64, y), _input_grad(view64, x64, y)
    assert float(g.abs().max()) > 1e-6
    assert torch.allclose(gv, g, atol=1e-12 * float(g.abs().max()) * 100, rtol=0)
    for k, v in ens.state_dict().items():  # the model itself is untouched (values; dtype changed above)
        assert torch.equal(v.to(before[k].dtype), before[k]), k
    assert not ens.training  # (its 42 BatchNorm modules are counted above)


def test_feature_taps_keep_their_meaning_in_the_view() -> None:
    ens = _resnet_ensemble().double()
    net = ens.members[0]
    view = inference_view(net)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for layer in range(1, net.num_feature_layers + 1):
            assert torch.allclose(view.features(x, layer), net.features(x, layer), atol=1e-10, rtol=0), layer


def test_lenet_view_moves_activations_after_pooling_bit_for_bit() -> None:
    torch.manual_seed(0)
    for act in ("relu", "leaky_relu"):
        net = create_model("lenet5", (1, 28, 28), 10, activation=act).eval()
        view = inference_view(net)
        kinds = [type(m).__name__ for m in view.body[:6]]
        assert kinds[1] == "MaxPool2d" and kinds[2] in ("ReLU", "LeakyReLU"), kinds
        x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
        y = torch.arange(6)
        with torch.no_grad():
            assert torch.equal(view(x), net(x))
        assert torch.equal(_input_grad(view, x, y), _input_grad(net, x, y))
        assert [type(m).__name__ for m in net.body[:3]][1] != "MaxPool2d"  # the model's own order kept


def test_no_view_in_train_mode_with_hooks_or_with_nothing_to_rewrite() -> None:
    ens = _resnet_ensemble()
    ens.members[1].train()  # one member in train mode: BatchNorm uses batch statistics
    assert inference_view(ens) is ens
    ens.eval()
    handle = ens.members[0].body[0].register_forward_hook(lambda *a: None)
    assert inference_view(ens) is ens
    handle.remove()
    assert inference_view(ens) is not ens
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    assert inference_view(mlp) is mlp
    with warnings.catch_warnings():  # torch.jit is deprecated, yet users still hold scripted models
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval())
    assert inference_view(scripted) is scripted
    # a view of a view has nothing left to rewrite
    view = inference_view(ens)
    assert inference_view(view) is view


def test_contiguous_layout_keeps_batchnorm_but_still_swaps() -> None:
    torch.manual_seed(0)
    net = _randomize_bn(create_model("resnet20", (3, 32, 32), 10, memory_format="contiguous")).eval()
    assert inference_view(net) is net  # the user asked for reference arithmetic: no folding
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()).eval()
    cnn.to(memory_format=torch.contiguous_format)
    view = inference_view(cnn)
    assert [type(m).__name__ for m in view] == ["Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU", "Flatten"]


def test_linear_batchnorm_folds_and_attacks_use_the_view() -> None:
    torch.manual_seed(0)
    mlp = _randomize_bn(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                      nn.Linear(8, 3))).eval().double()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1])
    view = prepare(mlp, x, y)
    assert [type(m).__name__ for m in view] == ["Flatten", "Identity", "Linear", "ReLU", "Linear"]
    with torch.no_grad():
        assert torch.allclose(view(x), mlp(x), atol=1e-12, rtol=0)
    # PGD on the model equals, to the bit in float64 here, PGD written out on the unfolded model
    th = ThreatModel(Norm.LINF, 0.1)
    adv = GradientAttack(steps=5, step_size=0.25)(mlp, x, y, th, generator=torch.Generator().manual_seed(4))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    ref = (x + (2 * u - 1) * 0.1).clamp(0, 1)
    for _ in range(5):
        g = _input_grad(mlp, ref, y)
        ref = (x + (ref + 0.025 * g.sign() - x).clamp(-0.1, 0.1)).clamp(0, 1)
    assert torch.allclose(adv, ref, atol=1e-12, rtol=0)
    assert float((adv - x).abs().max()) <= 0.1 + 1e-12
    # and every attack leaves the model in eval mode with its BatchNorm in place
    create_attack("apgd-ce", n_iter=3)(mlp, x, y, th)
    assert isinstance(mlp[2], nn.BatchNorm1d) and not mlp.training
