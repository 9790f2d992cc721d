"""Small networks covering every supported layer, shared by the verification tests."""

from __future__ import annotations

import torch
from torch import nn

from phalanx.models.base import FeatureNet, Normalize, ResidualBlock


def _net(body: list[nn.Module], shape: tuple[int, int, int], seed: int) -> FeatureNet:
    torch.manual_seed(seed)
    c = shape[0]
    net = FeatureNet(Normalize([0.3] * c, [0.7] * c), nn.Sequential(*body), {"in_shape": list(shape), "num_classes": 4})
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
            m.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


ARCHS = {
    "linear-relu": lambda s: _net([nn.Flatten(), nn.Linear(2 * 6 * 6, 12), nn.ReLU(), nn.Linear(12, 4)], (2, 6, 6), s),
    "leaky": lambda s: _net([nn.Flatten(), nn.Linear(72, 10), nn.LeakyReLU(0.1), nn.Linear(10, 4)], (2, 6, 6), s),
    "conv-bn-maxpool": lambda s: _net([nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                                       nn.Flatten(), nn.Linear(27, 4)], (2, 6, 6), s),
    "conv-avgpool": lambda s: _net([nn.Conv2d(2, 3, 3, stride=1), nn.LeakyReLU(0.2), nn.AvgPool2d(2), nn.Flatten(),
                                    nn.Linear(12, 4)], (2, 6, 6), s),
    "maxpool-padded": lambda s: _net([nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
                                      nn.Flatten(), nn.Linear(18, 4)], (2, 6, 6), s),
    "residual": lambda s: _net([nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), ResidualBlock(3, 3, 1, "relu", 0.0),
                                nn.ReLU(), ResidualBlock(3, 4, 2, "leaky_relu", 0.1), nn.ReLU(), nn.Flatten(),
                                nn.Linear(36, 4)], (2, 6, 6), s),
}



def toy_network() -> nn.Sequential:
    """Amir et al. fig. 1: input [1, -5] gives V2 = [-8, 1], V3 = [0, 1], V4 = [6, 3]. The figure's
    weights are not in the text; these reproduce every value it states."""
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(  # type: ignore[operator]
            torch.tensor([[2.0, 2.0], [1.0, 0.0]]))
        net[2].weight.copy_(  # type: ignore[operator]
            torch.tensor([[1.0, 6.0], [2.0, 3.0]]))
    return net
