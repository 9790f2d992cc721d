"""Paper-style tables from sweep results: rows are methods, columns are clean accuracy and each
attack at one eps, every value the mean ± sample standard deviation over seeds, with the best
mean per column marked; as Markdown, CSV or LaTeX. Plots: robust accuracy vs eps per method with
a band over seeds, the table's columns vs training epochs (a learning curve), and the
within-ensemble transferability matrices side by side.

Inputs are result files only: a sweep folder's ``results.json`` or cell folders' ``results.json``
(kind ``sweep-cell``), as written by :mod:`phalanx.workflows.sweep`."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phalanx.errors import PhalanxError
from phalanx.reports.plots import _plt, save_figure

#: display names of attack columns (bogun2022 table 1 spelling); others are upper-cased
ATTACK_LABELS = {"fgsm": "FGSM", "rfgsm": "R-FGSM", "pgd": "PGD", "bim": "BIM", "mim": "MIM", "apgd-ce": "APGD-CE",
                 "autoattack": "AutoAttack", "square": "Square"}


@dataclass(frozen=True)
class CellRecord:
    """One finished cell: its method label, seed, other grid axes, and evaluations by epoch."""

    method: str
    seed: int
    axes: dict[str, Any]
    final_epoch: int
    evaluations: dict[int, dict[str, Any]]
    source: str

    @property
    def label(self) -> str:
        if not self.axes:
            return self.method
        return self.method + " (" + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.axes.items()) + ")"


@dataclass
class Table:
    """``values[row][col]`` is a list of per-seed values (fractions) or empty."""

    title: str
    columns: list[str]
    rows: list[str]
    values: list[list[list[float]]]
    seeds: list[list[int]] = field(default_factory=list)

    def mean_std(self, r: int, c: int) -> tuple[float, float] | None:
        """Mean and sample standard deviation (n - 1; 0 for one seed)."""
        v = self.values[r][c]
        if not v:
            return None
        return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0

    def best(self, c: int, digits: int = 1) -> set[int]:
        """Rows whose mean, as displayed, equals the column's highest (ties are all marked)."""
        means = {r: round(100 * ms[0], digits) for r in range(len(self.rows))
                 if (ms := self.mean_std(r, c)) is not None}
        if not means:
            return set()
        top = max(means.values())
        return {r for r, m in means.items() if m == top}


def _record(res: Mapping[str, Any], source: str) -> CellRecord:
    evals = {int(k): v for k, v in dict(res.get("evaluations", {})).items()}
    return CellRecord(str(res["method"]), int(res["seed"]), dict(res.get("axes") or {}),
                      int(res.get("final_epoch") or max(evals, default=0)), evals, source)


def collect(paths: Iterable[str | Path]) -> list[CellRecord]:
    """Finished cells from sweep folders or cell folders (or their results.json files)."""
    out: list[CellRecord] = []
    for p in map(Path, paths):
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise PhalanxError(f"{p} has no results.json (give a sweep folder or a sweep cell's run folder)")
        try:
            res = json.loads(f.read_text())
        except ValueError as exc:
            raise PhalanxError(f"{f} is not valid JSON: {exc}") from None
        kind = res.get("kind")
        if kind == "sweep":
            for key, cell in res.get("cells", {}).items():
                if cell.get("state") == "done" and cell.get("evaluations"):
                    out.append(_record(cell, f"{p}:{key}"))
        elif kind == "sweep-cell":
            out.append(_record(res, str(p)))
        else:
            raise PhalanxError(f"{f} holds a {kind!r} result; phalanx table reads sweep folders and sweep cells")
    if not out:
        raise PhalanxError("no finished cells in " + ", ".join(map(str, paths)))
    seen: dict[tuple[str, int], str] = {}
    for r in out:
        if (r.label, r.seed) in seen:
            raise PhalanxError(f"{r.label} seed {r.seed} is given twice ({seen[(r.label, r.seed)]} and {r.source}); "
                               "a table averages distinct seeds")
        seen[(r.label, r.seed)] = r.source
    return out


