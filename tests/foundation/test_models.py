from __future__ import annotations

import pytest
import torch

from phalanx.errors import PhalanxError
from phalanx.models import MODELS, create_model

SHAPES = {"mlp": (1, 8, 8), "small-cnn": (1, 8, 8), "lenet5": (1, 28, 28), "mnist-convnet": (1, 28, 28),
          "resnet20": (3, 32, 32)}


def test_registry_covers_all_models():
    assert set(SHAPES) == set(MODELS.names())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_features_every_layer(name):
    torch.manual_seed(0)
    m = create_model(name, SHAPES[name], 10).eval()
    x = torch.rand(3, *SHAPES[name])
    with torch.no_grad():
        logits = m(x)
        assert logits.shape == (3, 10)
        for layer in range(1, m.num_feature_layers + 1):
            f = m.features(x, layer)
            assert f.shape[0] == 3 and torch.isfinite(f).all()
        assert torch.allclose(m.features(x, m.num_feature_layers), logits)
        # pre-activation: hidden features take negative values (they are not post-ReLU)
        assert (m.features(x, 1) < 0).any()
    for bad in (0, m.num_feature_layers + 1):
        with pytest.raises(PhalanxError, match="out of range"):
            m.features(x, bad)


def test_resnet20_has_dverge_layer_numbering():
    m = create_model("resnet20", (3, 32, 32), 10)
    assert m.num_feature_layers == 20
    x = torch.rand(2, 3, 32, 32)
    assert m.features(x, 1).shape == (2, 16, 32, 32)  # conv1 + BN
    assert m.features(x, 8).shape == (2, 32, 16, 16)  # first half-block of stage 2
    assert m.features(x, 19).shape == (2, 64, 8, 8)


def test_lenet5_is_lecun_shaped():
    m = create_model("lenet5", (1, 28, 28), 10)
    convs = [mod for mod in m.body if isinstance(mod, torch.nn.Conv2d)]
    fcs = [mod for mod in m.body if isinstance(mod, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [6, 16]
    assert [f.out_features for f in fcs] == [120, 84, 10]
    conv = create_model("mnist-convnet", (1, 28, 28), 10)
    assert [f.out_features for f in conv.body if isinstance(f, torch.nn.Linear)] == [500, 10]
    assert next(f.in_features for f in conv.body if isinstance(f, torch.nn.Linear)) == 800


def test_normalization_inside_model():
    m = create_model("mlp", (1, 8, 8), 10, mean=[0.3], std=[0.5])
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(m(x), m.body((x - 0.3) / 0.5))


def test_leaky_relu_activation():
    m = create_model("mlp", (1, 8, 8), 10, widths=[5], activation="leaky_relu")
    assert any(isinstance(mod, torch.nn.LeakyReLU) for mod in m.body)
    with pytest.raises(PhalanxError, match="accepted: relu, leaky_relu"):
        create_model("mlp", (1, 8, 8), 10, activation="gelu")


def test_bad_model_options():
    with pytest.raises(PhalanxError, match="no option 'depth'"):
        create_model("mlp", (1, 8, 8), 10, depth=3)
    with pytest.raises(PhalanxError, match="too small"):
        create_model("lenet5", (1, 8, 8), 10)
