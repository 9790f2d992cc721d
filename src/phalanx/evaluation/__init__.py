"""Evaluation: clean accuracy, member agreement, robust-accuracy curves."""

from phalanx.evaluation.clean import evaluate_clean, model_device
from phalanx.evaluation.robustness import CurvePoint, robust_accuracy_curve, robust_correct

__all__ = ["CurvePoint", "evaluate_clean", "model_device", "robust_accuracy_curve", "robust_correct"]