def _eval_of(rec: CellRecord, epoch: int | None, name: str | None) -> dict[str, Any] | None:
    ev = rec.evaluations.get(rec.final_epoch if epoch is None else epoch)
    if ev is None:
        return None
    if name is None:
        return next((e for e in ev.values() if e.get("protocol") == "whitebox"), None)
    return ev.get(name)


def default_evaluation(records: Sequence[CellRecord]) -> str:
    for r in records:
        for ev in r.evaluations.get(r.final_epoch, {}).values():
            if ev.get("protocol") == "whitebox":
                return str(ev["name"])
    raise PhalanxError("the cells hold no white-box evaluation to tabulate")


def evaluation_names(records: Sequence[CellRecord]) -> list[str]:
    names: list[str] = []
    for r in records:
        for ev in r.evaluations.values():
            for n in ev:
                if n not in names:
                    names.append(n)
    return names


def method_table(records: Sequence[CellRecord], *, evaluation: str | None = None, eps: float | None = None,
                 epoch: int | None = None) -> Table:
    """Rows: methods in first-seen order; columns: Clean and each attack of ``evaluation`` at
    ``eps`` (default: its largest). ``epoch``: the evaluations after that many epochs
    (default: each cell's final epoch); cells without one are left out."""
    name = evaluation or default_evaluation(records)
    if name not in evaluation_names(records):
        raise PhalanxError(f"no evaluation named {name!r}; the cells have: {', '.join(evaluation_names(records))}")
    chosen = [(r, e) for r in records if (e := _eval_of(r, epoch, name)) is not None]
    if not chosen:
        raise PhalanxError(f"no cell has evaluation {name!r} at epoch {epoch}")
    if any(e.get("protocol") != "whitebox" for _, e in chosen):
        raise PhalanxError(f"evaluation {name!r} is not a white-box evaluation; the method table needs one")
    attacks: list[str] = []
    all_eps: set[float] = set()
    for _, e in chosen:
        for a, pts in e["whitebox"]["curves"].items():
            if a not in attacks:
                attacks.append(a)
            all_eps.update(float(p["eps"]) for p in pts)
    at = max(all_eps) if eps is None else float(eps)
    if not any(math.isclose(at, x) for x in all_eps):
        raise PhalanxError(f"evaluation {name!r} has no results at eps {at:g}; it has eps {sorted(all_eps)}")
    rows = list(dict.fromkeys(r.label for r, _ in chosen))
    cols = ["Clean"] + [ATTACK_LABELS.get(a, a.upper()) for a in attacks]
    values: list[list[list[float]]] = [[[] for _ in cols] for _ in rows]
    seeds: list[list[int]] = [[] for _ in rows]
    for r, e in sorted(chosen, key=lambda t: t[0].seed):
        i = rows.index(r.label)
        seeds[i].append(r.seed)
        values[i][0].append(float(e["clean"]["accuracy"]))
        for j, a in enumerate(attacks, start=1):
            pt = next((p for p in e["whitebox"]["curves"].get(a, []) if math.isclose(float(p["eps"]), at)), None)
            if pt is not None:
                values[i][j].append(float(pt["accuracy"]))
    when = "final epoch" if epoch is None else f"epoch {epoch}"
    return Table(f"{name}: accuracy (%) at eps {at:g}, {when}", cols, rows, values, seeds)


def _cell(t: Table, r: int, c: int, digits: int) -> str:
    ms = t.mean_std(r, c)
    if ms is None:
        return ""
    m, s = ms
    return f"{100 * m:.{digits}f} ± {100 * s:.{digits}f}" if len(t.values[r][c]) > 1 else f"{100 * m:.{digits}f}"


