"""Models: a registry of classifiers with input normalization and pre-activation feature taps."""

from phalanx.models.base import ACTIVATIONS, FeatureNet, Normalize, ResidualBlock, make_activation
from phalanx.models.zoo import MODELS, build_model, create_model

__all__ = ["ACTIVATIONS", "MODELS", "FeatureNet", "Normalize", "ResidualBlock", "build_model",
           "create_model", "make_activation"]
