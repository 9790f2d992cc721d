"""The randomized-attack problem (Gross et al. 2022, Defs. 2-6): its configuration, the
prepared classifiers, the typed result, and the float64 PyTorch re-check every attack passes."""

from __future__ import annotations

import copy
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from phalanx.errors import PhalanxError
from phalanx.randomized.objectives import OBJECTIVES, clean_probabilities, expected_losses
from phalanx.types import Norm

BACKENDS = ("decomposition", "milp", "smt")
NORMS = (Norm.L1, Norm.LINF)
VALUE_TOL = 1e-9  # round-off allowed when comparing a recomputed Val with alpha


class Verdict(str, enum.Enum):
    """``not-robust``: a re-checked attack with Val >= alpha exists. ``robust``: proven that no
    eps-bounded randomized attack (any |A|) reaches alpha (Def. 6). ``robust-for-num-attacks``:
    proven only for attacks of at most the given |A| (fewer than Prop. 1's sufficient count).
    ``unknown``: a time limit or an unconfirmed solver answer; never a robustness claim."""

    NOT_ROBUST = "not-robust"
    ROBUST = "robust"
    ROBUST_FOR_NUM_ATTACKS = "robust-for-num-attacks"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RandomizedAttackConfig:
    """Settings of one randomized-attack query.

    ``eps``: attack budget in ``norm`` (L1 as in the paper, Def. 2; L-inf optional), in the
    units of the inputs. ``bounds``: the valid input box (None: unbounded, as in the paper).
    ``num_attacks``: |A|; ``None`` uses the sufficient count (Prop. 1 / ``sufficient_num_attacks``).
    ``objective``: ``max-min`` (the optimal value, eq. 1), ``max-sum`` (the paper's MaxMILP) or
    ``feasibility`` (the paper's MILP/SMT: any attack with Val >= alpha, eqs. 4-7).
    ``margin``: logit margin with which an attack must misclassify (so float64 re-checks pass);
    robustness proofs use margin 0 (ties count as errors, as Def. 4's "undefined").
    """

    eps: float
    alpha: float = 1.0
    num_attacks: int | None = None
    norm: Norm | str = Norm.L1
    bounds: tuple[float, float] | None = (0.0, 1.0)
    objective: str = "max-min"
    backend: str = "decomposition"
    time_limit_s: float = 300.0
    margin: float = 1e-3
    lemma2_shortcut: bool = True

    def __post_init__(self) -> None:
        norm = Norm.parse(self.norm)
        object.__setattr__(self, "norm", norm)
        if norm not in NORMS:
            raise PhalanxError(f"norm {norm.value!r} is not supported here; accepted: l1, linf")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise PhalanxError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise PhalanxError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.num_attacks is not None and (not isinstance(self.num_attacks, int) or self.num_attacks < 1):
            raise PhalanxError(f"num_attacks must be an integer >= 1 or None, got {self.num_attacks!r}")
        if self.bounds is not None:
            lo, hi = self.bounds
            if not lo < hi:
                raise PhalanxError(f"input bounds must satisfy lo < hi, got {self.bounds}")
        if self.objective not in OBJECTIVES:
            raise PhalanxError(f"unknown objective {self.objective!r}; accepted: {', '.join(OBJECTIVES)}")
        if self.backend not in BACKENDS:
            raise PhalanxError(f"unknown backend {self.backend!r}; accepted: {', '.join(BACKENDS)}")
        if self.backend == "smt" and self.objective != "feasibility":
            raise PhalanxError(f"the smt backend decides Val >= alpha only; use objective 'feasibility', "
                               f"not {self.objective!r}")
        if not self.time_limit_s > 0:
            raise PhalanxError(f"time_limit_s must be > 0, got {self.time_limit_s!r}")
        if not self.margin >= 0:
            raise PhalanxError(f"margin must be >= 0, got {self.margin!r}")


@dataclass
class Classifiers:
    """The classifiers C as float64 PyTorch copies (for re-checks) and exact IRs (for solvers)."""

    torch_models: list[nn.Module]
    nets: list[Any]  # NetworkIR
    in_shape: tuple[int, ...]
    num_classes: int

    def __len__(self) -> int:
        return len(self.torch_models)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(C, B, K) float64 logits of ``x`` of shape (B, *in_shape) or (B, d)."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(-1, *self.in_shape)
        with torch.no_grad():
            return torch.stack([m(xt) for m in self.torch_models]).numpy()


def prepare_classifiers(classifiers: Sequence[nn.Module], in_shape: Sequence[int]) -> Classifiers:
    """Float64 eval-mode copies of ``classifiers`` (the inputs are not modified) and their IRs."""
    from phalanx.verification.ir import to_ir

    if len(classifiers) < 1:
        raise PhalanxError("need at least one classifier")
    shape = tuple(int(s) for s in in_shape)
    models = [copy.deepcopy(m).double().eval() for m in classifiers]
    nets = [to_ir(m, shape) for m in models]
    classes = {n.out_dim for n in nets}
    if len(classes) != 1 or min(classes) < 2:
        raise PhalanxError(f"classifiers must share one number (>= 2) of outputs, got {sorted(classes)}")
    return Classifiers(models, nets, shape, classes.pop())


ACCEPT_MARGIN = 1e-7  # re-checks count an error only when a wrong logit wins by this much


