"""Attacks: one gradient loop (FGSM, R-FGSM, BIM, PGD, MIM, M-DI2-FGSM, SGM, joint G.A. 1-3,
EOT-PGD), feature distillation, AutoAttack (and EOT-APGD), MORA for ensembles, ARC for randomized
ensembles, Square, SignHunter, and a registry.

Every public name here is the object it names (``autoattack`` is the AutoAttack factory; the
module holding it is :mod:`phalanx.attacks.parameter_free`): no submodule shares a public name."""

from phalanx.attacks.base import ATTACKS, Attack, check_inputs, configure_attack, create_attack
from phalanx.attacks.distillation import DistillationAttack, feature_distillation
from phalanx.attacks.gradient import (
    GradientAttack,
    ascend,
    bim,
    eot_pgd,
    fgsm,
    ga1,
    ga2,
    ga3,
    mdi2fgsm,
    member_logits_of,
    mim,
    mpgd,
    pgd,
    rfgsm,
    sgm,
)
from phalanx.attacks.losses import (
    ALL_LOSSES,
    LOSSES,
    attack_loss,
    ce_loss,
    cw_margin_loss,
    dlr_loss,
    dlr_targeted_loss,
    elu_regulator,
    joint_margins,
)
from phalanx.attacks.parameter_free import (
    AutoAttack,
    apgd,
    apgd_ce,
    apgd_t,
    autoattack,
    fab_t,
    fab_targeted,
    output_kind,
)
from phalanx.attacks.projection import project, random_start
from phalanx.attacks.query import SignHunterAttack, signhunter, square_attack
from phalanx.attacks.randomized import ArcAttack, arc, expected_loss, is_randomized
from phalanx.attacks.reweighing import MoraAttack, mora
from phalanx.attacks.transforms import input_diversity, skip_gradient

__all__ = ["ALL_LOSSES", "ATTACKS", "LOSSES", "ArcAttack", "Attack", "AutoAttack", "MoraAttack", "arc", "eot_pgd",
           "expected_loss", "is_randomized", "mora", "SignHunterAttack", "apgd", "apgd_ce", "apgd_t",
           "autoattack", "fab_t", "fab_targeted",
           "output_kind", "signhunter", "square_attack", "DistillationAttack", "GradientAttack", "ascend",
           "attack_loss", "bim", "ce_loss", "check_inputs", "configure_attack", "create_attack", "cw_margin_loss", "dlr_loss",
           "dlr_targeted_loss", "elu_regulator", "feature_distillation", "fgsm", "ga1", "ga2", "ga3",
           "input_diversity", "joint_margins", "mdi2fgsm", "member_logits_of", "mim", "mpgd", "pgd", "project",
           "random_start", "rfgsm", "sgm", "skip_gradient"]
