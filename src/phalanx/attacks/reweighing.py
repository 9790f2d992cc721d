"""MORA, the model-reweighing attack on ensembles (Yu, Gao and Xu, NeurIPS 2022, "MORA:
Improving Ensemble Robustness Evaluation with Model-Reweighing Attack"; reference code
``lafeat/mora``, ``mora_attack.py`` and ``scripts/evaluation.sh``).

Attacks on an ensemble's averaged output follow the gradient of whichever member dominates the
average (a member with large logits, or one that is already fooled) and stall on the others.
MORA replaces the ensemble output in the loss by a mix of the margin-normalised ensemble output
and a *reweighted* average of the members' rescaled logits, where each member's weight is
computed from its probabilities and the members already fooled are dropped (softmax and voting
modes):

``L = (1 - s) * o / gap(o) + s * sum_m w_m c_m z_m / S / (1e-8 + sum_m w_m c_m)``

with ``o`` the ensemble output, ``gap(o)`` its top-1 minus top-2 value, ``z_m`` member logits,
``S = max(1, max_m gap(z_m) / 10)``, ``c_m`` = member m still correct (all 1 in logits mode),
and ``w_m`` :func:`member_weights`. The cross-entropy of ``L`` is ascended with a cosine step
decay from ``2 eps`` and APGD's heavy-ball momentum (0.75), on :func:`ascend`. The published
evaluation ("standard-t-pre") runs five untargeted passes with ``s`` = 0.5, 0, 0.25, 0.75, 1
and then a targeted cross-entropy pass against each of the 9 next most likely classes, each on
the examples still robust; 100 iterations each, ``float_dis`` 0.2 (softmax), 0.8 (voting),
0.0 (logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phalanx.attacks.base import ATTACKS, Attack, prepare
from phalanx.attacks.gradient import ascend, member_logits_of
from phalanx.attacks.projection import apgd_start
from phalanx.errors import PhalanxError
from phalanx.types import ThreatModel

MODES = ("softmax", "voting", "logits")
#: the reference's defaults per mode (scripts/evaluation.sh)
FLOAT_DIS = {"softmax": 0.2, "voting": 0.8, "logits": 0.0}
#: reference sequence of model-reweighing strengths ('mora-ce-5', '-0.0', '-2.5', '-7.5', '-10')
SCALES = (0.5, 0.0, 0.25, 0.75, 1.0)
SCHEDULES = ("cosine", "linear", "cos", "constant")


def mode_of(model: nn.Module) -> str:
    """MORA's ensemble mode for a phalanx ensemble's combiner; errors on what MORA cannot attack."""
    members = getattr(model, "members", None)
    if members is None or len(members) < 2:
        n = 1 if members is None else len(members)
        raise PhalanxError(f"MORA attacks ensembles of at least 2 members, got a model with {n}; "
                           "for a single model use pgd or autoattack")
    comb = getattr(model, "combiner", None)
    value = getattr(comb, "value", str(comb))
    if value == "random":
        raise PhalanxError("MORA attacks deterministic combiners (mean-prob, max-prob, mean-logits, vote*); "
                           "for a randomized ensemble use arc or eot-pgd")
    if value.startswith("vote"):
        return "voting"
    return "logits" if value == "mean-logits" else "softmax"


def surrogate_outputs(member_logits: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """The reference ensemble wrappers' two outputs ``(o_scale, o_pred)`` (models/ensemble_*.py):
    softmax: both ``log mean softmax(z_m)``; logits: both ``mean z_m``; voting: the soft votes
    ``log mean softmax(z_m * k / gap_m)`` with ``k = 1`` and ``k = 10`` (gap detached)."""
    if mode == "logits":
        o = member_logits.mean(0)
        return o, o
    if mode == "softmax":
        o = torch.logsumexp(torch.log_softmax(member_logits, -1), 0) - math.log(member_logits.shape[0])
        return o, o
    from phalanx.ensembles import soft_vote

    return (torch.log(soft_vote(member_logits, 1.0).clamp_min(1e-40)),
            torch.log(soft_vote(member_logits, 10.0).clamp_min(1e-40)))


def _gap(t: Tensor) -> Tensor:
    top = t.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def member_weights(ens_prob: Tensor, member_prob: Tensor, y: Tensor) -> Tensor:
    """MORA's model weights (reference ``get_probablity_weight``), (M, B) from the ensemble's
    probabilities (B, K) and each member's probabilities (M, B, K), all detached:
    ``w_m = p~_m (p_m[y] / e[y] + (1 - p~_m) / e~)`` where, with ``j1, j2`` the ensemble's top
    two classes, ``p~_m = p_m[j1]`` if ``j1 != y`` else ``-p_m[j2]`` (likewise ``e~`` from ``e``)."""
    srt = ens_prob.sort(-1, descending=True).indices
    top_is_y = (srt[:, 0] == y).to(ens_prob.dtype)
    j1, j2 = srt[:, 0], srt[:, 1]

    def pick(t: Tensor, j: Tensor) -> Tensor:
        return t.gather(-1, j.expand(t.shape[:-1])[..., None]).squeeze(-1)

    p_other = pick(member_prob, j1) * (1 - top_is_y) - pick(member_prob, j2) * top_is_y
    e_other = pick(ens_prob, j1) * (1 - top_is_y) - pick(ens_prob, j2) * top_is_y
    return p_other * (pick(member_prob, y) / pick(ens_prob, y) + (1 - p_other) / e_other)


def mora_logits(member_logits: Tensor, y: Tensor, mode: str, scale: float, float_dis: float) -> Tensor:
    """The reweighted output whose cross-entropy MORA ascends (module docstring), (B, K).

    As the reference: the member-logit rescaling ``S`` is ``max_m gap(z_m) / 10`` where that
    exceeds 10 (else 1); the ensemble probabilities in the weights average the rescaled members'
    softmaxes *except the last one* and divide by M (``range(sub_output - 1)`` in
    ``mora_attack.py``); member probabilities use ``softmax(float_dis * z_m)``."""
    m = member_logits.shape[0]
    o_scale, _ = surrogate_outputs(member_logits, mode)
    z = member_logits
    zd = z.detach()
    big = _gap(zd).amax(0)  # (B,)
    rescale = torch.where(big > 10.0, big / 10.0, torch.ones_like(big))[None, :, None]
    zs = z / rescale
    ens = torch.softmax(zd[: m - 1] / rescale, dim=-1).sum(0) / m
    w = member_weights(ens, torch.softmax(float_dis * zd, dim=-1), y)  # (M, B)
    if mode != "logits":
        w = w * (zs.detach().argmax(-1) == y).to(w.dtype)
    mixed = (zs * w[..., None]).sum(0) / (1e-8 + w.sum(0))[:, None]
    first = o_scale / _gap(o_scale.detach()).clamp_min(1e-12)[:, None]
    return (1 - scale) * first + scale * mixed


def step_schedule(kind: str, eps: float, steps: int) -> list[float]:
    """MORA's step sizes from ``2 eps``: cosine (published scripts) ``(1 + cos(pi i / n)) / 2``,
    linear ``1 - i / n``, cos ``cos(pi i / 2n)``; constant is the reference's 2/255."""
    out = []
    for i in range(steps):
        if kind == "cosine":
            f = (1 + math.cos(i / steps * math.pi)) * 0.5
        elif kind == "linear":
            f = 1 - i / steps
        elif kind == "cos":
            f = math.cos(i / steps * math.pi * 0.5)
        else:
            out.append(2.0 / 255.0)
            continue
        out.append(2 * eps * f)
    return out


