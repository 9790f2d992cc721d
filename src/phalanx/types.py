"""Shared value types. Shape letters: M members, B batch, K classes, C/H/W image dims."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeVar

from phalanx.errors import PhalanxError

E = TypeVar("E", bound=enum.Enum)


def parse_enum(cls: type[E], value: str | E, what: str) -> E:
    """The member of a string-valued enum named by ``value`` (case and ``_``/``-`` insensitive);
    an unknown name raises a :class:`PhalanxError` listing the accepted ones."""
    if isinstance(value, cls):
        return value
    key = str(value).lower().replace("_", "-")
    for member in cls:
        if str(member.value) == key:
            return member
    raise PhalanxError(f"unknown {what} {value!r}; accepted: {', '.join(str(m.value) for m in cls)}")


class Norm(str, enum.Enum):
    LINF = "linf"
    L2 = "l2"
    L1 = "l1"

    @classmethod
    def parse(cls, value: str | Norm) -> Norm:
        if isinstance(value, Norm):
            return value
        v = str(value).lower().replace("-", "").replace("_", "")
        aliases = {"linf": cls.LINF, "inf": cls.LINF, "l2": cls.L2, "l1": cls.L1}
        if v not in aliases:
            raise PhalanxError(f"unknown norm {value!r}; accepted: linf, l2, l1")
        return aliases[v]


@dataclass(frozen=True)
class ThreatModel:
    """An eps-ball of the given norm, intersected with the input box ``bounds``."""

    norm: Norm = Norm.LINF
    eps: float = 0.0
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm.parse(self.norm))
        lo, hi = self.bounds
        if not lo < hi:
            raise PhalanxError(f"input bounds must satisfy lo < hi, got {self.bounds}")
        check_eps(self.eps, hi - lo if self.norm is Norm.LINF else None)


def check_eps(eps: float, upper: float | None = 1.0) -> float:
    """Validate an attack radius: finite, >= 0 and, for L-inf, at most the input range."""
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise PhalanxError(f"eps must be a number, got {eps!r}") from None
    if not e >= 0.0 or e != e or e == float("inf"):
        raise PhalanxError(f"eps must be >= 0, got {eps!r}")
    if upper is not None and e > upper:
        raise PhalanxError(f"eps {eps!r} exceeds the input range; accepted: 0 <= eps <= {upper:g}")
    return e