def to_markdown(t: Table, digits: int = 1) -> str:
    best = [t.best(c, digits) for c in range(len(t.columns))]
    lines = ["| method | seeds | " + " | ".join(t.columns) + " |", "|---|---|" + "---|" * len(t.columns)]
    for r, name in enumerate(t.rows):
        cells = [(f"**{v}**" if r in best[c] and v else v) for c, v in
                 ((c, _cell(t, r, c, digits)) for c in range(len(t.columns)))]
        lines.append(f"| {name} | {len(t.seeds[r])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_csv(t: Table, digits: int = 1) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "seeds"] + [f"{c} {k}" for c in t.columns for k in ("mean", "std", "best")])
    best = [t.best(c, digits) for c in range(len(t.columns))]
    for r, name in enumerate(t.rows):
        row: list[Any] = [name, len(t.seeds[r])]
        for c in range(len(t.columns)):
            ms = t.mean_std(r, c)
            row += ["", "", ""] if ms is None else [f"{100 * ms[0]:.4f}", f"{100 * ms[1]:.4f}", int(r in best[c])]
        w.writerow(row)
    return buf.getvalue()


def _tex(s: str) -> str:
    return s.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_") \
        .replace("#", r"\#").replace("$", r"\$")


def to_latex(t: Table, digits: int = 1) -> str:
    best = [t.best(c, digits) for c in range(len(t.columns))]
    lines = [r"\begin{tabular}{l" + "c" * len(t.columns) + "}", r"\toprule",
             "Method & " + " & ".join(_tex(c) for c in t.columns) + r" \\", r"\midrule"]
    for r, name in enumerate(t.rows):
        cells = []
        for c in range(len(t.columns)):
            ms = t.mean_std(r, c)
            if ms is None:
                cells.append("--")
                continue
            v = f"{100 * ms[0]:.{digits}f}"
            v = rf"\textbf{{{v}}}" if r in best[c] else v
            if len(t.values[r][c]) > 1:
                v += rf" $\pm$ {100 * ms[1]:.{digits}f}"
            cells.append(v)
        lines.append(_tex(name) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


FORMATS = {"markdown": to_markdown, "csv": to_csv, "latex": to_latex}


def render(t: Table, fmt: str = "markdown", digits: int = 1) -> str:
    if fmt not in FORMATS:
        raise PhalanxError(f"unknown table format {fmt!r}; accepted: {', '.join(FORMATS)}")
    return FORMATS[fmt](t, digits)


def common_epochs(records: Sequence[CellRecord], evaluation: str) -> list[int]:
    """Epoch counts at which some cell has ``evaluation`` (for the learning-curve tables)."""
    return sorted({ep for r in records for ep, ev in r.evaluations.items() if evaluation in ev})


# ---------------------------------------------------------------- plots

def _band(ax: Any, xs: Sequence[float], runs: Sequence[Sequence[float]], label: str, color: str) -> None:
    import numpy as np

    arr = 100 * np.asarray(runs, dtype=float)
    mean = arr.mean(0)
    ax.plot(xs, mean, marker="o", label=f"{label} (n={len(runs)})", color=color)
    if len(runs) > 1:
        std = arr.std(0, ddof=1)
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2, color=color)


def plot_eps_curves(records: Sequence[CellRecord], path: str | Path, *, evaluation: str | None = None,
                    attack: str | None = None) -> Path:
    """Robust accuracy vs eps per method (final epoch), mean over seeds with a ±1 std band."""
    name = evaluation or default_evaluation(records)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    by_method: dict[str, list[tuple[list[float], list[float]]]] = {}
    atk = attack
    for r in records:
        e = _eval_of(r, None, name)
        if e is None or e.get("protocol") != "whitebox":
            continue
        curves = e["whitebox"]["curves"]
        atk = atk or next(iter(curves))
        pts = sorted(curves.get(atk, []), key=lambda p: p["eps"])
        if pts:
            xs = [0.0] + [float(p["eps"]) for p in pts] if pts[0]["eps"] > 0 else [float(p["eps"]) for p in pts]
            ys = ([float(e["clean"]["accuracy"])] if pts[0]["eps"] > 0 else []) + [float(p["accuracy"]) for p in pts]
            by_method.setdefault(r.label, []).append((xs, ys))
    if not by_method:
        raise PhalanxError(f"no white-box curves in evaluation {name!r}")
    for i, (label, runs) in enumerate(by_method.items()):
        xs = runs[0][0]
        _band(ax, xs, [ys for x, ys in runs if x == xs], label, f"C{i}")
    ax.set_xlabel("eps (L-inf)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{ATTACK_LABELS.get(atk or '', atk)} ({name}); band: ±1 std over seeds", fontsize=9)
    return save_figure(fig, path)


def plot_learning_curves(records: Sequence[CellRecord], path: str | Path, *, evaluation: str | None = None,
                         eps: float | None = None, columns: Sequence[str] | None = None) -> Path:
    """Each table column vs training epochs (one panel per column), mean ± std over seeds."""
    name = evaluation or default_evaluation(records)
    epochs = common_epochs(records, name)
    tables = {ep: method_table(records, evaluation=name, eps=eps, epoch=ep) for ep in epochs}
    cols = list(columns or next(iter(tables.values())).columns)
    methods = list(dict.fromkeys(m for t in tables.values() for m in t.rows))
    plt = _plt()
    fig, axes = plt.subplots(1, len(cols), figsize=(2.6 * len(cols), 3.2), dpi=120, squeeze=False)
    for j, col in enumerate(cols):
        ax = axes[0][j]
        for i, m in enumerate(methods):
            xs, mean, std = [], [], []
            for ep, t in tables.items():
                if m in t.rows and col in t.columns:
                    ms = t.mean_std(t.rows.index(m), t.columns.index(col))
                    if ms is not None:
                        xs.append(ep)
                        mean.append(100 * ms[0])
                        std.append(100 * ms[1])
            if xs:
                ax.plot(xs, mean, marker="o", color=f"C{i}", label=m)
                ax.fill_between(xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                                color=f"C{i}", alpha=0.15)
        ax.set_title(col, fontsize=9)
        ax.set_xlabel("epochs")
        ax.grid(alpha=0.3)
        if j == 0:
            ax.set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=6)
    return save_figure(fig, path, title=f"{name}: accuracy vs training epochs (band: ±1 std over seeds)")