@dataclass(frozen=True)
class MoraAttack(Attack):
    """MORA with the published "standard-t-pre" evaluation (module docstring). ``mode`` None
    follows the ensemble's combiner (mean-logits -> logits, vote* -> voting, else softmax);
    ``float_dis`` None takes the mode's published value. An example is robust only if it
    survives every pass; a break is judged by the ensemble's own combiner."""

    ensemble_only: ClassVar[bool] = True
    name: str = "mora"
    mode: str | None = None
    n_iter: int = 100
    scales: tuple[float, ...] = SCALES
    n_target_classes: int = 9
    float_dis: float | None = None
    schedule: str = "cosine"
    momentum: float = 0.75

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if self.mode is not None and self.mode not in MODES:
            raise PhalanxError(f"unknown MORA mode {self.mode!r}; accepted: {', '.join(MODES)}")
        if isinstance(self.n_iter, bool) or not isinstance(self.n_iter, int) or self.n_iter < 1:
            raise PhalanxError(f"n_iter must be an integer >= 1, got {self.n_iter!r}")
        v = self.n_target_classes
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise PhalanxError(f"n_target_classes must be an integer >= 0, got {v!r}")
        if not self.scales and self.n_target_classes == 0:
            raise PhalanxError("MORA needs at least one scale or one target class")
        if any(not 0.0 <= s <= 1.0 for s in self.scales):
            raise PhalanxError(f"MORA scales must lie in [0, 1], got {list(self.scales)}")
        if self.schedule not in SCHEDULES:
            raise PhalanxError(f"unknown MORA step schedule {self.schedule!r}; accepted: {', '.join(SCHEDULES)}")
        if not 0.0 < self.momentum <= 1.0:
            raise PhalanxError(f"momentum must be in (0, 1], got {self.momentum!r}")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *,
                 generator: torch.Generator | None = None, target: Tensor | None = None) -> Tensor:
        model = prepare(model, x, y)
        model_mode = mode_of(model)  # also refuses single models and randomized ensembles
        mode = self.mode or model_mode
        x = x.detach()
        if threat.eps == 0:
            return x.clone()
        best = x.clone()
        with torch.no_grad():
            robust = model(x).argmax(-1) == y
            clean_pred = surrogate_outputs(member_logits_of(model, x), mode)[1]
        order = clean_pred.sort(-1, descending=True).indices
        runs: list[tuple[float | None, int]] = [(s, 0) for s in self.scales]
        runs += [(None, k) for k in range(1, min(self.n_target_classes, order.shape[-1] - 1) + 1)]
        for scale, k in runs:
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            tgt = order[idx, k] if scale is None else None
            adv = self._run(model, x[idx], y[idx], threat, mode, scale, tgt, generator)
            with torch.no_grad():
                ok = model(adv).argmax(-1) != y[idx]
            hit = idx[ok]
            best[hit] = adv[ok]
            robust[hit] = False
        return best

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, mode: str, scale: float | None,
             target: Tensor | None, generator: torch.Generator | None) -> Tensor:
        float_dis = FLOAT_DIS[mode] if self.float_dis is None else self.float_dis
        combine = getattr(model, "combine")  # noqa: B009

        def objective(adv: Tensor) -> tuple[Tensor, Tensor | None]:
            z = member_logits_of(model, adv)
            done = combine(z.detach()).argmax(-1) != y
            if scale is None:  # the reference's targeted pass: CE towards the target on o_pred
                assert target is not None
                return -F.cross_entropy(surrogate_outputs(z, mode)[1], target, reduction="none"), done
            return F.cross_entropy(mora_logits(z, y, mode, scale, float_dis), y, reduction="none"), done

        sizes = step_schedule(self.schedule, threat.eps, self.n_iter)
        start = apgd_start(x, threat, generator)
        return ascend(objective, x, start, threat, steps=self.n_iter, step_size=sizes[0],
                      schedule=sizes.__getitem__, heavy_ball=self.momentum)


@ATTACKS.register("mora", "MORA: model-reweighing ensemble attack, 5 reweighing passes + 9 targeted (Yu et al. 2022)")
def mora(mode: str | None = None, n_iter: int = 100, n_target_classes: int = 9,
         scales: tuple[float, ...] = SCALES, float_dis: float | None = None, schedule: str = "cosine") -> MoraAttack:
    return MoraAttack(mode=mode, n_iter=n_iter, n_target_classes=n_target_classes, scales=tuple(scales),
                      float_dis=float_dis, schedule=schedule)


__all__ = ["FLOAT_DIS", "MODES", "MoraAttack", "member_weights", "mode_of", "mora", "mora_logits", "step_schedule",
           "surrogate_outputs"]
