"""Shared value types. Shape letters: M members, B batch, K classes, C/H/W image dims."""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

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


def check_fields(obj: Any, section: str) -> None:
    """Check every field of a config dataclass against its type annotation, in place.

    The one type check of settings (called from each config's ``__post_init__``): integers
    reject booleans and floats (``batch_size = true`` is an error, not batch 1), numbers reject
    booleans, strings and NaN/inf, strings reject numbers, ``tuple[X, ...]`` accepts a list of X;
    ints given for floats become floats and lists become tuples; a field named ``seed`` must be in
    [0, 2**63), what the torch and numpy generators accept. Errors name
    ``section.field``, the value and the accepted type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp = hints.get(f.name, Any)
        ok, new = _conform(value, tp)
        if not ok:
            raise PhalanxError(f"{section}.{f.name} must be {_describe(tp)}, got {value!r}")
        if f.name == "seed" and isinstance(new, int) and not 0 <= new < 2**63:
            raise PhalanxError(f"{section}.seed must be an integer in [0, 2**63), got {value!r}")
        if new is not value:
            object.__setattr__(obj, f.name, new)


def _conform(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        for arg in typing.get_args(tp):
            ok, new = _conform(value, arg)
            if ok:
                return True, new
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False, value
        return True, float(value)
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False, value
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return False, value
        out = [_conform(v, a) for v, a in zip(value, items)]
        return all(ok for ok, _ in out), tuple(v for _, v in out)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return True, value  # Any and other types: checked by the config itself


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
        return f"a list of {len(args)} values"
    names = {type(None): "unset", bool: "true or false", int: "an integer", float: "a finite number",
             str: "a quoted string", dict: "a table"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))
