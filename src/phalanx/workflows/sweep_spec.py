"""Sweep specifications: a TOML grid (methods x seeds x optional axes) over the ``phalanx train``
config, plus the evaluations to run on every trained ensemble. Parsing validates everything a
cell will need (config keys, method options, attack names, dependencies) so that a mistake is
one :class:`PhalanxError` before any cell runs.

Layout of a spec (see ``examples/sweeps/``)::

    [sweep]            name, seeds, methods (order/subset of [method.*]), eval_epochs, timeout_s,
                       gpus_per_cell (default: 1 where CUDA is available, else 0)
    [base.data] ...    the shared train config: [base.data] [base.model] [base.method] [base.train]
    [grid]             extra axes: "section.key" = [values, ...]
    [method.LABEL]     name (registry name, default LABEL), options = {...}, set = {"section.key" = value},
                       init = "OTHER_LABEL" (start from that cell's ensemble, same seed and axes),
                       eval_epochs = [...]
    [[evaluation]]     name, protocol (whitebox | transferability), attacks, eps, steps, restarts,
                       limit, batch_size, members, sanity, final_only, attack_params = {ATTACK = {...}}
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phalanx.errors import PhalanxError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SWEEP_KEYS = {"name", "seeds", "methods", "eval_epochs", "timeout_s", "gpus_per_cell"}
METHOD_KEYS = {"name", "options", "set", "init", "eval_epochs"}
EVAL_KEYS = {"name", "protocol", "attacks", "eps", "steps", "restarts", "limit", "batch_size", "members",
             "sanity", "final_only", "attack_params", "split"}
PROTOCOLS = ("whitebox", "transferability")
TOP_KEYS = {"sweep", "base", "grid", "method", "evaluation"}


def _unknown(where: str, given: dict[str, Any], known: set[str]) -> None:
    bad = sorted(set(given) - known)
    if bad:
        raise PhalanxError(f"unknown key {bad[0]!r} in {where}; known: {', '.join(sorted(known))}")


def _int_list(where: str, value: Any, *, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise PhalanxError(f"{where} must be a list of integers, got {value!r}")
    if any(v < minimum for v in value):
        raise PhalanxError(f"{where} values must be >= {minimum}, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class MethodEntry:
    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    set: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    eval_epochs: tuple[int, ...] | None = None


@dataclass(frozen=True)
class EvalEntry:
    """One evaluation of every trained ensemble. ``attack_params`` maps an attack name to its
    own settings (e.g. ``{pgd = {step_size = 0.1}}``); ``steps``/``restarts`` go to the attacks
    that take them. ``final_only``: skip it at the intermediate ``eval_epochs``."""

    name: str
    protocol: str = "whitebox"
    attacks: tuple[str, ...] = ("pgd",)
    eps: tuple[float, ...] = (0.3,)
    steps: int | None = 10
    restarts: int | None = 1
    limit: int | None = 1000
    batch_size: int = 500
    members: bool = False
    sanity: bool = False
    final_only: bool = False
    split: str = "test"
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def build_attacks(self) -> dict[str, Any]:
        from phalanx.attacks import configure_attack

        return {a: configure_attack(a, self.attack_params.get(a, {}), steps=self.steps, restarts=self.restarts)
                for a in self.attacks}

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalEntry:
        kw: dict[str, Any] = {k: (tuple(v) if k in ("attacks", "eps") else v) for k, v in d.items()}
        return cls(**kw)


@dataclass(frozen=True)
class Cell:
    """One trained ensemble of the grid. ``tree`` is the resolved ``phalanx train`` config tree."""

    key: str
    method: str  # the method label
    seed: int
    axes: dict[str, Any]
    tree: dict[str, Any]
    depends_on: str | None
    eval_epochs: tuple[int, ...]

    @property
    def epochs(self) -> int:
        return int(self.tree.get("train", {}).get("epochs", 10))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "method": self.method, "seed": self.seed, "axes": self.axes, "config": self.tree,
                "depends_on": self.depends_on, "eval_epochs": list(self.eval_epochs)}


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: dict[str, Any]
    seeds: tuple[int, ...]
    methods: tuple[MethodEntry, ...]
    grid: dict[str, tuple[Any, ...]]
    evaluations: tuple[EvalEntry, ...]
    eval_epochs: tuple[int, ...] = ()
    timeout_s: float | None = None
    gpus_per_cell: int | None = None  # None: 1 where CUDA is available, else 0
    source: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        """The grid in dependency order (a cell's ``init`` cell comes first)."""
        import itertools

        axes = list(self.grid)
        combos = list(itertools.product(*(self.grid[a] for a in axes))) if axes else [()]
        by_label = {m.label: m for m in self.methods}
        out: list[Cell] = []
        for m in _topological(self.methods):
            for seed in self.seeds:
                for combo in combos:
                    ax = dict(zip(axes, combo, strict=True))
                    out.append(_make_cell(self, m, seed, ax,
                                          by_label[m.init] if m.init is not None else None))
        return out


def _suffix(axes: dict[str, Any]) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in axes.items()]
    return "".join("-" + re.sub(r"[^A-Za-z0-9_.=+]", "_", p) for p in parts)