def plot_transfer_matrices(records: Sequence[CellRecord], path: str | Path, *, evaluation: str | None = None) -> Path:
    """Mean (over seeds) transferability matrix of each method, side by side (final epoch)."""
    import numpy as np

    by_method: dict[str, list[Any]] = {}
    meta: dict[str, Any] = {}
    for r in records:
        ev = r.evaluations.get(r.final_epoch, {})
        cand = [e for e in ev.values() if e.get("protocol") == "transferability"
                and (evaluation is None or e.get("name") == evaluation)]
        if cand and cand[0]["transferability"]:
            m = cand[0]["transferability"][0]
            by_method.setdefault(r.label, []).append(np.asarray(m["matrix"], dtype=float))
            meta = m
    if not by_method:
        raise PhalanxError("no transferability evaluation in the cells")
    plt = _plt()
    n = len(by_method)
    fig, axes = plt.subplots(1, n, figsize=(2.9 * n, 2.9), dpi=120, squeeze=False)
    for k, (label, mats) in enumerate(by_method.items()):
        arr = 100 * np.mean(mats, axis=0)
        ax = axes[0][k]
        ax.imshow(arr, cmap="Reds", vmin=0, vmax=100)
        cols = [c.replace("member ", "m") for c in meta["columns"]]
        ax.set_xticks(range(arr.shape[1]), labels=cols, fontsize=7)
        ax.set_yticks(range(arr.shape[0]), labels=[c.replace("member ", "m") for c in meta["rows"]], fontsize=7)
        for i in range(arr.shape[0]):
            for j in range(arr.shape[1]):
                ax.text(j, i, f"{arr[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if arr[i, j] > 60 else "black")
        ax.set_title(f"{label} (n={len(mats)})", fontsize=8)
        if k == 0:
            ax.set_ylabel("source (attacked)")
        ax.set_xlabel("target")
    return save_figure(fig, path, title=f"Attack success (%) within the ensemble, eps {meta['eps']:g}")


__all__ = ["CellRecord", "Table", "collect", "common_epochs", "evaluation_names", "method_table",
           "plot_eps_curves", "plot_learning_curves", "plot_transfer_matrices", "render", "to_csv", "to_latex",
           "to_markdown"]
