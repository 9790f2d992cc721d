"""Evaluation: clean accuracy, robust-accuracy curves, white-box, black-box transfer,
transferability and diversity protocols, sanity checks and decision regions."""

from phalanx.evaluation.card import card_attacks, robustness_card
from phalanx.evaluation.clean import evaluate_clean, model_device
from phalanx.evaluation.decision import adversarial_direction, decision_regions
from phalanx.evaluation.robustness import CurvePoint, robust_accuracy_curve, robust_correct
from phalanx.evaluation.sanity import (
    SanityCheck,
    check_blackbox_vs_whitebox,
    check_convergence,
    check_single_vs_multi,
    gradient_sanity_checks,
)
from phalanx.evaluation.transfer import (
    generate_transfer_sets,
    load_surrogates,
    load_transfer_sets,
    score_transfer_sets,
    transfer_attacks,
)
from phalanx.evaluation.transferability import correct_by_all, diversity_matrix, transferability_matrix
from phalanx.evaluation.whitebox import describe_attack, whitebox_evaluation

__all__ = ["card_attacks", "robustness_card", "CurvePoint", "SanityCheck", "adversarial_direction", "check_blackbox_vs_whitebox", "check_convergence",
           "check_single_vs_multi", "correct_by_all", "decision_regions", "describe_attack", "diversity_matrix",
           "evaluate_clean", "generate_transfer_sets", "gradient_sanity_checks", "load_surrogates", "load_transfer_sets", "model_device",
           "robust_accuracy_curve", "robust_correct", "score_transfer_sets", "transfer_attacks",
           "transferability_matrix", "whitebox_evaluation"]
