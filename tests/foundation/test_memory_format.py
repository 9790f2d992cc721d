"""Channels-last memory format: the default for convolutional members, a setting, and results
that agree with NCHW at rounding level (outputs, input gradients, parameter gradients, attacks)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from phalanx import Ensemble, create_model
from phalanx.attacks import create_attack
from phalanx.errors import PhalanxError
from phalanx.models import build_model, memory_format_of, set_memory_format
from phalanx.types import Norm, ThreatModel

ARCHS = [("lenet5", (1, 28, 28)), ("resnet20", (3, 32, 32))]


def _pair(name: str, shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    cl = create_model(name, shape, 10, **({"width": 4} if name == "resnet20" else {}))
    nchw = set_memory_format(copy.deepcopy(cl), "contiguous")
    return cl, nchw


def test_default_is_channels_last_and_the_setting_is_honoured() -> None:
    m = create_model("lenet5", (1, 28, 28), 10)
    assert memory_format_of(m) == "channels_last"
    conv = [c for c in m.modules() if isinstance(c, nn.Conv2d)][1]  # the first has 1 input channel
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    c = create_model("lenet5", (1, 28, 28), 10, memory_format="contiguous")
    assert memory_format_of(c) == "contiguous" and c.config["memory_format"] == "contiguous"
    assert all(p.is_contiguous() for p in c.parameters())
    # a checkpoint's config rebuilds the same layout; the default is not written into the config
    assert memory_format_of(build_model(c.config)) == "contiguous"
    assert "memory_format" not in m.config and memory_format_of(build_model(m.config)) == "channels_last"
    # activations flow in channels-last through the body (converted once, by the weights)
    h = m.body[0](m.normalize(torch.rand(2, 1, 28, 28)))
    assert h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    assert memory_format_of(create_model("mlp", (1, 4, 4), 3)) is None  # nothing to convert


def test_bad_memory_format_is_rejected() -> None:
    with pytest.raises(PhalanxError, match="unknown memory_format 'nhwc'; accepted: channels_last, contiguous"):
        create_model("lenet5", (1, 28, 28), 10, memory_format="nhwc")
    with pytest.raises(PhalanxError, match="accepted"):
        set_memory_format(nn.Conv2d(1, 1, 3), "fast")


@pytest.mark.parametrize(("name", "shape"), ARCHS)
def test_outputs_and_gradients_agree_between_formats(name: str, shape: tuple[int, ...]) -> None:
    cl, nchw = _pair(name, shape)
    x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 10
    for mode in ("train", "eval"):
        getattr(cl, mode)()
        getattr(nchw, mode)()
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        la = nn.functional.cross_entropy(cl(xa), y)
        lb = nn.functional.cross_entropy(nchw(xb), y)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
        ga = torch.autograd.grad(la, [xa, *cl.parameters()])
        gb = torch.autograd.grad(lb, [xb, *nchw.parameters()])
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # BatchNorm running statistics were updated identically in train mode
    for a, b in zip(cl.buffers(), nchw.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_attack_agrees_between_formats() -> None:
    cl, nchw = _pair("lenet5", (1, 28, 28))
    ens_cl, ens_nchw = Ensemble([cl]).eval(), Ensemble([nchw]).eval()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.arange(4)
    atk = create_attack("pgd", steps=3)
    th = ThreatModel(Norm.LINF, 0.1)
    a = atk(ens_cl, x, y, th, generator=torch.Generator().manual_seed(0))
    b = atk(ens_nchw, x, y, th, generator=torch.Generator().manual_seed(0))
    # the same steps up to sign flips of gradients that are zero at rounding level
    assert float((a - b).abs().gt(1e-6).float().mean()) < 0.01
    assert float((a - x).abs().max()) <= 0.1 + 1e-6
