"""FeatureNet's in-place ReLUs and residual sums: bit-identical to the same layers run out of place
(outputs, feature taps, input and parameter gradients, BatchNorm running statistics), and the
module path kept wherever in place would be unsafe (hooks, a ReLU swapped for another module)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from phalanx import create_model
from phalanx.models import ResidualBlock

ARCHS = [("resnet20", (3, 16, 16), {"width": 4}), ("lenet5", (1, 28, 28), {}), ("mlp", (1, 6, 6), {})]


def _out_of_place(model: nn.Module, x: Tensor) -> Tensor:
    """The same layers, every operation producing a new tensor (no relu_, no add_)."""
    h = model.normalize(x)
    for m in model.body:
        if isinstance(m, ResidualBlock):
            h = m.bn2(m.conv2(torch.relu(m.bn1(m.conv1(h))))) + m.shortcut(h)
        elif isinstance(m, nn.ReLU):
            h = torch.relu(h)
        else:
            h = m(h)
    return h


def _grads(model: nn.Module, x: Tensor, out: Tensor) -> tuple[Tensor, list[Tensor]]:
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    gx, *gp = torch.autograd.grad(loss, [x, *model.parameters()])
    return gx, gp


@pytest.mark.parametrize(("name", "shape", "kw"), ARCHS)
def test_in_place_path_is_bit_identical_to_out_of_place(name: str, shape: tuple[int, ...], kw: dict) -> None:
    torch.manual_seed(0)
    a = create_model(name, shape, 10, **kw).train()
    b = copy.deepcopy(a)
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    za, zb = a(xa), _out_of_place(b, xb)
    assert torch.equal(za, zb)
    (gxa, gpa), (gxb, gpb) = _grads(a, xa, za), _grads(b, xb, zb)
    assert torch.equal(gxa, gxb) and all(torch.equal(p, q) for p, q in zip(gpa, gpb, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(a.buffers(), b.buffers(), strict=True))  # running stats
    assert torch.equal(x, xa.detach())  # the caller's input is never overwritten


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_feature_taps_match_out_of_place(mode: str) -> None:
    torch.manual_seed(0)
    m = getattr(create_model("resnet20", (3, 16, 16), 10, width=4), mode)()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # train mode: batch statistics, so the values do not depend on earlier calls
        # the block outputs (even layers) and the stem (layer 1) recomputed out of place
        h = m.normalize(x)
        ref = {}
        layer = 0
        for i, mod in enumerate(m.body):
            if isinstance(mod, ResidualBlock):
                ref[layer + 1] = mod.bn1(mod.conv1(h))
                h = mod.bn2(mod.conv2(torch.relu(ref[layer + 1]))) + mod.shortcut(h)
                ref[layer + 2] = h
                layer += 2
            elif isinstance(mod, nn.BatchNorm2d) and i == 1:
                h = mod(h)
                ref[1] = h
                layer = 1
            elif isinstance(mod, nn.ReLU):
                h = torch.relu(h)
            else:
                h = mod(h)
        ref[m.num_feature_layers] = h
        assert len(ref) == m.num_feature_layers == 20
        for layer, want in ref.items():
            assert torch.equal(m.features(x, layer), want), layer
        # taps are pre-activation: a later in-place ReLU must not have clamped them
        assert float(m.features(x, 1).min()) < 0 and float(m.features(x, 2).min()) < 0


def test_hooks_and_swapped_activations_take_the_module_path() -> None:
    torch.manual_seed(0)
    m = create_model("lenet5", (1, 28, 28), 10).eval()
    x = torch.rand(2, 1, 28, 28)
    kept: list[Tensor] = []
    conv = m.body[0]
    handle = conv.register_forward_hook(lambda _m, _i, out: kept.append(out))
    with torch.no_grad():
        m(x)
    handle.remove()
    assert float(kept[0].min()) < 0  # the hooked module's output was not overwritten by the ReLU
    for i, mod in enumerate(m.body):  # e.g. the falsifier's ReLU -> LeakyReLU copy
        if isinstance(mod, nn.ReLU):
            m.body[i] = nn.LeakyReLU(0.5)
    with torch.no_grad():
        h = m.normalize(x)
        for mod in m.body:
            h = mod(h)
        assert torch.equal(m(x), h)


def test_a_hook_on_a_blocks_batchnorm_sees_its_output_unclamped() -> None:
    torch.manual_seed(0)
    m = create_model("resnet20", (3, 16, 16), 10, width=4).train()
    block = next(mod for mod in m.body if isinstance(mod, ResidualBlock))
    kept: list[Tensor] = []
    block.bn1.register_forward_hook(lambda _m, _i, out: kept.append(out))
    m(torch.rand(4, 3, 16, 16))
    assert float(kept[0].detach().min()) < 0  # batch-normalised: about half negative, not clamped at 0
