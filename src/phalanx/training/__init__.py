"""Training: one loop (``fit``) and pluggable training methods."""

from phalanx.training import baseline as _baseline  # noqa: F401  (registers the method)
from phalanx.training.base import (
    METHODS,
    Batch,
    LossOutput,
    StepContext,
    TrainingMethod,
    create_method,
)
from phalanx.training.baseline import Baseline, member_cross_entropy
from phalanx.training.loop import (
    FitResult,
    TrainConfig,
    epoch_generator,
    evaluate_clean,
    fit,
    resolve_device,
)

__all__ = ["METHODS", "Baseline", "Batch", "FitResult", "LossOutput", "StepContext", "TrainConfig",
           "TrainingMethod", "create_method", "epoch_generator", "evaluate_clean", "fit",
           "member_cross_entropy", "resolve_device"]
