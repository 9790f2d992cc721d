"""A strict reader for the VNN-LIB subset VNN-COMP uses, and the writer of numbers for it.

VNN-LIB 1.0 (the SMT-LIB-like format of VNN-COMP, https://www.vnnlib.org): ``(declare-const X_i
Real)`` / ``(declare-const Y_j Real)`` for the flattened (C order) input and output of one
network, then ``(assert F)`` where ``F`` is built from ``(<= a b)``, ``(>= a b)``, ``(and F ...)``
and ``(or F ...)`` over variables and decimal constants. The query is the conjunction of the
assertions; ``sat`` means some input satisfies it (a counterexample to the safety property).

The VNN-LIB 2.0 subset read here is the relational form :mod:`phalanx.verification.export`
writes: ``(vnnlib-version <2.0>)``, one ``(declare-network N (declare-input X Real [shape])
(declare-output Y Real [shape]))`` per network, indexed variables ``X[0,3]``, and ``(== A[i] B[i])``
tying every element of each later network's input to the first network's (one shared input).

Everything else (strict ``<``/``>``, arithmetic, an input compared with an output, a variable
used before it is declared, an unbounded input) is refused with ``file:line:col`` and what is
accepted. The property is normalised into :class:`Region` s: an input box and a conjunction of
*groups*, each a disjunction of linear atoms ``c . Y + d >= 0`` over the concatenated outputs;
the property holds where some region holds. A top-level ``(or (and ..) ..)`` whose terms are
single output atoms stays one group (no expansion), which keeps VNN-COMP's robustness
properties and phalanx's own exports one region each.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phalanx.errors import PhalanxError

#: the most regions (cases of the disjunctive normal form) a property may expand into
MAX_REGIONS = 10_000

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_FLAT_VAR = re.compile(r"([XY])_(\d+)$")
_INDEXED_VAR = re.compile(r"([A-Za-z][A-Za-z0-9_]*)\[(\d+(?:,\d+)*)\]$")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*$")


def vnn_number(value: float) -> str:
    """A float as a VNN-LIB decimal that reads back to the same float64 (never ``np.float64(..)``,
    ``nan`` or ``inf``)."""
    v = float(value)
    if not math.isfinite(v):
        raise PhalanxError(f"VNN-LIB has no literal for {v!r}; accepted: finite numbers")
    return repr(v)


# ---------------------------------------------------------------------------------------------
# s-expressions with positions


@dataclass(frozen=True)
class _Tok:
    text: str
    line: int
    col: int


@dataclass(frozen=True)
class _List:
    items: tuple[_Tok | _List, ...]
    line: int
    col: int


class _Source:
    def __init__(self, text: str, name: str) -> None:
        self.text, self.name = text, name

    def error(self, node: _Tok | _List | None, msg: str) -> PhalanxError:
        where = f"{self.name}:{node.line}:{node.col}" if node is not None else self.name
        return PhalanxError(f"{where}: {msg}")


def _tokens(src: _Source) -> Iterator[_Tok]:
    line, col, i, text = 1, 1, 0, src.text
    while i < len(text):
        c = text[i]
        if c == "\n":
            line, col, i = line + 1, 1, i + 1
        elif c in " \t\r":
            col, i = col + 1, i + 1
        elif c == ";":
            while i < len(text) and text[i] != "\n":
                i += 1
        elif c in "()":
            yield _Tok(c, line, col)
            col, i = col + 1, i + 1
        else:
            j = i
            while j < len(text) and text[j] not in " \t\r\n();":
                j += 1
            yield _Tok(text[i:j], line, col)
            col, i = col + (j - i), j


def _sexprs(src: _Source) -> list[_Tok | _List]:
    stack: list[tuple[_Tok, list[_Tok | _List]]] = []
    top: list[_Tok | _List] = []
    for t in _tokens(src):
        if t.text == "(":
            stack.append((t, []))
        elif t.text == ")":
            if not stack:
                raise src.error(t, "unbalanced ')'")
            opener, items = stack.pop()
            node = _List(tuple(items), opener.line, opener.col)
            (stack[-1][1] if stack else top).append(node)
        else:
            (stack[-1][1] if stack else top).append(t)
    if stack:
        raise src.error(stack[-1][0], "'(' is never closed")
    return top


def _head(node: _Tok | _List) -> str | None:
    if isinstance(node, _List) and node.items and isinstance(node.items[0], _Tok):
        return node.items[0].text
    return None


# ---------------------------------------------------------------------------------------------
# the normal form


@dataclass(frozen=True, eq=False)
class OutputAtom:
    """``coef . Y + const >= 0`` over the concatenated outputs."""

    coef: np.ndarray
    const: float

    def key(self) -> tuple[tuple[float, ...], float]:
        return tuple(float(v) for v in self.coef), float(self.const)


@dataclass(frozen=True, eq=False)
class Region:
    """Inputs in ``[lower, upper]`` whose outputs satisfy every group (a group holds when one
    of its atoms does)."""

    lower: np.ndarray
    upper: np.ndarray
    groups: tuple[tuple[OutputAtom, ...], ...]

    @property
    def empty(self) -> bool:
        return bool(np.any(self.lower > self.upper))

    def holds(self, y: np.ndarray) -> bool:
        return all(any(float(a.coef @ y) + a.const >= 0.0 for a in g) for g in self.groups)


@dataclass(frozen=True)
class NetworkDecl:
    """A declared network: name, input and output shapes (VNN-LIB 1.0: one unnamed network)."""

    name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def n_inputs(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def n_outputs(self) -> int:
        return int(np.prod(self.output_shape))


@dataclass(frozen=True, eq=False)
class Property:
    """A parsed VNN-LIB query: the networks, the input and output sizes and the regions."""

    networks: tuple[NetworkDecl, ...]
    n_inputs: int
    n_outputs: int
    regions: tuple[Region, ...]
    version: str = "1.0"
    source: str = ""
    comments: tuple[str, ...] = field(default=())

    def holds(self, x: np.ndarray, y: np.ndarray, tol: float = 0.0) -> bool:
        """True when ``(x, y)`` satisfies the property (a counterexample), with ``tol`` slack on
        the input box (VNN-COMP's checker allows 1e-4 on both)."""
        x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
        for r in self.regions:
            if np.all(x >= r.lower - tol) and np.all(x <= r.upper + tol):
                if all(any(float(a.coef @ y) + a.const >= -tol for a in g) for g in r.groups):
                    return True
        return False


# ---------------------------------------------------------------------------------------------
# formulas


@dataclass(frozen=True)
class _InputAtom:
    index: int
    lower: float | None
    upper: float | None


_Atom = _InputAtom | OutputAtom


@dataclass(frozen=True)
class _Branch:
    """A conjunction of input bounds and a CNF over output atoms."""

    inputs: tuple[_InputAtom, ...]
    clauses: tuple[tuple[OutputAtom, ...], ...]


class _Reader:
    def __init__(self, src: _Source) -> None:
        self.src = src
        self.inputs: dict[str, int] = {}   # variable name -> flat input index
        self.outputs: dict[str, int] = {}  # variable name -> flat output index
        self.n_in = self.n_out = 0
        self.networks: list[NetworkDecl] = []
        self.version = "1.0"
        self._shapes: dict[str, tuple[int, ...]] = {}

    # ---- declarations
    def declare_const(self, node: _List) -> None:
        it = node.items
        if len(it) != 3 or not all(isinstance(t, _Tok) for t in it):
            raise self.src.error(node, "expected (declare-const X_i Real) or (declare-const Y_j Real)")
        name, typ = it[1], it[2]
        assert isinstance(name, _Tok) and isinstance(typ, _Tok)
        if typ.text != "Real":
            raise self.src.error(typ, f"type {typ.text!r} is not supported; accepted: Real")
        m = _FLAT_VAR.match(name.text)
        if m is None:
            raise self.src.error(name, f"variable {name.text!r} is not an input X_i or an output Y_j")
        table = self.inputs if m.group(1) == "X" else self.outputs
        if name.text in table:
            raise self.src.error(name, f"{name.text} is declared twice")
        table[name.text] = int(m.group(2))

    def declare_network(self, node: _List) -> None:
        it = node.items
        if len(it) < 4 or not isinstance(it[1], _Tok) or not _NAME.match(it[1].text):
            raise self.src.error(node, "expected (declare-network NAME (declare-input ...) (declare-output ...))")
        ins: list[tuple[str, tuple[int, ...]]] = []
        outs: list[tuple[str, tuple[int, ...]]] = []
        for d in it[2:]:
            h = _head(d)
            if h not in ("declare-input", "declare-output"):
                raise self.src.error(d, f"{h or 'this form'} is not supported in a network declaration; accepted: "
                                        "declare-input, declare-output (no hidden nodes, equal-to, isomorphic-to)")
            assert isinstance(d, _List)
            if len(d.items) != 4 or not all(isinstance(t, _Tok) for t in d.items):
                raise self.src.error(d, f"expected ({h} NAME Real [d1,d2,...])")
            name, typ, shape_tok = d.items[1], d.items[2], d.items[3]
            assert isinstance(name, _Tok) and isinstance(typ, _Tok) and isinstance(shape_tok, _Tok)
            if not _NAME.match(name.text) or name.text in self.inputs or name.text in self.outputs:
                raise self.src.error(name, f"bad or repeated variable name {name.text!r}")
            if typ.text not in ("Real", "real", "float32", "float64"):
                raise self.src.error(typ, f"element type {typ.text!r} not supported; accepted: Real, float32, float64")
            sm = re.match(r"\[(\d+(?:,\d+)*)\]$", shape_tok.text)
            if sm is None:
                raise self.src.error(shape_tok, f"bad shape {shape_tok.text!r}; accepted: [d1,d2,...] without spaces")
            shape = tuple(int(v) for v in sm.group(1).split(","))
            (ins if h == "declare-input" else outs).append((name.text, shape))
        if len(ins) != 1 or len(outs) != 1:
            raise self.src.error(node, "a network needs exactly one input and one output here")
        net = NetworkDecl(it[1].text, ins[0][1], outs[0][1])
        if any(n.name == net.name for n in self.networks):
            raise self.src.error(it[1], f"network {net.name} is declared twice")
        self.inputs[ins[0][0]] = len(self.networks)   # network index; resolved per element below
        self.outputs[outs[0][0]] = self.n_out
        self.n_out += net.n_outputs
        self.networks.append(net)
        self._shapes[ins[0][0]] = net.input_shape
        self._shapes[outs[0][0]] = net.output_shape

    # ---- terms
    def variable(self, t: _Tok) -> tuple[str, int] | None:
        """``("X", flat index)`` / ``("Y", flat index)`` / ``("Xn", net*N + index)`` for a
        later network's input element, or None for a number."""
        if _NUMBER.match(t.text):
            return None
        if self.version == "1.0":
            m = _FLAT_VAR.match(t.text)
            if m is None:
                raise self.src.error(t, f"{t.text!r} is neither a number nor an X_i / Y_j variable")
            table = self.inputs if m.group(1) == "X" else self.outputs
            if t.text not in table:
                raise self.src.error(t, f"{t.text} is used before it is declared")
            return m.group(1), table[t.text]
        m = _INDEXED_VAR.match(t.text)
        if m is None or m.group(1) not in self._shapes:
            raise self.src.error(t, f"{t.text!r} is neither a number nor an element NAME[i,...] of a declared tensor")
        shape = self._shapes[m.group(1)]
        idx = tuple(int(v) for v in m.group(2).split(","))
        if len(idx) != len(shape) or any(i >= s for i, s in zip(idx, shape, strict=True)):
            raise self.src.error(t, f"index {list(idx)} out of range for {m.group(1)} of shape {list(shape)}")
        flat = int(np.ravel_multi_index(idx, shape))
        if m.group(1) in self.outputs:
            return "Y", self.outputs[m.group(1)] + flat
        net = self.inputs[m.group(1)]
        return ("X", flat) if net == 0 else ("Xn", net * 10**12 + flat)

    def number(self, t: _Tok) -> float:
        v = float(t.text)
        if not math.isfinite(v):
            raise self.src.error(t, f"number {t.text!r} is not finite")
        return v

    def atom(self, node: _List) -> _Atom | tuple[str, int, int]:
        op = _head(node)
        for t in node.items[1:]:
            if isinstance(t, _List):
                raise self.src.error(t, f"({op} a b) compares variables or numbers; arithmetic expressions are not "
                                        "supported")
            self.variable(t)
        if len(node.items) != 3:
            raise self.src.error(node, f"({op} a b) needs exactly two operands, got {len(node.items) - 1}")
        a, b = node.items[1], node.items[2]
        assert isinstance(a, _Tok) and isinstance(b, _Tok)
        va, vb = self.variable(a), self.variable(b)
        if op == "==":
            if self.version == "1.0" or va is None or vb is None or "Y" in (va[0], vb[0]):
                raise self.src.error(node, "(== a b) is accepted only between input elements of two networks "
                                           "(VNN-LIB 2.0 shared input)")
            return ("eq", va[1], vb[1]) if va[0] == "Xn" else ("eq", vb[1], va[1])
        if op == ">=":  # a >= b  <=>  b <= a
            va, vb, a, b = vb, va, b, a
        # now: a <= b, i.e. b - a >= 0
        if va is None and vb is None:
            raise self.src.error(node, "a comparison of two numbers is not a constraint")
        kinds = {v[0] for v in (va, vb) if v is not None}
        if "Xn" in kinds:
            raise self.src.error(node, "a later network's input may only appear in (== ...) with the first one's")
        if kinds == {"X", "Y"}:
            raise self.src.error(node, "a constraint may not mix inputs and outputs")
        if kinds == {"X"}:
            if va is not None and vb is not None:
                raise self.src.error(node, "input constraints must bound one variable by a number (a box)")
            if va is not None:  # X_i <= number
                return _InputAtom(va[1], None, self.number(b))
            assert vb is not None
            return _InputAtom(vb[1], self.number(a), None)
        coef = np.zeros(self.n_out)
        const = 0.0
        if vb is not None:
            coef[vb[1]] += 1.0
        else:
            const += self.number(b)
        if va is not None:
            coef[va[1]] -= 1.0
        else:
            const -= self.number(a)
        return OutputAtom(coef, const)

    def formula(self, node: _Tok | _List, equalities: list[tuple[int, int]] | None) -> list[_Branch]:
        op = _head(node)
        if not isinstance(node, _List) or op is None:
            raise self.src.error(node, "expected a formula (<= a b), (>= a b), (and ...) or (or ...)")
        if op in ("<=", ">=", "=="):
            a = self.atom(node)
            if isinstance(a, tuple):
                if equalities is None:
                    raise self.src.error(node, "(== ...) is accepted only as a top-level assertion")
                equalities.append((a[1], a[2]))
                return [_Branch((), ())]
            if isinstance(a, _InputAtom):
                return [_Branch((a,), ())]
            return [_Branch((), ((a,),))]
        if op in ("and", "or"):
            if len(node.items) < 2:
                raise self.src.error(node, f"({op}) needs at least one operand")
            parts = [self.formula(f, equalities if op == "and" else None) for f in node.items[1:]]
            if op == "and":
                return self._product(parts, node)
            if all(len(p) == 1 and not p[0].inputs and len(p[0].clauses) == 1 for p in parts):
                return [_Branch((), (tuple(a for p in parts for a in p[0].clauses[0]),))]
            out = [b for p in parts for b in p]
            if len(out) > MAX_REGIONS:
                raise self.src.error(node, f"the property expands into more than {MAX_REGIONS} cases")
            return out
        if op in ("<", ">", "=", "!=", "not", "=>", "xor", "+", "-", "*"):
            raise self.src.error(node, f"operator {op!r} is not in the supported subset; accepted: <=, >=, and, or "
                                       "(and == between network inputs in VNN-LIB 2.0)")
        raise self.src.error(node, f"unknown operator {op!r}; accepted: <=, >=, and, or")

    def _product(self, parts: Sequence[list[_Branch]], node: _Tok | _List) -> list[_Branch]:
        out = [_Branch((), ())]
        for p in parts:
            if len(out) * len(p) > MAX_REGIONS:
                raise self.src.error(node, f"the property expands into more than {MAX_REGIONS} cases")
            out = [_Branch(a.inputs + b.inputs, a.clauses + b.clauses) for a in out for b in p]
        return out


def parse_vnnlib(text: str, name: str = "<vnnlib>") -> Property:
    """Parse VNN-LIB text (1.0, or the 2.0 relational subset) into a :class:`Property`."""
    src = _Source(text, name)
    rd = _Reader(src)
    forms = _sexprs(src)
    asserts: list[_List] = []
    comments = tuple(ln[1:].strip() for ln in text.splitlines() if ln.lstrip().startswith(";"))
    for k, f in enumerate(forms):
        h = _head(f)
        if h == "vnnlib-version":
            assert isinstance(f, _List)
            v = f.items[1] if len(f.items) == 2 else None
            if k != 0 or not isinstance(v, _Tok) or v.text != "<2.0>":
                raise src.error(f, "expected (vnnlib-version <2.0>) as the first form")
            rd.version = "2.0"
        elif h == "declare-const" and rd.version == "1.0":
            assert isinstance(f, _List)
            if asserts:
                raise src.error(f, "declarations must come before the assertions")
            rd.declare_const(f)
        elif h == "declare-network" and rd.version == "2.0":
            assert isinstance(f, _List)
            if asserts:
                raise src.error(f, "declarations must come before the assertions")
            rd.declare_network(f)
        elif h == "assert":
            assert isinstance(f, _List)
            if len(f.items) != 2:
                raise src.error(f, "expected (assert FORMULA)")
            asserts.append(f)
        else:
            raise src.error(f, f"unexpected {'form ' + repr(h) if h else 'token'}; accepted: "
                               + ("(declare-network ...), (assert ...)" if rd.version == "2.0"
                                  else "(declare-const X_i Real), (declare-const Y_j Real), (assert ...)"))
    if rd.version == "1.0":
        for table, letter in ((rd.inputs, "X"), (rd.outputs, "Y")):
            if sorted(table.values()) != list(range(len(table))):
                missing = sorted(set(range(max(table.values(), default=-1) + 1)) - set(table.values()))
                raise src.error(None, f"{letter}_{missing[0]} is not declared ({letter} variables must be "
                                      f"{letter}_0..{letter}_n)")
        rd.n_in, rd.n_out = len(rd.inputs), len(rd.outputs)
        rd.networks = [NetworkDecl("network", (rd.n_in,), (rd.n_out,))]
    else:
        if not rd.networks:
            raise src.error(None, "no (declare-network ...)")
        rd.n_in = rd.networks[0].n_inputs
    if not rd.n_in or not rd.n_out:
        raise src.error(None, "the property declares no inputs or no outputs")
    if not asserts:
        raise src.error(None, "the property has no (assert ...)")
    equalities: list[tuple[int, int]] = []
    branches = rd._product([rd.formula(a.items[1], equalities) for a in asserts], asserts[0])
    _check_shared_input(rd, equalities, src)
    regions = tuple(_region(b, rd.n_in, src) for b in branches)
    return Property(tuple(rd.networks), rd.n_in, rd.n_out, regions, rd.version, name, comments)


def _check_shared_input(rd: _Reader, eqs: list[tuple[int, int]], src: _Source) -> None:
    want = {(net * 10**12 + i, i) for net in range(1, len(rd.networks)) for i in range(rd.networks[net].n_inputs)}
    if len(rd.networks) > 1 and any(n.n_inputs != rd.n_in for n in rd.networks):
        raise src.error(None, "the networks' inputs differ in size; only one shared input is supported")
    if set(eqs) != want:
        raise src.error(None, "every element of each later network's input must be asserted equal (==) to the "
                              "same element of the first network's input (one shared input)")


def _region(b: _Branch, n_in: int, src: _Source) -> Region:
    lo, hi = np.full(n_in, -np.inf), np.full(n_in, np.inf)
    for a in b.inputs:
        if a.index >= n_in:
            raise src.error(None, f"X_{a.index} is out of range")
        if a.lower is not None:
            lo[a.index] = max(lo[a.index], a.lower)
        if a.upper is not None:
            hi[a.index] = min(hi[a.index], a.upper)
    bad = np.nonzero(~np.isfinite(lo) | ~np.isfinite(hi))[0]
    if bad.size:
        raise src.error(None, f"input X_{int(bad[0])} has no {'lower' if not np.isfinite(lo[bad[0]]) else 'upper'} "
                              "bound; every input needs a box (>= and <= a number)")
    return Region(lo, hi, b.clauses)


def read_vnnlib(path: str | Path) -> Property:
    """Read a ``.vnnlib`` (or ``.vnnlib.gz``) file."""
    import gzip

    p = Path(path)
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise PhalanxError(f"VNN-LIB file {str(p)!r} not found") from None
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise PhalanxError(f"cannot read VNN-LIB file {str(p)!r}: {exc}") from None
    return parse_vnnlib(text, str(p))


__all__ = ["MAX_REGIONS", "NetworkDecl", "OutputAtom", "Property", "Region", "parse_vnnlib", "read_vnnlib",
           "vnn_number"]
