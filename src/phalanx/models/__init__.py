"""Models: a registry of classifiers with input normalization and pre-activation feature taps."""

from phalanx.models.base import (
    ACTIVATIONS,
    DEFAULT_MEMORY_FORMAT,
    MEMORY_FORMATS,
    FeatureNet,
    Normalize,
    ResidualBlock,
    make_activation,
    memory_format_of,
    set_memory_format,
)
from phalanx.models.zoo import MODELS, build_model, create_model

__all__ = ["ACTIVATIONS", "DEFAULT_MEMORY_FORMAT", "MEMORY_FORMATS", "MODELS", "FeatureNet", "Normalize",
           "ResidualBlock", "build_model", "create_model", "make_activation", "memory_format_of", "set_memory_format"]