def zero_one_losses(logits: np.ndarray, y: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Def. 4 on (..., K) logits: 1 iff some wrong label's logit is >= the true one + ``margin``.

    With ``margin = 0`` this is exactly Def. 4 (an undefined, tied argmax is an error). The
    re-check of returned attacks uses ``ACCEPT_MARGIN``: whether a float64 tie survives depends on
    summation order (e.g. the batch size), so a reported Val never rests on round-off; this can
    only under-count the attacker's loss (the sound direction for an attack)."""
    z = np.asarray(logits, dtype=np.float64)
    yy = np.broadcast_to(np.asarray(y, dtype=np.int64), z.shape[:-1])
    true = np.take_along_axis(z, yy[..., None], axis=-1)[..., 0]
    others = np.where(np.arange(z.shape[-1]) == yy[..., None], -np.inf, z).max(axis=-1)
    return (others - true >= margin).astype(np.int64)  # type: ignore[no-any-return]


def attack_norms(x: np.ndarray, attacks: np.ndarray, norm: Norm) -> np.ndarray:
    """(A, N) perturbation sizes ``||x_adv - x||`` in ``norm``."""
    a, n = attacks.shape[0], attacks.shape[1]
    d = np.asarray(attacks, dtype=np.float64).reshape(a, n, -1) - np.asarray(x, dtype=np.float64).reshape(1, n, -1)
    return np.abs(d).sum(-1) if norm is Norm.L1 else np.abs(d).max(-1)  # type: ignore[no-any-return]


def into_ball(x0: np.ndarray, x_adv: np.ndarray, eps: float, norm: Norm,
              bounds: tuple[float, float] | None) -> np.ndarray:
    """Remove solver round-off: clip to the box and shrink ``x_adv - x0`` into the eps-ball."""
    x0 = np.asarray(x0, dtype=np.float64)
    d = np.asarray(x_adv, dtype=np.float64) - x0
    if norm is Norm.LINF:
        d = np.clip(d, -eps, eps)
    else:
        s = np.abs(d).sum()
        if s > eps:
            d = d * (eps / s)
    out = x0 + d
    if bounds is not None:
        out = np.clip(out, bounds[0], bounds[1])
    return out


@dataclass
class Recheck:
    """Val of a returned attack recomputed by the PyTorch models in float64."""

    losses: np.ndarray  # (A, C, N) int
    value: float
    per_classifier: np.ndarray  # (C,)
    max_norm: float
    in_ball: bool


def recheck_attack(clf: Classifiers, x: np.ndarray, y: np.ndarray, attacks: np.ndarray,
                   probabilities: np.ndarray, config: RandomizedAttackConfig) -> Recheck:
    """Evaluate every perturbed point with the float64 PyTorch classifiers, check the eps-ball and
    the box, and recompute Val (eq. 1) from the returned probabilities."""
    a, n = attacks.shape[0], attacks.shape[1]
    p = clean_probabilities(probabilities)
    logits = clf.logits(attacks.reshape(a * n, -1)).reshape(len(clf), a, n, -1)  # (C, A, N, K)
    losses = zero_one_losses(logits, np.broadcast_to(y, (len(clf), a, n)), ACCEPT_MARGIN).transpose(1, 0, 2)
    norms = attack_norms(x, attacks, Norm.parse(config.norm))
    in_ball = bool((norms <= config.eps * (1 + 1e-9) + 1e-9).all())
    if config.bounds is not None:
        lo, hi = config.bounds
        in_ball = in_ball and bool(((attacks >= lo - 1e-12) & (attacks <= hi + 1e-12)).all())
    per_c = expected_losses(losses, p)
    return Recheck(losses, float(per_c.min()), per_c, float(norms.max(initial=0.0)), in_ball)


@dataclass
class RandomizedAttackResult:
    """The answer to one query. ``value`` is Val (eq. 1) of the returned attack *recomputed* by
    the float64 PyTorch models; ``upper_bound`` a proven bound on the best Val (None if none);
    ``attacks`` (A, N, *in_shape) are the perturbed points ``x^j + delta_i^j``. ``status`` is
    ``optimal`` only when ``value`` reaches ``upper_bound`` (``attack.proven_status``); else
    ``feasible`` (an attack, optimality unproven), ``infeasible`` (no attack reaches alpha),
    ``incomplete`` (patterns left undecided), ``timeout``, ``unknown`` or ``error``."""

    verdict: Verdict
    value: float | None
    upper_bound: float | None
    alpha: float
    eps: float
    norm: str
    num_attacks: int
    sufficient_num_attacks: int
    probabilities: np.ndarray
    attacks: np.ndarray
    losses: np.ndarray
    per_classifier: np.ndarray
    backend: str
    objective: str
    status: str
    wall_time_s: float
    solver_value: float | None = None
    rechecked: bool = False
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self, *, include_attacks: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "verdict": self.verdict.value, "value": self.value, "upper_bound": self.upper_bound,
            "alpha": self.alpha, "eps": self.eps, "norm": self.norm, "num_attacks": self.num_attacks,
            "sufficient_num_attacks": self.sufficient_num_attacks,
            "attacks_used": len(self.probabilities),
            "probabilities": [float(v) for v in self.probabilities],
            "losses": self.losses.tolist(), "per_classifier": [float(v) for v in self.per_classifier],
            "backend": self.backend, "objective": self.objective, "status": self.status,
            "wall_time_s": round(self.wall_time_s, 4), "solver_value": self.solver_value,
            "rechecked": self.rechecked, "notes": list(self.notes), "stats": _jsonable(self.stats),
        }
        if include_attacks:
            out["attacks"] = np.asarray(self.attacks, dtype=np.float64).tolist()
        return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (frozenset, set)):
        return sorted(_jsonable(x) for x in v)
    return v