def cell_key(label: str, seed: int, axes: dict[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", label) + f"-seed{seed}" + _suffix(axes)


def _assign(tree: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise PhalanxError(f"{where}: key must be section.key (e.g. train.epochs), got {dotted!r}")
    tree.setdefault(parts[0], {})[parts[1]] = copy.deepcopy(value)


def _make_cell(spec: SweepSpec, m: MethodEntry, seed: int, axes: dict[str, Any], dep: MethodEntry | None) -> Cell:
    tree = copy.deepcopy(spec.base)
    for k, v in axes.items():
        _assign(tree, k, v, "[grid]")
    for k, v in m.set.items():
        _assign(tree, k, v, f"[method.{m.label}].set")
    tree["method"] = {"name": m.name, **m.options}
    tree.setdefault("train", {})["seed"] = seed
    epochs = int(tree["train"].get("epochs", 10))
    wanted = m.eval_epochs if m.eval_epochs is not None else spec.eval_epochs
    eval_epochs = tuple(sorted({e for e in wanted if e < epochs} | {epochs}))
    return Cell(cell_key(m.label, seed, axes), m.label, seed, axes, tree,
                cell_key(dep.label, seed, axes) if dep is not None else None, eval_epochs)


def _topological(methods: tuple[MethodEntry, ...]) -> list[MethodEntry]:
    by_label = {m.label: m for m in methods}
    order: list[MethodEntry] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(m: MethodEntry, path: list[str]) -> None:
        if state.get(m.label) == 2:
            return
        if state.get(m.label) == 1:
            cycle = [*path[path.index(m.label):], m.label]
            raise PhalanxError(f"cycle in method dependencies (init): {' -> '.join(cycle)}")
        state[m.label] = 1
        if m.init is not None:
            if m.init not in by_label:
                raise PhalanxError(f"[method.{m.label}] init = {m.init!r} is not a method of this sweep; "
                                   f"methods: {', '.join(by_label)}")
            visit(by_label[m.init], [*path, m.label])
        state[m.label] = 2
        order.append(m)

    for m in methods:
        visit(m, [])
    return order


def parse_sweep_spec(tree: dict[str, Any], *, name: str = "sweep") -> SweepSpec:
    """Validate a parsed TOML tree into a :class:`SweepSpec`; every mistake is a PhalanxError."""
    from phalanx.training import METHODS, create_method

    _unknown("the sweep spec (top level)", tree, TOP_KEYS)
    for sec in TOP_KEYS - {"evaluation"}:
        if sec in tree and not isinstance(tree[sec], dict):
            raise PhalanxError(f"[{sec}] must be a table, got {type(tree[sec]).__name__}")
    sw = dict(tree.get("sweep", {}))
    _unknown("[sweep]", sw, SWEEP_KEYS)
    seeds = _int_list("sweep.seeds", sw.get("seeds", [0]), minimum=0)
    if len(set(seeds)) != len(seeds):
        raise PhalanxError(f"sweep.seeds has duplicates: {list(seeds)}")
    eval_epochs = _int_list("sweep.eval_epochs", sw.get("eval_epochs", []), minimum=1)
    timeout = sw.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
        raise PhalanxError(f"sweep.timeout_s must be a positive number, got {timeout!r}")
    gpus = sw.get("gpus_per_cell")
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0):
        raise PhalanxError(f"sweep.gpus_per_cell must be an integer >= 0, got {gpus!r}")
    base = tree.get("base", {})
    _unknown("[base]", base, {"data", "model", "method", "train"})
    if "method" in base.get("method", {}) or "name" in base.get("method", {}):
        raise PhalanxError("[base.method] cannot set the method name; list methods as [method.LABEL] tables")

    raw_methods = tree.get("method", {})
    methods: list[MethodEntry] = []
    for label, m in raw_methods.items():
        if not isinstance(m, dict):
            raise PhalanxError(f"[method.{label}] must be a table")
        _unknown(f"[method.{label}]", m, METHOD_KEYS)
        mname = m.get("name", label)
        options = {**base.get("method", {}), **m.get("options", {})}
        try:
            METHODS.get(mname)
            create_method(mname, **options)  # unknown names, unknown or bad options fail here
        except PhalanxError as exc:
            raise PhalanxError(f"[method.{label}]: {exc}") from None
        sets = m.get("set", {})
        if not isinstance(sets, dict):
            raise PhalanxError(f"[method.{label}].set must be a table of section.key = value")
        ee = _int_list(f"method.{label}.eval_epochs", m["eval_epochs"], minimum=1) if "eval_epochs" in m else None
        methods.append(MethodEntry(label, mname, options, dict(sets), m.get("init"), ee))
    order = sw.get("methods")
    if order is not None:
        if not isinstance(order, list) or not all(isinstance(v, str) for v in order):
            raise PhalanxError(f"sweep.methods must be a list of method labels, got {order!r}")
        known = {m.label: m for m in methods}
        for lab in order:
            if lab not in known:
                raise PhalanxError(f"sweep.methods names {lab!r}, which has no [method.{lab}] table; "
                                   f"defined: {', '.join(known) or 'none'}")
        chosen = {lab: known[lab] for lab in order}
        for lab in list(chosen):  # pull in init dependencies that were left out of the list
            dep = chosen[lab].init
            while dep is not None and dep in known and dep not in chosen:
                chosen[dep] = known[dep]
                dep = known[dep].init
        methods = [m for m in methods if m.label in chosen]
    grid: dict[str, tuple[Any, ...]] = {}
    for k, v in tree.get("grid", {}).items():
        if not isinstance(v, list):
            raise PhalanxError(f"[grid] {k!r} must be a list of values, got {v!r}")
        if k in ("method.name", "train.seed"):
            raise PhalanxError(f"[grid] cannot vary {k!r}; use [method.LABEL] tables and sweep.seeds")
        grid[k] = tuple(v)

    evals: list[EvalEntry] = []
    raw_evals = tree.get("evaluation", [])
    if not isinstance(raw_evals, list):
        raise PhalanxError("evaluations are written as [[evaluation]] tables")
    for i, e in enumerate(raw_evals):
        evals.append(_parse_eval(i, e))
    names = [e.name for e in evals]
    if len(set(names)) != len(names):
        raise PhalanxError(f"evaluation names must be unique, got {names}")

    spec = SweepSpec(str(sw.get("name", name)), base, seeds, tuple(methods), grid, tuple(evals), eval_epochs,
                     float(timeout) if timeout is not None else None, gpus, copy.deepcopy(tree))
    cells = spec.cells()  # cycles and bad init names fail here
    if not cells:
        empty = [k for k, v in grid.items() if not v]
        why = ("no [method.*] tables" if not methods else "sweep.seeds is empty" if not seeds
               else f"grid axis {empty[0]!r} is empty" if empty else "nothing selected")
        raise PhalanxError(f"the sweep expands to zero cells ({why})")
    from phalanx.config import build_config

    for c in cells:
        try:
            build_config(c.tree)
        except PhalanxError as exc:
            raise PhalanxError(f"cell {c.key}: {exc}") from None
    return spec


def _parse_eval(i: int, e: Any) -> EvalEntry:
    from phalanx.types import check_eps

    if not isinstance(e, dict):
        raise PhalanxError(f"[[evaluation]] #{i + 1} must be a table")
    _unknown(f"[[evaluation]] #{i + 1}", e, EVAL_KEYS)
    kw = dict(e)
    kw.setdefault("name", kw.get("protocol", "whitebox") if i == 0 else f"eval{i + 1}")
    proto = kw.get("protocol", "whitebox")
    if proto not in PROTOCOLS:
        raise PhalanxError(f"[[evaluation]] {kw['name']!r}: unknown protocol {proto!r}; accepted: {', '.join(PROTOCOLS)}")
    for k in ("attacks", "eps"):
        if k in kw:
            if not isinstance(kw[k], list) or not kw[k]:
                raise PhalanxError(f"[[evaluation]] {kw['name']!r}: {k} must be a non-empty list, got {kw[k]!r}")
            kw[k] = tuple(kw[k])
    kw["eps"] = tuple(check_eps(float(v)) for v in kw.get("eps", (0.3,)))
    for k in ("steps", "restarts", "limit", "batch_size"):
        v = kw.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise PhalanxError(f"[[evaluation]] {kw['name']!r}: {k} must be an integer >= 1, got {v!r}")
    if kw.get("split", "test") not in ("test", "val"):
        raise PhalanxError(f"[[evaluation]] {kw['name']!r}: split must be test or val, got {kw['split']!r}")
    params = kw.get("attack_params", {})
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise PhalanxError(f"[[evaluation]] {kw['name']!r}: attack_params must map attack names to tables")
    for a in params:
        if a not in kw.get("attacks", ("pgd",)):
            raise PhalanxError(f"[[evaluation]] {kw['name']!r}: attack_params names {a!r}, "
                               f"which is not in attacks {list(kw.get('attacks', ('pgd',)))}")
    entry = EvalEntry(**kw)
    try:
        entry.build_attacks()  # unknown attacks or settings fail here
    except PhalanxError as exc:
        raise PhalanxError(f"[[evaluation]] {entry.name!r}: {exc}") from None
    return entry


def load_sweep_spec(path: str | Path) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise PhalanxError(f"sweep spec {p} does not exist")
    try:
        tree = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise PhalanxError(f"sweep spec {p} is not valid TOML: {exc}") from None
    return parse_sweep_spec(tree, name=p.stem)
