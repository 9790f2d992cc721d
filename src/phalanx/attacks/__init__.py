"""Attacks: one gradient loop (FGSM, R-FGSM, BIM, PGD, MIM) and a registry."""

from phalanx.attacks.base import ATTACKS, Attack, create_attack
from phalanx.attacks.gradient import GradientAttack, bim, fgsm, mim, pgd, rfgsm
from phalanx.attacks.losses import LOSSES, attack_loss, ce_loss, cw_margin_loss
from phalanx.attacks.projection import project, random_start

__all__ = ["ATTACKS", "LOSSES", "Attack", "GradientAttack", "attack_loss", "bim", "ce_loss",
           "create_attack", "cw_margin_loss", "fgsm", "mim", "pgd", "project", "random_start", "rfgsm"]
