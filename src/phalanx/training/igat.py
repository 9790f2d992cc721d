"""iGAT: interactive global adversarial training (deng2023 sec. 5, eqs. 12-16), wrapping any
training method."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from phalanx.ensembles import Combiner, Ensemble, combine
from phalanx.errors import PhalanxError
from phalanx.training.adversarial import pgd_attack
from phalanx.training.base import METHODS, Batch, LossOutput, StepContext, TrainingMethod, create_method
from phalanx.training.common import (
    GENERATION_MODES,
    check_choice,
    check_nonneg,
    check_positive,
    check_steps,
    generation_mode,
)
from phalanx.training.regularizers import (
    igat_assign,
    igat_assigned_cross_entropy,
    igat_misclassification_regularizer,
)
from phalanx.types import Norm, ThreatModel

RULES = ("soft", "hard")
REDUCTIONS = ("per-member", "global")


@METHODS.register("igat", "iGAT(base): global PGD examples distributed to members + misclassification regularizer")
@dataclass
class IGAT(TrainingMethod):
    """iGAT eq. (16) on top of ``base`` (any registered method, built with ``base_options``)::

        L = L_base + alpha * sum_m E_{(x, y) in X~_m} CE(f_m(x), y) + beta * E L_R

    - Global adversarial examples ``X~`` (eq. 12): PGD against the ensemble combined with
      ``combiner`` (default: the ensemble's own; 'mean-prob' average or 'max-prob' max combiner).
    - Each example goes to one member (eq. 13 ``rule='hard'``, the most correct member; eq. 14
      ``rule='soft'``, roulette over ranks with weights 2^(M - rank)), drawn from the step's
      generator; only examples the ensemble misclassifies contribute, and the sum is divided by
      the number of adversarial examples (REFERENCE-FACTS 'iGAT'). As eq. (16), this term uses
      the adversarial examples only (the reference's ADP_1 script also feeds its clean half).
    - ``L_R`` (eq. 15) is ``-log(1 - clip(p, 0, 0.99))`` of the top non-true class on
      ensemble-misclassified examples of the clean and the adversarial examples
      (``(X, y) U (X~, y)``), per member and summed (``reduce='per-member'``, the reference's
      reg_type 0) or only the global maximum (``'global'``, eq. 15 literally).
    - ``split_batch`` (reference): the base method trains on the first half of the batch and the
      second half is attacked; ``False`` uses the whole batch for both (eq. 16 literally).
    - Use it from scratch or to fine-tune a trained ensemble (the paper fine-tunes).
    """

    name: ClassVar[str] = "igat"

    base: str = "baseline"  #: the wrapped method's registered name
    base_options: dict[str, Any] = field(default_factory=dict)  #: the wrapped method's options
    alpha: float = 5.0  #: global adversarial loss weight (deng2023 sec. 6.1: ADP, CLDL, DVERGE)
    beta: float = 10.0  #: misclassification regularizer weight (deng2023 sec. 6.1)
    rule: str = "soft"  #: distributing rule: 'soft' (eq. 14, the paper's choice) or 'hard' (eq. 13)
    combiner: str | None = None  #: combiner for PGD and the error mask; None = the ensemble's
    eps: float = 8 / 255  #: PGD radius (deng2023 sec. 6.1: 8/255 on CIFAR)
    steps: int = 20  #: PGD steps (iGAT arguments.py: adv_steps 20)
    step_size: float = 2 / 255  #: absolute PGD step (iGAT arguments.py: adv_alpha 2/255)
    clip: float = 0.99  #: probability clip in L_R (REFERENCE-FACTS)
    reduce: str = "per-member"  #: L_R reduction (REFERENCE-FACTS reg_type 0)
    split_batch: bool = True  #: half base / half adversarial (REFERENCE-FACTS)
    bounds: tuple[float, float] = (0.0, 1.0)
    generation: str = "train"  #: members' mode during PGD (the iGAT trainers call m.train() first)

    def __post_init__(self) -> None:
        if self.base == "igat":
            raise PhalanxError("igat cannot wrap itself; choose a base such as adp or dverge")
        if not isinstance(self.base_options, dict):
            raise PhalanxError(f"base_options must be a table of the base method's options, got {self.base_options!r}")
        self.base_method = create_method(self.base, **self.base_options)
        check_nonneg(alpha=self.alpha, beta=self.beta, eps=self.eps)
        check_positive(step_size=self.step_size)
        check_steps(steps=self.steps)
        check_choice("rule", self.rule, RULES)
        check_choice("reduce", self.reduce, REDUCTIONS)
        check_choice("generation", self.generation, GENERATION_MODES)
        if self.combiner is not None:
            self.combiner = Combiner.parse(self.combiner).value
        if not 0 < self.clip < 1:
            raise PhalanxError(f"clip must be in (0, 1), got {self.clip!r}")
        self.bounds = (float(self.bounds[0]), float(self.bounds[1]))
        # the loop reads these from the instance: a DVERGE base needs its target batch
        setattr(self, "needs_target_batch", self.base_method.needs_target_batch)  # noqa: B010
        setattr(self, "generation_mode", self.generation)  # noqa: B010

    def describe(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "base_options"}
        return {"name": self.name, **d, "base_method": self.base_method.describe()}

    def start_epoch(self, ensemble: Ensemble, ctx: StepContext) -> None:
        self.base_method.start_epoch(ensemble, ctx)

    def loss(self, ensemble: Ensemble, batch: Batch, ctx: StepContext) -> LossOutput:
        b = batch.x.shape[0]
        if self.split_batch and b >= 2:
            half = b // 2
            base_batch = Batch(batch.x[:half], batch.y[:half],
                               None if batch.x_target is None else batch.x_target[:half],
                               None if batch.y_target is None else batch.y_target[:half])
            x_adv_src, y_adv = batch.x[half:], batch.y[half:]
        else:
            base_batch, x_adv_src, y_adv = batch, batch.x, batch.y
        base_out = self.base_method.loss(ensemble, base_batch, ctx)
        metrics = {f"base_{k}": v for k, v in base_out.metrics.items()}
        metrics["base_loss"] = base_out.loss.detach()
        comb = Combiner.parse(self.combiner) if self.combiner is not None else ensemble.combiner
        attacked = Ensemble(list(ensemble.members), comb)  # a view sharing the members
        threat = ThreatModel(Norm.LINF, self.eps, self.bounds)
        with generation_mode(ensemble, self.generation):
            x_adv = pgd_attack(self.eps, self.steps, self.step_size)(attacked, x_adv_src, y_adv, threat,
                                                                      generator=ctx.generator)
        # one forward pass on [clean base examples; adversarial examples]
        x_all = torch.cat([base_batch.x, x_adv])
        y_all = torch.cat([base_batch.y, y_adv])
        z = ensemble.member_logits(x_all)
        probs = torch.softmax(z, -1)
        with torch.no_grad():
            wrong = combine(z.detach(), comb).argmax(-1) != y_all
        n0 = base_batch.x.shape[0]
        z_adv, wrong_adv = z[:, n0:], wrong[n0:]
        sel = igat_assign(probs[:, n0:].gather(-1, y_adv.view(1, -1, 1).expand(len(ensemble), -1, 1)).squeeze(-1),
                          self.rule, ctx.generator)
        adv_ce = igat_assigned_cross_entropy(z_adv, y_adv, sel, wrong_adv)
        reg = igat_misclassification_regularizer(probs, y_all, wrong, clip=self.clip, reduce=self.reduce).mean()
        loss = base_out.loss + self.alpha * adv_ce + self.beta * reg
        metrics.update({"igat_adv_ce": adv_ce.detach(), "igat_reg": reg.detach(),
                        "igat_adv_error": wrong_adv.float().mean()})
        return LossOutput(loss, metrics)
